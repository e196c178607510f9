"""llama.cpp as a peer of our runtime in `qwen-audio-edge bench` (issue #13): convert, bench, run end to end.

llama.cpp is the runtime an appliance builder would pick instead of ours, so the benchmark runs it on the
same checkpoint and audio. It is an optional peer, not a dependency: we drive its command-line tools
(built by bench/build_llama_cpp.sh, or found on PATH) in subprocesses and parse what they print
(llama_cpp_parse.py), so nothing here links to llama.cpp and version skew shows up as a clear error.

Converting a checkpoint runs llama.cpp's own convert_hf_to_gguf.py (text model, then `--mmproj` for the
Whisper-style audio encoder + projector) with the current Python and llama.cpp's vendored gguf-py, through a
small in-process wrapper (_CONVERTER_SHIM) that changes no llama.cpp file and only works around three
things that fail on our random checkpoints, never on the real Qwen2-Audio-7B:
- the BPE pre-tokenizer is identified by hashing the tokens of a test string; a 366-token random vocabulary
  hashes to something unknown and the converter refuses it. When the tokenizer's pre-tokenizer regex is
  exactly Qwen2's, the wrapper answers "qwen2" for an unknown hash (llama.cpp then splits text with the
  same regex); any other tokenizer still fails as upstream does.
- Qwen2Model.set_vocab tries SentencePiece first and expects FileNotFoundError when tokenizer.model is
  absent; without the sentencepiece package it gets ModuleNotFoundError instead. The wrapper raises the
  FileNotFoundError itself when tokenizer.model is absent, so sentencepiece is not needed.
- the mmproj tensor-name map is built for `encoder_layers` blocks and maps Whisper's conv2 as block 2, so
  an encoder with fewer than 3 layers cannot map `audio_tower.conv2.*`; the wrapper builds the map for at
  least 3 blocks (extra names are unused, the GGUF's block count still comes from the config).

llama-mtmd-cli prints through an asynchronous logger that is never flushed at exit, so on small models the
end of the answer and the llama_perf timings are often lost; bench/build_llama_cpp.sh adds the one-line
flush (a build without it gives None for the lost figures, see llama_cpp_parse.mtmd_timings).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.errors import OptionsError, QwenAudioEdgeError
from .llama_cpp_parse import bench_rows, chat_answer, last_error_line, mtmd_timings, pre_tokenizer_fallback

TOOLS = ("llama-bench", "llama-mtmd-cli", "llama-quantize")
CONVERTER = "convert_hf_to_gguf.py"
BUILD_HINT = "build it with bench/build_llama_cpp.sh [DIR] and pass --llama-cpp DIR"
MEDIA_MARKER = "<__media__>"  # mtmd's default marker: where the audio goes in the prompt

_CONVERTER_SHIM = r"""
import json, os, runpy, sys
script, runs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, os.path.dirname(os.path.realpath(script)))
import conversion.base as base
_pre, _sp, _map = base.TextModel.get_vocab_base_pre, base.TextModel._create_vocab_sentencepiece, base.gguf.get_tensor_name_map
def pre(self, tokenizer):
    try:
        return _pre(self, tokenizer)
    except NotImplementedError:
        if not os.environ.get("QAE_GGUF_PRE"):
            raise
        base.logger.warning("qwen-audio-edge: unknown pre-tokenizer hash, regex is Qwen2's: using %r", os.environ["QAE_GGUF_PRE"])
        return os.environ["QAE_GGUF_PRE"]
def sp(self):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError("no tokenizer.model")
    return _sp(self)
def name_map(arch, n_blocks):
    return _map(arch, max(n_blocks, 3) if arch == base.gguf.MODEL_ARCH.MMPROJ else n_blocks)
