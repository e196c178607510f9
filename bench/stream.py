"""Streaming latency benchmark: what a user waits for after they stop speaking, by utterance length and mode.

On a random checkpoint of the chosen shape (exported fp32: ONNX encoder + our decoder), with espeak-ng
speech repeated to 2/5/10/20/30 s, one JSON (and a PNG plot) holds, per utterance length:

  realtime_rows (the HEADLINE): audio fed at real-time pace in 100 ms chunks, as a microphone delivers it,
      VAD on (silero, default VadOptions), speculative encode + prefill on: wall time from the true end
      of speech (the last audible sample) to the first token, per mode (exact, chunked; --realtime-modes
      adds exact-nospec). Components: the VAD's own wait (audio it needs after speech before it decides:
      min silence + its hangover), the decision's audio arriving in its 100 ms chunk and feed()'s work on
      it, and the endpoint decision → first token compute (the three add up to the headline), and how
      far the session lagged behind real time at the endpoint (`lag_s`: work that did not fit while the
      person spoke). Medians of --realtime-repeats, with min/max.
  rows[].endpoint_decision_to_first_token_ms_* (a COMPONENT, not a user wait): the same VAD sessions fed
      as fast as possible, from the moment the endpoint is decided to the first token. With speculation
      the encoder and prefill already ran in the endpointing silence window, so what remains is an argmax
      over logits that already exist; without speculation it is the whole encode + prefill.
  rows[].push_to_talk_*_ttft_ms: push-to-talk, `end()` → first token, audio fed as fast as possible: the
      exact stream (mel and prompt prefix done while the audio arrived) and the chunked stream (every
      finished block also encoded and prefilled).
  rows[].offline_run_ttft_ms and rows[].transformers_offline_ttft_ms: the whole utterance at once —
      our offline `run` (mel + encoder + prefill + first token) and transformers' offline pipeline
      (processor + generate of one token) on the same checkpoint, both fp32 (their first tokens are
      checked equal first: `first_token_equal`); `offline_run_over_transformers` > 1 means we are slower.
  rows[].chunked_fidelity: chunked vs exact mode on the same utterance (audio-embedding cosine, top-1
      agreement and KL over 32 teacher-forced tokens, as `compare --chunked` reports), with a noise
      control of the same cosine (these random models amplify any perturbation).

The VAD rows use at most 29.5 s of speech (with the VAD's 100 ms pads a 30 s utterance would exceed one
encoder window and be cut by the forced endpoint). Chunked mode uses the runtime's default rule unless
--chunk-seconds / --lookahead-seconds say otherwise. `--parts` picks sections (`--ptt-only` = ptt).

    python bench/stream.py --preset mid --out bench/results/cpu/stream_mid                      # everything
    python bench/stream.py --preset mid --ptt-only --out bench/results/cpu/stream_mid_ptt       # push-to-talk only
    python bench/stream.py --preset tiny --lengths 2,5 --repeats 1 --realtime-repeats 1 --out /tmp/s   # check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import environment, write_json

PRESETS = {
    "tiny": {},
    "mid": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": 8192,
    },
}
PARTS = ("realtime", "fast", "ptt", "baseline", "fidelity")
CHUNK = 1600  # samples per fed chunk: 100 ms at 16 kHz
LEAD_S, TAIL_S = 0.5, 1.0  # silence before and after the speech in the VAD rows
MAX_VAD_SPEECH_S = 29.5

DEFINITIONS = {
    "end_of_speech_to_first_token_ms": "HEADLINE. Real-time feed (100 ms chunks at real-time pace), VAD on: wall time "
    "from the last audible sample of the speech to the first token",
    "vad_decision_wait_ms": "part 1 of the headline: audio time from the end of speech to the point where the VAD "
    "decides the endpoint (min silence + its hangover, in 32 ms VAD frames); no compute removes it",
    "decision_arrival_and_feed_ms": "part 2: from that audio point's real time to the decision's wall time: the rest "
    "of its 100 ms chunk arriving, then feed()'s work on it (and any lag)",
    "endpoint_decision_to_first_token_ms": "part 3, a COMPONENT: wall time from the endpoint decision to the first token "
    "(with speculation: an argmax over logits already computed)",
    "beyond_vad_wait_ms": "parts 2 + 3: what the user waits for beyond the VAD's own wait",
    "lag_s": "how far the session was behind real time at the endpoint (work that did not fit while speaking)",
    "endpoint_decision_to_first_token_ms_exact_spec": "COMPONENT, VAD session fed as fast as possible, exact mode, "
    "speculative encode + prefill: endpoint decision → first token",
    "endpoint_decision_to_first_token_ms_exact_nospec": "the same without speculation (encode + prefill after the decision)",
    "endpoint_decision_to_first_token_ms_chunked_spec": "the same, chunked mode, speculative",
    "push_to_talk_exact_ttft_ms": "push-to-talk, audio fed as fast as possible: end() → first token, exact stream",
    "push_to_talk_chunked_ttft_ms": "the same, chunked stream",
    "offline_run_ttft_ms": "our offline run of the whole utterance: mel + encoder + prefill → first token",
    "transformers_offline_ttft_ms": "transformers' offline pipeline on the same fp32 checkpoint: processor + generate of "
    "one token (the baseline)",
    "offline_run_over_transformers": "offline_run_ttft_ms / transformers_offline_ttft_ms (> 1: we are slower)",
}


def speech(seconds: float, tmp: Path) -> np.ndarray:
    import soundfile as sf
    import soxr

    if shutil.which("espeak-ng") is None:
        raise SystemExit("bench/stream.py needs espeak-ng (Debian package) for real speech")
    wav = tmp / "s.wav"
    subprocess.run(
        ["espeak-ng", "-w", str(wav), "The quick brown fox jumps over the lazy dog while the band plays on."],
        check=True,
    )
    x, sr = sf.read(str(wav), dtype="float32")
    x = soxr.resample(x, sr, 16000).astype(np.float32)
    x = x[np.flatnonzero(np.abs(x) > 1e-3)[0] :]
    reps = int(np.ceil(seconds * 16000 / len(x)))
    return np.tile(x, reps)[: int(seconds * 16000)]


def last_audible_s(x: np.ndarray) -> float:
    """Audio time just after the last audible sample (|x| > 1e-3): where the speech really ends."""
    return (int(np.flatnonzero(np.abs(x) > 1e-3)[-1]) + 1) / 16000


def spread(samples: list[float]) -> dict:
    """Median with min/max and every sample (so a reader sees how much the figure moved between runs)."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


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


