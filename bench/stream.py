"""Streaming latency benchmark: time to first token after the end of speech, by utterance length.

For utterances of 2/5/10/20/30 s (espeak-ng speech, repeated to length) on a random checkpoint of the
chosen shape, in one run:
  (a) VAD: latency from the endpoint decision to the first token — exact mode with and without
      speculative encode + prefill in the endpointing silence window, and chunked mode (speculative);
      the VAD rows use at most 29.5 s of speech, since with the 100 ms pads a 30 s utterance would
      exceed one encoder window and (correctly) be cut by the forced endpoint;
  (b) push-to-talk: latency from `end()` to the first token — offline `run` (whole utterance at once)
      vs the exact streaming session (prefix prefilled and mel computed while the audio arrived) vs
      the chunked session (every finished 2 s block already encoded and prefilled);
  (c) transformers' offline pipeline (processor + generate of one token) as the baseline;
  and the chunked mode's fidelity to exact mode on the same utterance (audio-embedding cosine, top-1
  agreement and KL over 32 teacher-forced tokens, as `compare --chunked` reports).
Audio is fed as fast as possible in (a) and (b), so "while the person speaks" work is excluded by
construction; the real-time rows (--realtime-lengths) feed at real-time pace, as a microphone does,
and report the wall time from the true end of speech to the first token, split into the VAD's own
wait (min silence + its hangover) and the compute beyond it. Writes JSON and a PNG plot.

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


def noisy_control(base_cls):
    """A control candidate: exact-mode audio embeddings plus noise orthogonal to each token's embedding,
    scaled so that every token's cosine to exact mode is `cosine`. Comparing it with exact mode shows how
    much of the chunked mode's top-1/KL movement any perturbation of that size causes on this model."""

    class NoisyExact(base_cls):
        def __init__(self, pipeline, cosine: float, seed: int = 0):
            super().__init__(pipeline=pipeline)
            self.cosine, self.seed = cosine, seed
            self.name += f" (exact + orthogonal noise, cosine {cosine:.4f})"

        def prompt(self, audio, text):
            ids, a = super().prompt(audio, text)
            noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(self.seed))
            noise -= (noise * a).sum(-1, keepdim=True) / (a * a).sum(-1, keepdim=True) * a
            theta = float(np.arccos(self.cosine))
            scale = a.norm(dim=-1, keepdim=True) * np.tan(theta) / noise.norm(dim=-1, keepdim=True)
            return ids, a + scale * noise

    return NoisyExact


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mid", choices=sorted(PRESETS))
    # 29.5 s rather than 30: with the VAD's 100 ms pads the utterance must fit one 30 s encoder window,
    # otherwise the forced endpoint (correctly) splits it.
    ap.add_argument("--lengths", default="2,5,10,20,30")
    ap.add_argument("--chunk-seconds", type=float, default=2.0)
    ap.add_argument("--lookahead-seconds", type=float, default=0.5, help="chunked mode's look-ahead per block")
    ap.add_argument("--ptt-only", action="store_true",
                    help="only the push-to-talk rows (exact and chunked stream, offline run): the flatness check")
    ap.add_argument("--realtime-lengths", default="5,29.5",
                    help="utterances also fed at real-time pace (VAD, speculative): wall time from the true end of "
                    "speech to the first token, and how much of it is compute beyond the VAD's own wait")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/cpu/stream_mid")
    a = ap.parse_args()
    from transformers import AutoProcessor, GenerationConfig, Qwen2AudioForConditionalGeneration

    from qwen_audio_edge.random_checkpoint import TinyShape, build_tiny_checkpoint
    from qwen_audio_edge.export.package import ExportOptions, export_checkpoint
    from qwen_audio_edge.runtime.generate import SamplingOptions
    from qwen_audio_edge.runtime.pipeline import Pipeline
    from qwen_audio_edge.evaluation.compare import OurModel, compare
    from qwen_audio_edge.runtime.stream import StreamOptions, StreamSession, VadOptions

    prompt = "What does the person say?"
    one = SamplingOptions(max_new_tokens=1, greedy=True, repetition_penalty=1.0, ignore_eos=True)
    res = {"preset": a.preset, "machine": platform.platform(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
           "load_average_at_start": __import__("os").getloadavg(),
           "torch": torch.__version__, "rows": []}
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        ckpt = build_tiny_checkpoint(tmp / "ckpt", TinyShape(name=a.preset, **PRESETS[a.preset]), max_shard_size="50MB")
        export_checkpoint(ckpt, tmp / "art", ExportOptions(bits=16, progress=False))
        p = Pipeline.from_artifacts(tmp / "art")
        hf = Qwen2AudioForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32).eval()
        proc = AutoProcessor.from_pretrained(str(ckpt))
        p.run(np.zeros(16000, np.float32) + 0.01, prompt, sampling=one)  # warm-up
        chunked = StreamOptions(mode="chunked", chunk_seconds=a.chunk_seconds, lookahead_seconds=a.lookahead_seconds)

        def vad_latency(audio: np.ndarray, options: StreamOptions) -> float:
            s = StreamSession(p, prompt, sampling=one, vad=VadOptions(), options=options)
            events = []
            for i in range(0, len(audio), 1600):
                events += s.feed(audio[i : i + 1600])
            events += [e for e in [s.end()] if e is not None]
            longest = max(events, key=lambda e: e.speech_end_s - e.speech_start_s)  # the utterance itself
            return longest.to_json()["stream"]["ttft_after_endpoint_ms"]

        def push_to_talk(x: np.ndarray, options: StreamOptions) -> float:
            s = StreamSession(p, prompt, sampling=one, vad=None, options=options)
            for i in range(0, len(x), 1600):
                s.feed(x[i : i + 1600])
            return s.end().to_json()["stream"]["ttft_after_endpoint_ms"]

        def realtime(audio: np.ndarray, speech_end_s: float, options: StreamOptions) -> dict:
            """Feed at real-time pace; audio time t arrives at wall time t0 + t (what a microphone does)."""
            s = StreamSession(p, prompt, sampling=one, vad=VadOptions(), options=options)
            events = []
            t0 = time.perf_counter()
            for i in range(0, len(audio), 1600):
                time.sleep(max(0.0, (i + 1600) / 16000 - (time.perf_counter() - t0)))
                events += s.feed(audio[i : i + 1600])
            ev = max(events, key=lambda e: e.speech_end_s - e.speech_start_s)
            user_ms = 1000 * (ev.first_token_wall - (t0 + speech_end_s))
            vad_wait_ms = 1000 * (ev.decided_at_s - speech_end_s)  # audio the VAD needs after speech before deciding
            return {"end_of_speech_to_first_token_ms": user_ms, "vad_decision_wait_ms": vad_wait_ms,
                    "beyond_vad_wait_ms": user_ms - vad_wait_ms, "speculative": ev.result.timings["speculative"],
                    "lag_s": ev.lag_s}

        for secs in map(float, a.realtime_lengths.split(",")) if a.realtime_lengths and not a.ptt_only else []:
            x = speech(secs, tmp)
            audio = np.concatenate([np.zeros(8000, np.float32), x, np.zeros(16000, np.float32)])
            row = {"seconds": secs}
            for key, options in [("exact", StreamOptions()), ("chunked", chunked)]:
                row[key] = realtime(audio, 0.5 + secs, options)
            res.setdefault("realtime_rows", []).append(row)
            print(json.dumps(row), flush=True)

        for secs in map(float, a.lengths.split(",")):
            x = speech(secs, tmp)
            vad_secs = min(secs, 29.5)
            stream_audio = np.concatenate([np.zeros(8000, np.float32), x[: int(vad_secs * 16000)], np.zeros(16000, np.float32)])
            row = {"seconds": secs, "vad_speech_seconds": vad_secs}
            if a.ptt_only:
                samples = {k: [] for k in ("offline_run_ttft_ms", "push_to_talk_exact_ttft_ms", "push_to_talk_chunked_ttft_ms")}
                for _ in range(a.repeats):
                    samples["offline_run_ttft_ms"].append(p.run(x, prompt, sampling=one).timings["ttft_ms"])
                    samples["push_to_talk_exact_ttft_ms"].append(push_to_talk(x, StreamOptions()))
                    samples["push_to_talk_chunked_ttft_ms"].append(push_to_talk(x, chunked))
                row.update({k: statistics.median(v) for k, v in samples.items()})
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
                continue
            for key, options in [("vad_endpoint_to_first_token_ms_spec", StreamOptions()),
                                 ("vad_endpoint_to_first_token_ms_nospec", StreamOptions(speculate=False)),
                                 ("vad_chunked_endpoint_to_first_token_ms_spec", chunked)]:
                row[key] = statistics.median(vad_latency(stream_audio, options) for _ in range(a.repeats))
            off, ptt, ptt_chunked, ref = [], [], [], []
            for _ in range(a.repeats):
                off.append(p.run(x, prompt, sampling=one).timings["ttft_ms"])
                ptt.append(push_to_talk(x, StreamOptions()))
                ptt_chunked.append(push_to_talk(x, chunked))
                text = proc.apply_chat_template([{"role": "user", "content": [{"type": "audio", "audio_url": "x"},
                                                {"type": "text", "text": prompt}]}], add_generation_prompt=True, tokenize=False)
                t0 = time.perf_counter()
                inputs = proc(text=text, audio=[x], sampling_rate=16000, return_tensors="pt")
                with torch.no_grad():
                    hf.generate(**inputs, generation_config=GenerationConfig(max_new_tokens=1, do_sample=False, pad_token_id=0))
                ref.append(1000 * (time.perf_counter() - t0))
            fid = compare(OurModel(pipeline=p), OurModel(pipeline=p, chunk_seconds=a.chunk_seconds), [x], prompt, 32)
            control = compare(OurModel(pipeline=p), noisy_control(OurModel)(p, min(fid["audio_cosine_mean"], 0.999999)), [x], prompt, 32)
            row.update(offline_run_ttft_ms=statistics.median(off), push_to_talk_exact_ttft_ms=statistics.median(ptt),
                       push_to_talk_chunked_ttft_ms=statistics.median(ptt_chunked),
                       transformers_offline_ttft_ms=statistics.median(ref),
                       chunked_fidelity={"audio_cosine_mean": fid["audio_cosine_mean"], "audio_cosine_min": fid["audio_cosine_min"],
                                         "top1_agreement_32": fid["top1_agreement"], "mean_kl_32": fid["mean_kl"],
                                         "noise_control_top1_agreement_32": control["top1_agreement"],
                                         "noise_control_mean_kl_32": control["mean_kl"]})
            p.cache = p.decoder.setup_cache(p.max_context)
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
        rows = res["rows"]
        by_len = {r["seconds"]: r for r in rows}
        if 5.0 in by_len and 30.0 in by_len:
            res["chunked_flatness_30s_over_5s"] = by_len[30.0]["push_to_talk_chunked_ttft_ms"] / by_len[5.0]["push_to_talk_chunked_ttft_ms"]
        res["chunk_seconds"] = a.chunk_seconds
        res["lookahead_seconds"] = a.lookahead_seconds
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
                       ("vad_chunked_endpoint_to_first_token_ms_spec", "VAD chunked, speculative"),
                       ("push_to_talk_exact_ttft_ms", "push-to-talk exact stream"),
                       ("push_to_talk_chunked_ttft_ms", f"push-to-talk chunked ({a.chunk_seconds:g} s blocks)"),
                       ("offline_run_ttft_ms", "offline run"), ("transformers_offline_ttft_ms", "transformers offline")]:
        if all(key in r for r in res["rows"]):
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