base.TextModel.get_vocab_base_pre, base.TextModel._create_vocab_sentencepiece = pre, sp
base.gguf.get_tensor_name_map = name_map
for args in runs:
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
"""


class LlamaCppError(QwenAudioEdgeError):
    """A llama.cpp tool failed or timed out; the message carries the tool's own last error line."""


@dataclass(frozen=True)
class LlamaCppTools:
    """Where the llama.cpp tools are. gguf_py is None when the converter must use an installed `gguf`."""

    bench: Path
    mtmd_cli: Path
    quantize: Path
    converter: Path
    gguf_py: Path | None
    version: str


@dataclass(frozen=True)
class GgufSet:
    """One checkpoint in GGUF: the text model per quantization type, the audio mmproj (f16), sizes in bytes."""

    text: dict[str, Path]
    mmproj: Path
    sizes: dict[str, int] = field(default_factory=dict)  # quant name -> bytes, plus "mmproj"


def find_llama_cpp(directory: str | Path | None = None) -> LlamaCppTools:
    """The tools in `directory` (bench/build_llama_cpp.sh's layout, or a llama.cpp checkout with build/bin),
    else on PATH. Call it only when the user asked for llama.cpp: a missing tool is an OptionsError."""
    if directory is not None:
        root = Path(directory).expanduser()
        bins = [root / "bin", root / "build" / "bin", root]
        found = {t: next((b / t for b in bins if (b / t).is_file() and os.access(b / t, os.X_OK)), None) for t in TOOLS}
        conv: Path | None = root / CONVERTER if (root / CONVERTER).is_file() else None
        where = f"in {root}"
    else:
        found = {t: Path(p) if (p := shutil.which(t)) else None for t in TOOLS}
        conv = Path(p) if (p := shutil.which(CONVERTER)) else None
        where = "on PATH"
    missing = [t for t, p in found.items() if p is None] + ([CONVERTER] if conv is None else [])
    if missing or conv is None:
        raise OptionsError(f"llama.cpp: {', '.join(missing)} not found {where}; {BUILD_HINT}")
    gguf_py = next((d for d in (conv.parent / "gguf-py", conv.resolve().parent / "gguf-py") if d.is_dir()), None)
    paths = {t: p for t, p in found.items() if p is not None}
    return LlamaCppTools(
        bench=paths["llama-bench"],
        mtmd_cli=paths["llama-mtmd-cli"],
        quantize=paths["llama-quantize"],
        converter=conv,
        gguf_py=gguf_py,
        version=_version(paths["llama-mtmd-cli"], conv.parent),
    )