class Bench:
    """The pipeline, the transformers baseline and the session options shared by every measurement."""

    def __init__(self, p, hf, proc, prompt: str, chunked_options, vad_options):
        from qwen_audio_edge.runtime.generate import SamplingOptions
        from qwen_audio_edge.runtime.stream import StreamOptions

        self.p, self.hf, self.proc, self.prompt = p, hf, proc, prompt
        self.one = SamplingOptions(max_new_tokens=1, greedy=True, repetition_penalty=1.0, ignore_eos=True)
        self.modes = {
            "exact": StreamOptions(),
            "exact-nospec": StreamOptions(speculate=False),
            "chunked": chunked_options,
        }
        self.vad = vad_options

    def session(self, mode: str, vad: bool):
        from qwen_audio_edge.runtime.stream import StreamSession

        return StreamSession(
            self.p, self.prompt, sampling=self.one, vad=self.vad if vad else None, options=self.modes[mode]
        )

    def realtime(self, audio: np.ndarray, speech_end_s: float, mode: str) -> dict:
        """Feed at real-time pace: audio time t arrives at wall time t0 + t, in 100 ms chunks (a microphone)."""
        s = self.session(mode, vad=True)
        events = []
        t0 = time.perf_counter()
        for i in range(0, len(audio), CHUNK):
            time.sleep(max(0.0, (i + CHUNK) / 16000 - (time.perf_counter() - t0)))
            events += s.feed(audio[i : i + CHUNK])
        if not events:
            raise SystemExit(
                f"bench/stream.py: the VAD found no endpoint in the {TAIL_S} s of silence after the speech"
            )
        ev = max(
            events, key=lambda e: e.speech_end_s
        )  # the utterance that ends with the speech: what the user waits for
        # the headline and its three parts, which add up to it exactly
        user_ms = 1000 * (ev.first_token_wall - (t0 + speech_end_s))
        vad_wait_ms = 1000 * (ev.decided_at_s - speech_end_s)
        arrival_ms = 1000 * (ev.endpoint_wall - (t0 + ev.decided_at_s))
        return {
            "end_of_speech_to_first_token_ms": user_ms,
            "vad_decision_wait_ms": vad_wait_ms,
            "decision_arrival_and_feed_ms": arrival_ms,
            "endpoint_decision_to_first_token_ms": 1000 * (ev.first_token_wall - ev.endpoint_wall),
            "beyond_vad_wait_ms": user_ms - vad_wait_ms,
            "speculative": ev.result.timings.get("speculative"),
            "lag_s": ev.lag_s,
            "segments": len(events),
        }

    def fast_vad(self, audio: np.ndarray, mode: str) -> float:
        """Endpoint decision → first token, audio fed as fast as possible (a component)."""
        s = self.session(mode, vad=True)
        events = []
        for i in range(0, len(audio), CHUNK):
            events += s.feed(audio[i : i + CHUNK])
        events += [e for e in [s.end()] if e is not None]
        return max(events, key=lambda e: e.speech_end_s - e.speech_start_s).to_json()["stream"][
            "ttft_after_endpoint_ms"
        ]

    def push_to_talk(self, x: np.ndarray, mode: str) -> float:
        s = self.session(mode, vad=False)
        for i in range(0, len(x), CHUNK):
            s.feed(x[i : i + CHUNK])
        return s.end().to_json()["stream"]["ttft_after_endpoint_ms"]

    def transformers_offline(self, x: np.ndarray) -> tuple[float, int]:
        """transformers' processor + generate of one token: (ms, the token)."""
        from transformers import GenerationConfig

        text = self.proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "audio", "audio_url": "x"}, {"type": "text", "text": self.prompt}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        t0 = time.perf_counter()
        inputs = self.proc(text=text, audio=[x], sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            out = self.hf.generate(
                **inputs, generation_config=GenerationConfig(max_new_tokens=1, do_sample=False, pad_token_id=0)
            )
        return 1000 * (time.perf_counter() - t0), int(out[0, -1])


def plot(res: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    rt = res.get("realtime_rows", [])
    for mode in res.get("realtime_modes", []):
        pts = [(r["seconds"], r[mode]["end_of_speech_to_first_token_ms"]) for r in rt if mode in r]
        if pts:
            ax.plot(
                *zip(*pts, strict=True),
                marker="s",
                linewidth=2.5,
                label=f"end of speech → first token, real time, VAD, {mode}",
            )
    xs = [r["seconds"] for r in res["rows"]]
    for key, label in [
        ("endpoint_decision_to_first_token_ms_exact_spec", "component: endpoint decision → first token (exact, spec.)"),
        (
            "endpoint_decision_to_first_token_ms_exact_nospec",
            "component: endpoint decision → first token (exact, no spec.)",
        ),
        ("push_to_talk_exact_ttft_ms", "push-to-talk end() → first token, exact stream"),
        ("push_to_talk_chunked_ttft_ms", "push-to-talk end() → first token, chunked stream"),
        ("offline_run_ttft_ms", "offline run"),
        ("transformers_offline_ttft_ms", "transformers offline"),
    ]:
        if xs and all(key in r for r in res["rows"]):
            ax.plot(xs, [r[key] for r in res["rows"]], marker="o", linewidth=1, label=label)
    ax.set_xlabel("utterance length (s)")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6.5)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    from qwen_audio_edge.runtime.chunked import DEFAULT_CHUNK_S, DEFAULT_LOOKAHEAD_S

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mid", choices=sorted(PRESETS))
    ap.add_argument("--lengths", default="2,5,10,20,30", help="utterance lengths (s) of the per-length rows")
    ap.add_argument(
        "--chunk-seconds", type=float, default=DEFAULT_CHUNK_S, help="chunked mode's block (runtime default)"
    )
    ap.add_argument(
        "--lookahead-seconds",
        type=float,
        default=DEFAULT_LOOKAHEAD_S,
        help="chunked mode's look-ahead per block (runtime default)",
    )
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of sections: {', '.join(PARTS)}")
    ap.add_argument("--ptt-only", action="store_true", help="only the push-to-talk rows: --parts ptt")
    ap.add_argument(
        "--realtime-lengths",
        default=None,
        help=f"utterances fed at real-time pace (default: --lengths, 30 s as {MAX_VAD_SPEECH_S} s)",
    )
    ap.add_argument("--realtime-modes", default="exact,chunked", help="exact, chunked, exact-nospec")
    ap.add_argument("--realtime-repeats", type=int, default=3, help="each costs the utterance's own duration")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench/results/cpu/stream_mid", help="path without suffix: writes .json and .png")
    a = ap.parse_args()
    # chunked mode warns on every session that it is approximate: known here (its fidelity is a section)
    warnings.filterwarnings("ignore", message="chunked stream mode is approximate")
    parts = ["ptt"] if a.ptt_only else a.parts.split(",")
    if unknown := [x for x in parts if x not in PARTS]:
        ap.error(f"--parts: unknown {unknown}; choose from {PARTS}")
    modes = a.realtime_modes.split(",")
    if unknown := [m for m in modes if m not in ("exact", "chunked", "exact-nospec")]:
        ap.error(f"--realtime-modes: unknown {unknown}")
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    from qwen_audio_edge.evaluation.compare import OurModel, compare
    from qwen_audio_edge.export.package import ExportOptions, export_checkpoint
    from qwen_audio_edge.random_checkpoint import TinyShape, build_tiny_checkpoint
    from qwen_audio_edge.runtime.pipeline import Pipeline
    from qwen_audio_edge.runtime.stream import StreamOptions, VadOptions

    prompt = "What does the person say?"
    env = environment(("numpy", "transformers", "onnxruntime", "silero-vad"))
    out = Path(a.out)
    res = {
        "preset": a.preset,
        "machine": env["machine"],
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "load_average_at_start": env["load_average_at_start"],
        "torch": torch.__version__,
        "environment": env,
        "parts": parts,
        "chunk_seconds": a.chunk_seconds,
        "lookahead_seconds": a.lookahead_seconds,
        "vad_options": dataclasses.asdict(VadOptions()),
        "feed_chunk_ms": 1000 * CHUNK // 16000,
        "prompt": prompt,
        "first_token_only": True,
        "model": f"random {a.preset} checkpoint exported fp32 (ONNX encoder fp32 + our fp32 decoder); transformers "
        "loads the same checkpoint in fp32",
        "speech": "espeak-ng sentence tiled to length",
        "definitions": DEFINITIONS,
        "complete": False,
        "rows": [],
    }
    if "realtime" in parts:
        res["realtime_modes"] = modes
        res["headline"] = "realtime_rows[].<mode>.end_of_speech_to_first_token_ms"

    def save() -> None:
        write_json(out.with_suffix(".json"), res)

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        ckpt = build_tiny_checkpoint(tmp / "ckpt", TinyShape(name=a.preset, **PRESETS[a.preset]), max_shard_size="50MB")
        export_checkpoint(ckpt, tmp / "art", ExportOptions(bits=16, progress=False))
        p = Pipeline.from_artifacts(tmp / "art")
        hf = proc = None
        if "baseline" in parts:
            hf = Qwen2AudioForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32).eval()
            proc = AutoProcessor.from_pretrained(str(ckpt))
        chunked = StreamOptions(mode="chunked", chunk_seconds=a.chunk_seconds, lookahead_seconds=a.lookahead_seconds)
        b = Bench(p, hf, proc, prompt, chunked, VadOptions())
        p.run(np.zeros(16000, np.float32) + 0.01, prompt, sampling=b.one)  # warm-up
        save()

        rt_lengths = a.realtime_lengths or ",".join(str(min(float(s), MAX_VAD_SPEECH_S)) for s in a.lengths.split(","))
        for secs in map(float, rt_lengths.split(",")) if "realtime" in parts else []:
            x = speech(min(secs, MAX_VAD_SPEECH_S), tmp)
            audio = np.concatenate(
                [np.zeros(int(LEAD_S * 16000), np.float32), x, np.zeros(int(TAIL_S * 16000), np.float32)]
            )
            row = {"seconds": secs, "speech_end_s": LEAD_S + last_audible_s(x)}
            for mode in modes:
                runs = [b.realtime(audio, row["speech_end_s"], mode) for _ in range(a.realtime_repeats)]
                row[mode] = {
                    k: statistics.median(r[k] for r in runs)
                    for k in (
                        "end_of_speech_to_first_token_ms",
                        "vad_decision_wait_ms",
                        "decision_arrival_and_feed_ms",
                        "endpoint_decision_to_first_token_ms",
                        "beyond_vad_wait_ms",
                    )
                }
                row[mode].update(
                    end_of_speech_to_first_token_ms_spread=spread([r["end_of_speech_to_first_token_ms"] for r in runs]),
                    lag_s_max=max(r["lag_s"] for r in runs),
                    segments=max(r["segments"] for r in runs),
                    speculative=[r["speculative"] for r in runs],
                )
            res.setdefault("realtime_rows", []).append(row)
            print(
                json.dumps(
                    {
                        k: v if not isinstance(v, dict) else round(v["end_of_speech_to_first_token_ms"], 1)
                        for k, v in row.items()
                    }
                ),
                flush=True,
            )
            save()

        for secs in map(float, a.lengths.split(",")) if set(parts) & {"fast", "ptt", "baseline", "fidelity"} else []:
            x = speech(secs, tmp)
            vad_secs = min(secs, MAX_VAD_SPEECH_S)
            vad_audio = np.concatenate(
                [
                    np.zeros(int(LEAD_S * 16000), np.float32),
                    x[: int(vad_secs * 16000)],
                    np.zeros(int(TAIL_S * 16000), np.float32),
                ]
            )
            row = {"seconds": secs, "vad_speech_seconds": vad_secs}
            if "fast" in parts:
                for key, mode in [
                    ("endpoint_decision_to_first_token_ms_exact_spec", "exact"),
                    ("endpoint_decision_to_first_token_ms_exact_nospec", "exact-nospec"),
                    ("endpoint_decision_to_first_token_ms_chunked_spec", "chunked"),
                ]:
                    row[key] = statistics.median(b.fast_vad(vad_audio, mode) for _ in range(a.repeats))
            if "ptt" in parts or "baseline" in parts:
                off = [p.run(x, prompt, sampling=b.one) for _ in range(a.repeats)]
                row["offline_run_ttft_ms"] = statistics.median(r.timings["ttft_ms"] for r in off)
            if "ptt" in parts:
                row["push_to_talk_exact_ttft_ms"] = statistics.median(
                    b.push_to_talk(x, "exact") for _ in range(a.repeats)
                )
                row["push_to_talk_chunked_ttft_ms"] = statistics.median(
                    b.push_to_talk(x, "chunked") for _ in range(a.repeats)
                )
            if "baseline" in parts:
                ref = [b.transformers_offline(x) for _ in range(a.repeats)]
                row["transformers_offline_ttft_ms"] = statistics.median(r[0] for r in ref)
                row["first_token_equal"] = off[0].token_ids[:1] == [ref[0][1]]
                row["offline_run_over_transformers"] = row["offline_run_ttft_ms"] / row["transformers_offline_ttft_ms"]
            if "fidelity" in parts:
                fid = compare(
                    OurModel(pipeline=p),
                    OurModel(pipeline=p, chunk_seconds=a.chunk_seconds, lookahead_seconds=a.lookahead_seconds),
                    [x],
                    prompt,
                    32,
                )
                control = compare(
                    OurModel(pipeline=p),
                    noisy_control(OurModel)(p, min(fid["audio_cosine_mean"], 0.999999)),
                    [x],
                    prompt,
                    32,
                )
                row["chunked_fidelity"] = {
                    "audio_cosine_mean": fid["audio_cosine_mean"],
                    "audio_cosine_min": fid["audio_cosine_min"],
                    "top1_agreement_32": fid["top1_agreement"],
                    "mean_kl_32": fid["mean_kl"],
                    "noise_control_top1_agreement_32": control["top1_agreement"],
                    "noise_control_mean_kl_32": control["mean_kl"],
                }
            res["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "chunked_fidelity"}), flush=True)
            save()
        by_len = {r["seconds"]: r for r in res["rows"]}
        if 5.0 in by_len and 30.0 in by_len and "push_to_talk_chunked_ttft_ms" in by_len[5.0]:
            res["chunked_flatness_30s_over_5s"] = (
                by_len[30.0]["push_to_talk_chunked_ttft_ms"] / by_len[5.0]["push_to_talk_chunked_ttft_ms"]
            )
    res["load_average_at_end"] = list(os.getloadavg())
    res["complete"] = True
    save()
    plot(
        res,
        out,
        f"{a.preset} random model, CPU, {torch.get_num_threads()} threads; chunked {a.chunk_seconds:g} s blocks "
        f"+ {a.lookahead_seconds:g} s look-ahead",
    )


if __name__ == "__main__":
    main()
