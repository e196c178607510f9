"""Push-to-talk streaming latency at the real 7B shape on a GPU (or a small shape on CPU), no weights needed.

bench/stream.py exports a whole random checkpoint, which at the 7B shape means ~15 GB of files; this
script instead loads the tiny fixture's artifacts (tokenizer, chat template, mel filters) and swaps in,
directly on the device, a random audio encoder at the real Qwen2-Audio config (torch backend) and a
random W4 g128 decoder at the real 7B config (bench/decode.py's builder). The speed of both does not
depend on the weights' values. For utterances of 2/5/10/20/30 s (a speech-like test signal; no VAD),
it measures the time from `end()` to the first token of:
  - the offline `run` of the same audio (mel + encoder + prefill at once),
  - the exact streaming session (mel and prompt prefix done while the audio arrived),
  - the chunked streaming session (every finished block also encoded and prefilled),
with a component breakdown (encoder ms, prefill ms) from the turn timings. Issue #5's GPU target:
30 s exact push-to-talk ≤ 60 ms.

`--gpu-path` on CPU takes the CUDA run's code path (Triton W4 and fused kernels under the Triton
interpreter, TRITON_INTERPRET=1, set here); with `--shape tiny` it is `bench/gpu_check.sh --dry-run`'s
check of this script, not a speed. `--out` is rewritten (atomically) after every utterance length, so a
run cut off by a time limit leaves valid JSON with the lengths that finished.

    python bench/stream_device.py --shape 7b --device cuda --out gpu-out/stream_7b.json
    python bench/stream_device.py --shape small --device cpu          # quick check of the script
    python bench/stream_device.py --shape tiny --device cpu --gpu-path --lengths 1,2 --repeats 1 --warmups 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import random_w4_decoder
from kernel_bench import environment, write_json

SHAPES = {
    "7b": dict(
        text=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=156032,
        ),
        audio=dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120),
    ),
    "small": dict(
        text=dict(
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=8192,
        ),
        audio=dict(d_model=256, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=1024),
    ),
    # the dry run's: bench/decode.py's tiny decoder (vocab ≥ the fixture tokenizer's 512 ids) and a one-layer encoder
    "tiny": dict(
        text=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=1024,
        ),
        audio=dict(d_model=64, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=128),
    ),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_pipeline(shape: str, device: torch.device, tmp: Path, gpu_path: bool = False):
    """The tiny fixture pipeline with a random encoder + W4 decoder of `shape` swapped in on `device`.
    `gpu_path`: fp16 and the Triton W4 + fused kernels, as on CUDA (on CPU: under the interpreter)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_audio_edge.export.package import ExportOptions, export_checkpoint
    from qwen_audio_edge.random_checkpoint import build_tiny_checkpoint
    from qwen_audio_edge.runtime.encoder import AudioEncoderWithProjector, EncoderConfig, TorchEncoder
    from qwen_audio_edge.runtime.pipeline import Pipeline, RuntimeOptions

    build_tiny_checkpoint(tmp / "ckpt", "mha")
    export_checkpoint(tmp / "ckpt", tmp / "art", ExportOptions(progress=False))
    dtype = torch.float16 if device.type == "cuda" or gpu_path else torch.float32
    p = Pipeline.from_artifacts(
        tmp / "art",
        RuntimeOptions(
            device=str(device),
            dtype="fp16" if dtype == torch.float16 else "fp32",
            encoder_backend="torch",
            max_context=64,
        ),
    )
    s = SHAPES[shape]
    cfg = dict(
        s["text"], max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        hf = Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()
        enc = AudioEncoderWithProjector(
            EncoderConfig(
                num_mel_bins=p.mel.config.n_mels, max_source_positions=1500, output_dim=cfg["hidden_size"], **s["audio"]
            )
        ).eval()
    torch.set_default_dtype(default)
    p.decoder = random_w4_decoder(hf, cfg, device, dtype, w4_kernel="triton" if gpu_path else "auto", fused=gpu_path)
    del hf
    p.encoder = TorchEncoder(enc, device)
    p.max_context = 2048
    p.cache = p.decoder.setup_cache(p.max_context)
    if p.prompt.audio_token_id >= cfg["vocab_size"]:
        raise SystemExit("the fixture tokenizer's ids do not fit the shape's vocabulary")
    return p, cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", default="2,5,10,20,30")
    from qwen_audio_edge.runtime.chunked import DEFAULT_CHUNK_S, DEFAULT_LOOKAHEAD_S

    ap.add_argument(
        "--chunk-seconds", type=float, default=DEFAULT_CHUNK_S, help="chunked mode's block (runtime default)"
    )
    ap.add_argument(
        "--lookahead-seconds",
        type=float,
        default=DEFAULT_LOOKAHEAD_S,
        help="chunked mode's look-ahead per block (runtime default)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmups", type=int, default=2, help="untimed offline + chunked turns on a 3 s signal first")
    ap.add_argument(
        "--gpu-path",
        action="store_true",
        help="on CPU, the CUDA run's code path: fp16, Triton W4 + fused kernels under the Triton "
        "interpreter (implied on CUDA; a check, not a speed)",
    )
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    gpu_path = device.type == "cuda" or a.gpu_path
    if gpu_path and device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton kernels are defined (first import, below)
    from qwen_audio_edge.export.synthetic_audio import speech_like_signal
    from qwen_audio_edge.runtime.generate import SamplingOptions
    from qwen_audio_edge.runtime.stream import StreamOptions, StreamSession

    prompt = "What does the person say?"
    one = SamplingOptions(max_new_tokens=1, greedy=True, repetition_penalty=1.0, ignore_eos=True)
    res = {
        "shape": a.shape,
        "device": str(device),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "chunk_seconds": a.chunk_seconds,
        "lookahead_seconds": a.lookahead_seconds,
        "threads": torch.get_num_threads(),
        "environment": environment(("numpy", "transformers", "onnxruntime", "triton")),
        "measured": "push-to-talk: end() → first token, audio fed as fast as possible (no VAD, no real-time pacing; "
        "bench/stream.py has the real-time end-of-speech headline on CPU); *_encoder_ms / *_prefill_ms: "
        "what was left of each at end()",
        "weights": "random (real-config encoder, W4 g128 decoder with act-order-like g_idx)",
        "gpu_path": gpu_path,
        "complete": False,
        "rows": [],
    }
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
    elif gpu_path:
        res["note"] = "CPU, Triton interpreter: a check of the GPU run's code path, not a speed"

    built: list = []  # the pipeline, once built: its active paths (self-check verdicts) go with every save

    def save() -> None:  # after every length: a run cut off by a time limit keeps what finished, as valid JSON
        if built:
            res["paths"] = built[0].active_paths()
        by = {r["seconds"]: r for r in res["rows"]}
        if 30.0 in by:
            res["exact_30s_push_to_talk_ms"] = by[30.0]["exact_ttft_ms"]
            if 5.0 in by:
                res["chunked_flatness_30s_over_5s"] = by[30.0]["chunked_ttft_ms"] / by[5.0]["chunked_ttft_ms"]
        if a.out:
            write_json(a.out, res)

    save()
    with tempfile.TemporaryDirectory() as tmpd:
        p, cfg = build_pipeline(a.shape, device, Path(tmpd), gpu_path)
        res["config"] = cfg
        built.append(p)
        res["w4_kernels"], res["fused_kernels"] = p.decoder.w4_kernels, bool(p.decoder.fused_kernels)
        save()

        def push_to_talk(x, options: StreamOptions) -> dict:
            s = StreamSession(p, prompt, sampling=one, vad=None, options=options)
            for i in range(0, len(x), 1600):
                s.feed(x[i : i + 1600])
            _sync(device)
            ev = s.end()
            t = ev.result.timings
            return {
                "ttft_ms": ev.to_json()["stream"]["ttft_after_endpoint_ms"],
                "encoder_ms": t["encoder_ms"],
                "prefill_ms": t["prefill_ms"],
            }

        chunked = StreamOptions(mode="chunked", chunk_seconds=a.chunk_seconds, lookahead_seconds=a.lookahead_seconds)
        warm = speech_like_signal(3.0)
        for _ in range(a.warmups):
            p.run(warm, prompt, sampling=one)
            push_to_talk(warm, chunked)
        for secs in map(float, a.lengths.split(",")):
            x = speech_like_signal(secs, seed=int(secs))
            runs: dict[str, list] = {"offline": [], "exact": [], "chunked": []}
            for _ in range(a.repeats):
                _sync(device)
                runs["offline"].append({"ttft_ms": p.run(x, prompt, sampling=one).timings["ttft_ms"]})
                runs["exact"].append(push_to_talk(x, StreamOptions()))
                runs["chunked"].append(push_to_talk(x, chunked))
            row = {"seconds": secs}
            for mode, vals in runs.items():
                for key in vals[0]:
                    row[f"{mode}_{key}"] = statistics.median(v[key] for v in vals)
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            if device.type == "cuda":
                res["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            save()
    res["complete"] = True
    save()
    print(json.dumps({k: v for k, v in res.items() if k not in ("rows", "config")}, indent=1))


if __name__ == "__main__":
    main()