def _version(mtmd_cli: Path, root: Path) -> str:
    """The build script's VERSION file, else what the tool itself says (`--version`: "version: N (commit)")."""
    if (root / "VERSION").is_file():
        return (root / "VERSION").read_text().strip()
    try:
        res = subprocess.run([str(mtmd_cli), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    line = next((ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("version:")), "")
    return "llama.cpp " + line.removeprefix("version:").strip() if line else "unknown"


def _run(cmd: list[str], *, timeout: float, env: dict | None = None, name: str = "") -> tuple[str, str, float]:
    """Run a tool; return (stdout, stderr, wall seconds). Failure or timeout -> LlamaCppError, one line."""
    name = name or Path(cmd[0]).name
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise LlamaCppError(f"llama.cpp: {name} timed out after {timeout:.0f} s") from e
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise LlamaCppError(f"llama.cpp: {name} failed (exit {res.returncode}): {last_error_line(res.stderr)}")
    return res.stdout, res.stderr, wall


def convert_checkpoint(
    tools: LlamaCppTools,
    hf_dir: str | Path,
    work_dir: str | Path,
    quants: tuple[str, ...] = ("F16", "Q4_0", "Q4_K_M"),
    *,
    threads: int | None = None,
    timeout: float = 1800,
) -> GgufSet:
    """Convert a Hugging Face Qwen2-Audio checkpoint to GGUF: text model F16 (quantized from it by
    llama-quantize to the other `quants`) and the audio encoder + projector as an f16 mmproj."""
    hf_dir, work = Path(hf_dir), Path(work_dir)
    if not (hf_dir / "config.json").is_file():
        raise OptionsError(f"llama.cpp: {hf_dir} is not a Hugging Face checkpoint (no config.json)")
    work.mkdir(parents=True, exist_ok=True)
    f16, mmproj = work / "text-F16.gguf", work / "mmproj-F16.gguf"
    runs = [
        [str(hf_dir), "--outtype", "f16", "--outfile", str(f16)],
        [str(hf_dir), "--mmproj", "--outtype", "f16", "--outfile", str(mmproj)],
    ]
    env = dict(os.environ)
    if tools.gguf_py is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tools.gguf_py), env.get("PYTHONPATH")]))
    try:
        tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    except (OSError, ValueError):
        tokenizer = {}
    if fallback := pre_tokenizer_fallback(tokenizer):
        env["QAE_GGUF_PRE"] = fallback
    cmd = [sys.executable, "-c", _CONVERTER_SHIM, str(tools.converter), json.dumps(runs)]
    _run(cmd, timeout=timeout, env=env, name=CONVERTER)
    text = {"F16": f16}
    for q in quants:
        if q != "F16":
            text[q] = work / f"text-{q}.gguf"
            extra = [str(threads)] if threads else []
            _run([str(tools.quantize), str(f16), str(text[q]), q, *extra], timeout=timeout)
    if "F16" not in quants:
        del text["F16"]
    sizes = {q: p.stat().st_size for q, p in text.items()} | {"mmproj": mmproj.stat().st_size}
    return GgufSet(text=text, mmproj=mmproj, sizes=sizes)


def bench_decoder(
    tools: LlamaCppTools,
    gguf: str | Path,
    *,
    threads: int,
    n_prompt: tuple[int, ...] = (128, 512),
    n_gen: tuple[int, ...] = (32, 256),
    repetitions: int = 3,
    quant: str | None = None,
    poll: int | None = None,
    timeout: float = 1800,
) -> list[dict]:
    """llama-bench's prefill (ppN) and decode (tgN) tokens/s of a text GGUF: one row per test
    (llama_cpp_parse.bench_rows). `quant` labels the rows (default: the file name's `text-<quant>`).

    `poll` is llama.cpp's --poll (0-100, how hard idle workers spin; None: the tool's default, 50). On a
    busy machine spinning collapses with 2+ threads (measured on the shared 2-core box, mid shape, Q4_0,
    2 threads: tg32 0.7 tok/s at poll 50, 43 at poll 0, and 153 with 1 thread)."""
    gguf = Path(gguf)
    label = quant or gguf.stem.removeprefix("text-")
    cmd = [str(tools.bench), "-m", str(gguf), "-t", str(threads), "-r", str(repetitions), "-o", "json"]
    cmd += ["-p", ",".join(map(str, n_prompt)) or "0", "-n", ",".join(map(str, n_gen)) or "0"]
    cmd += ["--poll", str(poll)] if poll is not None else []
    stdout, _, _ = _run(cmd, timeout=timeout)
    return bench_rows(stdout, label)


def mtmd_command(
    tools: LlamaCppTools, gguf: Path, mmproj: Path, n_predict: int, threads: int, poll: int | None = None
) -> list[str]:
    """llama-mtmd-cli, greedy. `--repeat-penalty 1.0` matters: the converter copies generation_config.json's
    sampling defaults into the GGUF (general.sampling.*) and the tool applies them; `--jinja` renders the
    checkpoint's own chat template (the default fallback drops Qwen2-Audio's system turn); `-lv 4` lets
    libllama's INFO lines (the llama_perf timings) through."""
    cmd = [str(tools.mtmd_cli), "-m", str(gguf), "--mmproj", str(mmproj), "-n", str(n_predict), "-t", str(threads)]
    cmd += ["--temp", "0", "--top-k", "1", "--seed", "0", "--repeat-penalty", "1.0", "--jinja", "-lv", "4"]
    return cmd + (["--poll", str(poll)] if poll is not None else [])


