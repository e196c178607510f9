"""Where one batch-1 decode step of our CPU runtime spends its time: the profile behind the llama.cpp gap.

Loads an artifacts dir (default: the mid-size W4 model `qwen-audio-edge bench --shape mid --work DIR`
built), runs one warm answer, then profiles `--steps` decode steps with torch.profiler and groups the
operators' self CPU time: how much is the W4 matmul kernels (the bytes a decode step must read) and how
much is everything else (per-op dispatch, norms, RoPE, attention, sampling, Python). Writes JSON.

    python bench/decode_profile.py --artifacts ~/.cache/qwen-audio-edge/bench-work/mid/artifacts \
        --threads 2 --out bench/results/cpu/decode_profile_mid.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qwen_audio_edge.benchmark.system import cpu_name, git_commit, versions
from qwen_audio_edge.runtime.generate import SamplingOptions
from qwen_audio_edge.runtime.pipeline import Pipeline, RuntimeOptions

W4_OPS = ("aten::_weight_int4pack_mm", "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench/results/cpu/decode_profile_mid.json"))
    a = ap.parse_args()
    p = Pipeline.from_artifacts(a.artifacts, RuntimeOptions(threads=a.threads))
    opts = SamplingOptions(max_new_tokens=a.steps + 1, greedy=True, repetition_penalty=1.0, ignore_eos=True)
    p.run(None, "What does the person say?", sampling=opts)  # warm
    t0 = time.perf_counter()
    plain = p.run(None, "What does the person say?", sampling=opts).timings
    wall = time.perf_counter() - t0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiled = p.run(None, "What does the person say?", sampling=opts).timings
    events = prof.key_averages()
    rows = sorted(
        ({"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000} for e in events),
        key=lambda r: -r["self_cpu_ms"],
    )
    total = sum(r["self_cpu_ms"] for r in rows)
    w4 = sum(r["self_cpu_ms"] for r in rows if r["op"] in W4_OPS)
    calls = sum(r["calls"] for r in rows if r["op"].startswith("aten::"))
    doc = {
        "what": "one answer of --steps decode steps after a text-only prompt, profiled (torch.profiler, CPU)",
        "command": "python bench/decode_profile.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items()),
        "machine": cpu_name(),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "paths": p.active_paths(),
        "decode_tok_s_unprofiled": plain.get("decode_tok_s"),
        "decode_tok_s_profiled": profiled.get("decode_tok_s"),
        "answer_wall_s_unprofiled": round(wall, 4),
        "steps": a.steps,
        "self_cpu_ms_total": round(total, 3),
        "w4_and_int8_matmul_ms": round(w4, 3),
        "w4_share": round(w4 / total, 4) if total else None,
        "aten_calls_per_step": round(calls / a.steps, 1),
        "top_ops": [{**r, "self_cpu_ms": round(r["self_cpu_ms"], 3)} for r in rows[:15]],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "top_ops"}, indent=1))
    for r in rows[:15]:
        print(f"{r['op']:<45} {r['calls']:>7} {r['self_cpu_ms']:>10.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
