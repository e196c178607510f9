"""llama.cpp as a benchmark peer: parsing of its tools' output, tool discovery, and one live run.

The parsing tests read output recorded from a real run (tests/data/llama_cpp/, llama.cpp 0c1e570 from
llama-cpp-python 0.3.36, on the tiny "mha" checkpoint with 2 s of speech-like audio, 1 thread):
- bench_tiny_q4_0.json: `llama-bench -m text-Q4_0.gguf -t 1 -r 3 -p 128 -n 32 -o json`
- mtmd_audio_tiny_f16.stdout/.stderr: llama_cpp.run_end_to_end's command (F16, 16 tokens)
- mtmd_chat_tiny_f16.stdout: run_text_only's chat session (banner, `> `, echo, answer, `> `)
The live test needs a build: QAE_LLAMA_CPP=DIR (bench/build_llama_cpp.sh DIR prints it).
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from helpers import signal
from qwen_audio_edge.benchmark import llama_cpp
from qwen_audio_edge.benchmark.llama_cpp import LlamaCppError, find_llama_cpp
from qwen_audio_edge.benchmark.llama_cpp_parse import (
    QWEN2_PRE_REGEX,
    bench_rows,
    chat_answer,
    common_prefix,
    last_error_line,
    mtmd_timings,
    pre_tokenizer_fallback,
)
from qwen_audio_edge.runtime.errors import OptionsError

DATA = Path(__file__).parent / "data" / "llama_cpp"
PROMPT = "What does the person say?"


def _read(name: str) -> str:
    return (DATA / name).read_bytes().decode(errors="replace")  # as llama_cpp._run decodes the tools' output


def test_bench_rows_from_recorded_json():
    rows = bench_rows(_read("bench_tiny_q4_0.json"), "Q4_0")
    assert rows == [
        {
            "quant": "Q4_0",
            "test": "pp128",
            "tokens_per_s": 77876.250088,
            "stddev": 46538.660420,
            "samples": [105004.0, 24138.9, 104486.0],
            "threads": 1,
            "model_size_bytes": 296448,
            "build": "1 (0c1e570)",
        },
        {
            "quant": "Q4_0",
            "test": "tg32",
            "tokens_per_s": 20152.705816,
            "stddev": 12252.700139,
            "samples": [6005.26, 27099.9, 27353.0],
            "threads": 1,
            "model_size_bytes": 296448,
            "build": "1 (0c1e570)",
        },
    ]


def test_mtmd_timings_from_recorded_audio_run():
    t = mtmd_timings(_read("mtmd_audio_tiny_f16.stdout"), _read("mtmd_audio_tiny_f16.stderr"), 0.5)
    assert t == {
        "text": "\ufffd<|audio_bos|>ks osel% sound\ufffd\\5K+",
        "wall_ms": 500.0,
        "load_ms": 11.21,
        "encode_ms": 116.0,
        "audio_decode_ms": 43.0,
        # 815 = 750 audio positions (one whole 30 s window, however short the audio) + 65 text tokens
        "prompt_eval_ms": 189.81,
        "prompt_tokens": 815,
        "eval_ms": 11.65,
        "eval_tokens": 15,
        "ttft_ms": 305.81,  # encode + prompt eval
        "decode_tok_s": 1287.554,  # 15 / 11.65 ms
    }


def test_mtmd_timings_missing_lines_give_none():
    t = mtmd_timings("\nabc\n\n", "unrelated log line\n", 1.0)
    assert t["text"] == "abc"
    assert all(t[k] is None for k in ("load_ms", "encode_ms", "prompt_eval_ms", "eval_tokens", "ttft_ms"))
    assert t["decode_tok_s"] is None


def test_chat_answer_from_recorded_text_session():
    out = _read("mtmd_chat_tiny_f16.stdout")
    after = out[out.index("\n> ") + 3 :]  # run_text_only sends its line after the first `> `
    answer = chat_answer(after, PROMPT)
    # transformers' greedy answer (repetition penalty 1.0, 16 tokens) on this checkpoint, decoded: the same
    assert answer == "h\ufffdN\ufffd\u062dI\ufffdibe\ufffdz\ufffd is\x1b"
    assert common_prefix(answer, "h\ufffdN\ufffdX") == 4
    assert common_prefix("", answer) == 0


def test_last_error_line():
    assert last_error_line("loading\nerror: unknown model architecture: 'x'\ncleanup\n") == (
        "error: unknown model architecture: 'x'"
    )
    assert last_error_line("a\nb\n") == "b"
    assert last_error_line("") == "(no output on stderr)"


def _fake_tools(root: Path, body: str = "exit 0") -> None:
    (root / "bin").mkdir(parents=True)
    for tool in llama_cpp.TOOLS:
        p = root / "bin" / tool
        p.write_text(f"#!/bin/sh\n{body}\n")
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    (root / "convert_hf_to_gguf.py").write_text("")
    (root / "gguf-py").mkdir()
    (root / "VERSION").write_text("llama-cpp-python 0.3.36 (llama.cpp 0c1e570)\n")


def test_missing_tools_say_what_and_how_to_build(tmp_path, monkeypatch):
    with pytest.raises(OptionsError) as e:
        find_llama_cpp(tmp_path)
    msg = str(e.value)
    for name in (*llama_cpp.TOOLS, "convert_hf_to_gguf.py"):
        assert name in msg
    assert "bench/build_llama_cpp.sh" in msg and str(tmp_path) in msg
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(OptionsError, match=r"on PATH; build it with bench/build_llama_cpp\.sh"):
        find_llama_cpp(None)


def test_found_tools_and_a_failing_tool_reports_its_error_line(tmp_path, monkeypatch):
    _fake_tools(tmp_path, body='echo "loading" >&2; echo "error: failed to load model" >&2; exit 3')
    tools = find_llama_cpp(tmp_path)
    assert tools.bench == tmp_path / "bin" / "llama-bench" and tools.gguf_py == tmp_path / "gguf-py"
    assert tools.version == "llama-cpp-python 0.3.36 (llama.cpp 0c1e570)"
    with pytest.raises(LlamaCppError, match=r"llama-bench failed \(exit 3\): error: failed to load model$"):
        llama_cpp.bench_decoder(tools, tmp_path / "text-Q4_0.gguf", threads=1)
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + str(tmp_path))  # the PATH lookup
    (tmp_path / "convert_hf_to_gguf.py").chmod(0o755)
    assert find_llama_cpp(None).mtmd_cli == tmp_path / "bin" / "llama-mtmd-cli"


def test_pre_tokenizer_fallback_only_for_qwen2_regex():
    split = {"type": "Split", "pattern": {"Regex": QWEN2_PRE_REGEX}, "behavior": "Isolated"}
    pre = {"type": "Sequence", "pretokenizers": [split, {"type": "ByteLevel", "use_regex": False}]}
    assert pre_tokenizer_fallback({"pre_tokenizer": pre}) == "qwen2"
    assert pre_tokenizer_fallback({"pre_tokenizer": split}) == "qwen2"
    split["pattern"]["Regex"] = r"\s+"
    assert pre_tokenizer_fallback({"pre_tokenizer": pre}) is None
    assert pre_tokenizer_fallback({}) is None


@pytest.mark.slow
def test_live_convert_bench_and_run(tmp_path):
    """Convert a tiny checkpoint, bench it, run it on 2 s of audio and text-only (QAE_LLAMA_CPP=DIR).

    Measured on the shared, busy 2-core machine: 14 s in all."""
    build = os.environ.get("QAE_LLAMA_CPP")
    if not build:
        pytest.skip("llama.cpp is an optional peer: set QAE_LLAMA_CPP to a build made by bench/build_llama_cpp.sh")
    import soundfile as sf
    import torch

    from qwen_audio_edge.random_checkpoint import build_tiny_checkpoint

    tools = find_llama_cpp(build)
    ckpt = build_tiny_checkpoint(tmp_path / "ckpt", "mha")
    ggufs = llama_cpp.convert_checkpoint(tools, ckpt, tmp_path / "gguf", ("F16", "Q4_0"), threads=1)
    assert set(ggufs.text) == {"F16", "Q4_0"} and ggufs.sizes["Q4_0"] < ggufs.sizes["F16"]

    rows = llama_cpp.bench_decoder(tools, ggufs.text["Q4_0"], threads=1, n_prompt=(32,), n_gen=(8,), repetitions=1)
    assert [(r["quant"], r["test"]) for r in rows] == [("Q4_0", "pp32"), ("Q4_0", "tg8")]
    assert all(r["tokens_per_s"] > 0 for r in rows)

    wav = tmp_path / "a.wav"
    sf.write(wav, signal(2.0), 16000)
    t0 = time.perf_counter()
    e2e = llama_cpp.run_end_to_end(tools, ggufs.text["F16"], ggufs.mmproj, wav, PROMPT, n_predict=8, threads=1)
    assert e2e["prompt_tokens"] == 750 + 65  # one 30 s window of audio positions + the chat turn's text
    assert e2e["encode_ms"] > 0 and e2e["ttft_ms"] > 0 and e2e["eval_tokens"] == 7
    assert e2e["wall_ms"] <= 1000 * (time.perf_counter() - t0)

    # Decoder agreement, text only: llama.cpp F16 vs transformers fp32, greedy, no repetition penalty.
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    text = llama_cpp.run_text_only(tools, ggufs.text["F16"], ggufs.mmproj, PROMPT, n_predict=16, threads=1)["text"]
    proc = AutoProcessor.from_pretrained(str(ckpt))
    model = Qwen2AudioForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    chat = [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
    ids = proc.tokenizer(
        proc.apply_chat_template(chat, add_generation_prompt=True, tokenize=False), return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=16, repetition_penalty=1.0, eos_token_id=None)
    ref = proc.tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    # measured: all 16 tokens agree (the 4 ids past the 366-token vocabulary print nothing in both)
    assert text == ref, (text, ref, common_prefix(text, ref))
