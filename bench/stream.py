"""Streaming latency benchmark: time to first token after the end of speech, by utterance length.

For utterances of 2/5/10/20/29.5 s (espeak-ng speech, repeated to length) on a random checkpoint of the
chosen shape, in one run:
  (a) VAD exact mode: latency from the endpoint decision to the first token, with and without
      speculative encode + prefill in the endpointing silence window;
  (b) push-to-talk: latency from `end()` to the first token — offline `run` (whole utterance at once)
      vs the exact streaming session (prefix prefilled and mel computed while the audio arrived);
  (c) transformers' offline pipeline (processor + generate of one token) as the baseline.
Writes JSON and a PNG plot. Chunked (block-wise encoder) mode is not implemented yet.

    python bench/stream.py --preset mid --out bench/results/cpu/stream_mid
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PRESETS = {"tiny": dict(), "mid": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                       num_attention_heads=8, num_key_value_heads=8, vocab_size=8192)}


def speech(seconds: float, tmp: Path) -> np.ndarray:
    import soundfile as sf
    import soxr

    if shutil.which("espeak-ng") is None:
        raise SystemExit("bench/stream.py needs espeak-ng (Debian package) for real speech")
    wav = tmp / "s.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "The quick brown fox jumps over the lazy dog while the band plays on."], check=True)
    x, sr = sf.read(str(wav), dtype="float32")
    x = soxr.resample(x, sr, 16000).astype(np.float32)
    x = x[np.flatnonzero(np.abs(x) > 1e-3)[0] :]
    reps = int(np.ceil(seconds * 16000 / len(x)))
    return np.tile(x, reps)[: int(seconds * 16000)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mid", choices=sorted(PRESETS))
    # 29.5 s rather than 30: with the VAD's 100 ms pads the utterance must fit one 30 s encoder window,
    # otherwise the forced endpoint (correctly) splits it.
    ap.add_argument("--lengths", default="2,5,10,20,29.5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/cpu/stream_mid")
    a = ap.parse_args()
    from transformers import AutoProcessor, GenerationConfig, Qwen2AudioForConditionalGeneration

    from qwen_audio_edge.export.fixtures import TinyShape, build_tiny_checkpoint
    from qwen_audio_edge.export.package import ExportOptions, export_checkpoint
    from qwen_audio_edge.runtime.generate import SamplingOptions
    from qwen_audio_edge.runtime.pipeline import Pipeline
    from qwen_audio_edge.runtime.stream import StreamSession, VadOptions

    prompt = "What does the person say?"
    one = SamplingOptions(max_new_tokens=1, greedy=True, repetition_penalty=1.0, ignore_eos=True)
    res = {"preset": a.preset, "machine": platform.platform(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
           "torch": torch.__version__, "rows": []}
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        ckpt = build_tiny_checkpoint(tmp / "ckpt", TinyShape(name=a.preset, **PRESETS[a.preset]), max_shard_size="50MB")
        export_checkpoint(ckpt, tmp / "art", ExportOptions(bits=16, progress=False))
        p = Pipeline.from_artifacts(tmp / "art")
        hf = Qwen2AudioForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32).eval()
        proc = AutoProcessor.from_pretrained(str(ckpt))
        p.run(np.zeros(16000, np.float32) + 0.01, prompt, sampling=one)  # warm-up
        for secs in map(float, a.lengths.split(",")):
            x = speech(secs, tmp)
            stream_audio = np.concatenate([np.zeros(8000, np.float32), x, np.zeros(16000, np.float32)])
            row = {"seconds": secs}
            for spec in (True, False):
                vals = []
                for _ in range(a.repeats):
                    s = StreamSession(p, prompt, sampling=one, vad=VadOptions(), speculate=spec)
                    events = []
                    for i in range(0, len(stream_audio), 1600):
                        events += s.feed(stream_audio[i : i + 1600])
                    events += [e for e in [s.end()] if e is not None]
                    longest = max(events, key=lambda e: e.speech_end_s - e.speech_start_s)  # the utterance itself
                    vals.append(longest.to_json()["stream"]["ttft_after_endpoint_ms"])
                row[f"vad_endpoint_to_first_token_ms_{'spec' if spec else 'nospec'}"] = statistics.median(vals)
            off, ptt, ref = [], [], []
            for _ in range(a.repeats):
                off.append(p.run(x, prompt, sampling=one).timings["ttft_ms"])
                s = StreamSession(p, prompt, sampling=one, vad=None)
                for i in range(0, len(x), 1600):
                    s.feed(x[i : i + 1600])
                ptt.append(s.end().to_json()["stream"]["ttft_after_endpoint_ms"])
                text = proc.apply_chat_template([{"role": "user", "content": [{"type": "audio", "audio_url": "x"},
                                                {"type": "text", "text": prompt}]}], add_generation_prompt=True, tokenize=False)
                t0 = time.perf_counter()
                inputs = proc(text=text, audio=[x], sampling_rate=16000, return_tensors="pt")
                with torch.no_grad():
                    hf.generate(**inputs, generation_config=GenerationConfig(max_new_tokens=1, do_sample=False, pad_token_id=0))
                ref.append(1000 * (time.perf_counter() - t0))
            row.update(offline_run_ttft_ms=statistics.median(off), push_to_talk_exact_ttft_ms=statistics.median(ptt),
                       transformers_offline_ttft_ms=statistics.median(ref))
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["seconds"] for r in res["rows"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in [("vad_endpoint_to_first_token_ms_spec", "VAD exact, speculative"),
                       ("vad_endpoint_to_first_token_ms_nospec", "VAD exact, no speculation"),
                       ("push_to_talk_exact_ttft_ms", "push-to-talk exact stream"),
                       ("offline_run_ttft_ms", "offline run"), ("transformers_offline_ttft_ms", "transformers offline")]:
        ax.plot(xs, [r[key] for r in res["rows"]], marker="o", label=label)
    ax.set_xlabel("utterance length (s)")
    ax.set_ylabel("first token after end of speech (ms)")
    ax.set_yscale("log")
    ax.set_title(f"TTFT after end of speech — {a.preset} random model, CPU, {torch.get_num_threads()} threads")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
