"""Pure parsers of what llama.cpp's tools print: `llama-bench -o json` and `llama-mtmd-cli`'s log.

Kept apart from the code that runs the tools so that the tests can check them on recorded output
(tests/data/llama_cpp/) without a llama.cpp build. The formats are those of the llama.cpp vendored by
llama-cpp-python 0.3.36 (commit 0c1e570); a line that is missing gives None, never a guess.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

# Qwen2's pre-tokenizer split (tokenizer.json), which llama.cpp implements as pre-tokenizer "qwen2".
QWEN2_PRE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama_perf_context_print (src/llama-context.cpp): the context's counters at exit, on stderr.
_LOAD = re.compile(r"llama_perf_context_print:\s+load time =\s*([\d.]+) ms")
_PROMPT = re.compile(r"llama_perf_context_print:\s+prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
_EVAL = re.compile(r"llama_perf_context_print:\s+eval time =\s*([\d.]+) ms /\s*(\d+) runs")
# mtmd-cli.cpp: the whole media batch (mel frames -> encoder -> projector); older builds: mtmd-helper.cpp.
_ENCODE = (
    re.compile(r"mtmd batch encoding done in (\d+) ms"),
    re.compile(r"(?:audio|image) slice encoded in (\d+) ms"),
)
# mtmd-helper.cpp: llama_decode of the audio embeddings (part of "prompt eval time" above).
_MEDIA_DECODE = re.compile(r"audio decoded \(batch \d+/\d+\) in (\d+) ms")


def bench_rows(json_text: str, quant: str) -> list[dict]:
    """`llama-bench -o json` → one row per test: {quant, test ("pp128"/"tg32"), tokens_per_s, stddev, ...}.

    tokens_per_s is llama-bench's own mean over the repetitions (avg_ts), stddev its stddev_ts; samples
    are the per-repetition tokens/s where the build reports them (samples_ts).
    """
    rows = []
    for r in json.loads(json_text):
        n_prompt, n_gen = int(r["n_prompt"]), int(r["n_gen"])
        test = f"pp{n_prompt}" if n_gen == 0 else f"tg{n_gen}" if n_prompt == 0 else f"pp{n_prompt}+tg{n_gen}"
        rows.append(
            {
                "quant": quant,
                "test": test,
                "tokens_per_s": float(r["avg_ts"]),
                "stddev": float(r["stddev_ts"]),
                "samples": [float(x) for x in r.get("samples_ts", [])],
                "threads": int(r["n_threads"]),
                "model_size_bytes": int(r["model_size"]),
                "build": f"{r.get('build_number', '?')} ({r.get('build_commit', '?')})",
            }
        )
    return rows


def _first(patterns: tuple[re.Pattern, ...], text: str) -> float | None:
    for p in patterns:
        if m := p.search(text):
            return float(m.group(1))
    return None


def mtmd_timings(stdout: str, stderr: str, wall_s: float) -> dict:
    """llama-mtmd-cli's output → text and stage timings (ms), plus the derived TTFT and decode speed.

    - text: stdout less the newline mtmd-cli prints before the answer and the two it prints at exit (when
      generation stopped at an end-of-generation token, one more "\\n" it printed then stays at the end).

    - load_ms: the text model's load (llama_perf "load time"); the mmproj's load is not reported
      separately, it is inside wall_ms.
    - encode_ms: the audio encoder + projector ("mtmd batch encoding done in N ms").
    - audio_decode_ms: the decoder's prefill over the audio embeddings (already inside prompt_eval_ms).
    - prompt_eval_ms / prompt_tokens: every prompt token through the decoder, text and audio.
    - eval_ms / eval_tokens: one decoder step per generated token (llama_perf "eval time ... runs").
    - ttft_ms = encode_ms + prompt_eval_ms. No decode step is added: the first token is sampled from the
      logits of the prompt's last position, and the sampler's time is not printed by mtmd-cli (it is
      microseconds for greedy). Reading the audio file and computing the mel spectrogram are not timed
      by the tool and are NOT included, so this TTFT slightly favours llama.cpp against ours (which
      starts at the raw audio); wall_ms, process start to exit, bounds everything.
    - decode_tok_s = eval_tokens / eval_ms.
    """
    out: dict = {"text": stdout.removeprefix("\n").removesuffix("\n\n"), "wall_ms": round(1000 * wall_s, 3)}
    m = _LOAD.search(stderr)
    out["load_ms"] = float(m.group(1)) if m else None
    out["encode_ms"] = _first(_ENCODE, stderr)
    m = _MEDIA_DECODE.search(stderr)
    out["audio_decode_ms"] = float(m.group(1)) if m else None
    m = _PROMPT.search(stderr)
    out["prompt_eval_ms"], out["prompt_tokens"] = (float(m.group(1)), int(m.group(2))) if m else (None, None)
    m = _EVAL.search(stderr)
    out["eval_ms"], out["eval_tokens"] = (float(m.group(1)), int(m.group(2))) if m else (None, None)
    ok = out["encode_ms"] is not None and out["prompt_eval_ms"] is not None
    out["ttft_ms"] = round(out["encode_ms"] + out["prompt_eval_ms"], 3) if ok else None
    ok = out["eval_ms"] and out["eval_tokens"]
    out["decode_tok_s"] = round(1000 * out["eval_tokens"] / out["eval_ms"], 3) if ok else None
    return out


def chat_answer(after_prompt: str, prompt: str) -> str:
    """The answer in what llama-mtmd-cli's chat mode printed after its first `> `: the echo of our line,
    a newline, the answer, (a newline if it stopped at an end-of-generation token), then the next `> `."""
    rest = after_prompt.removeprefix(prompt + "\n").removeprefix("\n")
    end = rest.rfind("\n> ")
    return rest[:end] if end >= 0 else rest


def common_prefix(a: Sequence, b: Sequence) -> int:
    """How many leading items two answers share: characters of two texts, or tokens of two id lists."""
    n = 0
    for x, y in zip(a, b, strict=False):  # stops at the shorter text
        if x != y:
            break
        n += 1
    return n


def pre_tokenizer_fallback(tokenizer_json: dict) -> str | None:
    """Answer "qwen2" when a tokenizer.json splits text with exactly Qwen2's regex (and nothing else), else None:
    the converter's answer for a pre-tokenizer hash it does not know (see llama_cpp's module docstring)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    regexes = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    return "qwen2" if regexes == [QWEN2_PRE_REGEX] else None


def last_error_line(stderr: str) -> str:
    """The line of a failed tool's stderr that says why: the last one naming an error, else the last one."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"error|failed|exception|not supported|unknown|invalid", ln, re.IGNORECASE):
            return ln
    return lines[-1] if lines else "(no output on stderr)"