def run_end_to_end(
    tools: LlamaCppTools,
    gguf: str | Path,
    mmproj: str | Path,
    wav_path: str | Path,
    prompt: str,
    *,
    n_predict: int,
    threads: int,
    poll: int | None = None,
    timeout: float = 600,
) -> dict:
    """One cold llama-mtmd-cli process (start -> exit) on one audio file, greedy: the generated text and
    stage timings; see llama_cpp_parse.mtmd_timings for what each figure means and how TTFT is derived.

    The user turn is `Audio 1: <audio>\\n{prompt}`, as Qwen2-Audio's chat template (and our runtime) writes
    it; mtmd adds <|audio_bos|>/<|audio_eos|> around the audio. The text cannot be expected to match ours:
    llama.cpp's Qwen2-Audio path encodes whole 30 s windows of mel frames without an attention mask and
    prefills all 750 positions of each window (2 s of audio: 750 audio tokens; transformers and our runtime
    keep the 50 that cover the audio). run_text_only checks the decoders against each other instead."""
    wav = Path(wav_path)
    if not wav.is_file():
        raise OptionsError(f"llama.cpp: audio file {wav} not found")
    cmd = mtmd_command(tools, Path(gguf), Path(mmproj), n_predict, threads, poll)
    cmd += ["--audio", str(wav), "-p", f"Audio 1: {MEDIA_MARKER}\n{prompt}"]
    stdout, stderr, wall = _run(cmd, timeout=timeout)
    return mtmd_timings(stdout, stderr, wall) | {"threads": threads, "poll": poll, "n_predict": n_predict}


def run_text_only(
    tools: LlamaCppTools,
    gguf: str | Path,
    mmproj: str | Path,
    prompt: str,
    *,
    n_predict: int,
    threads: int,
    poll: int | None = None,
    timeout: float = 300,
) -> dict:
    """Greedy answer to a text-only user turn (one line): the decoder-only agreement check against ours.

    mtmd-cli has no single-turn text mode, so this drives its chat mode: wait for its `> ` prompt (so its
    echo of our line cannot interleave with its banner), send the line and close stdin (EOF ends the chat)."""
    if "\n" in prompt:
        raise OptionsError("llama.cpp: a text-only prompt must be one line (llama-mtmd-cli chat mode)")
    cmd = mtmd_command(tools, Path(gguf), Path(mmproj), n_predict, threads, poll)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        try:
            _read_until(proc.stdout.fileno(), b"\n> ", t0 + timeout)
            rest, _ = proc.communicate(prompt.encode() + b"\n", timeout=max(1.0, t0 + timeout - time.perf_counter()))
        except (subprocess.TimeoutExpired, TimeoutError) as e:
            proc.kill()
            proc.wait()
            raise LlamaCppError(f"llama.cpp: llama-mtmd-cli timed out after {timeout:.0f} s") from e
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise LlamaCppError(f"llama.cpp: llama-mtmd-cli failed (exit {proc.returncode}): {last_error_line(stderr)}")
    out = mtmd_timings("", stderr, time.perf_counter() - t0)
    return out | {"text": chat_answer(rest.decode(errors="replace"), prompt), "threads": threads}


def _read_until(fd: int, marker: bytes, deadline: float) -> bytes:
    """Read a pipe until what was read ends with `marker`; TimeoutError at `deadline`, EOFError at EOF."""
    buf = b""
    while not buf.endswith(marker):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.perf_counter()))
        if not ready:
            raise TimeoutError
        chunk = os.read(fd, 65536)
        if not chunk:
            raise LlamaCppError("llama.cpp: llama-mtmd-cli exited before its chat prompt")
        buf += chunk
    return buf
