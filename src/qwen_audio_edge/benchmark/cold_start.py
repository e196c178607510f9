"""Cold start, as a user meets it: a fresh process from exec to ready and to the first token.

`python -m qwen_audio_edge.benchmark.cold_start ENGINE DIR WAV` (ENGINE: ours | transformers) prints one
JSON line of wall-clock times (time.time(), comparable with the parent's spawn time); `measure_cold_start`
runs it; the child adds its own peak RSS (the kernel's high-water mark). transformers loads the HF
checkpoint folder with from_pretrained, as its users do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def measure_cold_start(engine: str, model_dir: Path, wav: Path, threads: int | None, timeout_s: float = 600) -> dict:
    """Spawn the child, wait for it; {ready_ms, first_token_ms, peak_rss_mib} from the spawn instant."""
    cmd = [sys.executable, "-m", "qwen_audio_edge.benchmark.cold_start", engine, str(model_dir), str(wav)]
    if threads:
        cmd.append(str(threads))
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"engine": engine, "error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        last = (err.strip().splitlines() or ["no output"])[-1][:300]
        return {"engine": engine, "error": f"exit {proc.returncode}: {last}"}
    marks = json.loads(lines[-1])
    return {
        "engine": engine,
        "imports_ms": round(1000 * (marks["imported"] - t0), 1),
        "ready_ms": round(1000 * (marks["ready"] - t0), 1),
        "first_token_ms": round(1000 * (marks["first_token"] - t0), 1),
        "peak_rss_mib": marks.get("peak_rss_mib"),
    }


def _ours(model_dir: Path, wav: Path, threads: int | None) -> None:
    from ..runtime.generate import SamplingOptions
    from ..runtime.pipeline import Pipeline, RuntimeOptions

    imported = time.time()
    p = Pipeline.from_artifacts(model_dir, RuntimeOptions(threads=threads))
    ready = time.time()
    first: list[float] = []
    p.run(
        wav,
        "What does the person say?",
        sampling=SamplingOptions(max_new_tokens=1, greedy=True, ignore_eos=True),
        on_text=lambda _t: first.append(time.time()),
    )
    _emit(imported, ready, first[0] if first else time.time())


def _transformers(model_dir: Path, wav: Path, threads: int | None) -> None:
    import torch
    from transformers import AutoProcessor, GenerationConfig, Qwen2AudioForConditionalGeneration

    from ..runtime.audio import load_audio

    if threads:
        torch.set_num_threads(threads)
    imported = time.time()
    model = Qwen2AudioForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(str(model_dir))
    ready = time.time()
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio", "audio_url": "x"}, {"type": "text", "text": "What?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = proc(text=text, audio=[load_audio(wav, 16000)], sampling_rate=16000, return_tensors="pt")
    with torch.inference_mode():
        model.generate(**inputs, generation_config=GenerationConfig(max_new_tokens=1, do_sample=False, pad_token_id=0))
    _emit(imported, ready, time.time())


def _emit(imported: float, ready: float, first_token: float) -> None:
    """The marks, and this process's own peak RSS: /proc's VmHWM, which starts afresh at exec (getrusage's
    ru_maxrss does not: after fork + exec it still holds the parent's peak at the fork)."""
    peak = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    print(
        json.dumps({"imported": imported, "ready": ready, "first_token": first_token, "peak_rss_mib": peak}), flush=True
    )


if __name__ == "__main__":  # pragma: no cover - run as a child process by measure_cold_start
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    engine, directory, audio = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    n_threads = int(sys.argv[4]) if len(sys.argv) > 4 else None
    (_ours if engine == "ours" else _transformers)(directory, audio, n_threads)
