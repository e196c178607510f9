"""Peak memory of the W4 export (GPTQ layer by layer) on a tiny and a mid-size random checkpoint.

Each export runs in its own process; we report that process's peak RSS (VmHWM, reset through
/proc/self/clear_refs after the imports so the parent's memory inherited across fork does not count)
and its RSS after the imports, so the difference is what the export itself needs. Usage:
    python bench/quantize_memory.py [--out bench/results/cpu/quantize_memory.json]
    python bench/quantize_memory.py --models tiny --num-samples 4 --out /tmp/qm.json   # a check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import environment, write_json

CHILD = r"""
import json, sys, time
import torch
from qwen_audio_edge.export.package import ExportOptions, export_checkpoint
from qwen_audio_edge.export.calibrate import CalibrationOptions
import transformers, onnxruntime  # imported before the baseline reading

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024  # kB -> MiB

open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
base = status("VmRSS:")
t = time.perf_counter()
m = export_checkpoint(sys.argv[1], sys.argv[2], ExportOptions(bits=4, progress=False, threads=2,
                      calibration=CalibrationOptions(num_samples=int(sys.argv[3]))))
peak = status("VmHWM:")
q = m["decoder"]["quantization"]
print(json.dumps({"baseline_rss_mib": base, "peak_rss_mib": peak, "export_peak_minus_baseline_mib": peak - base, "export_s": time.perf_counter() - t,
                  "calibration_tokens": q["calibration"]["tokens"], "eval_vs_fp": q["eval_vs_fp"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/cpu/quantize_memory.json")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--models", default="tiny,mid", help="comma list of checkpoints to export: tiny, mid")
    a = ap.parse_args()
    from qwen_audio_edge.random_checkpoint import TinyShape, build_tiny_checkpoint

    shapes = {
        "tiny": TinyShape(name="tiny"),
        "mid": TinyShape(
            name="mid",
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=8192,
        ),
    }
    names = a.models.split(",")
    if unknown := [n for n in names if n not in shapes]:
        ap.error(f"--models: unknown {unknown}; choose from {list(shapes)}")
    results = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "num_samples": a.num_samples,
        "date": time.strftime("%Y-%m-%d"),
        "environment": environment(("numpy", "transformers", "onnxruntime", "onnx")),
        "measured": "peak RSS (VmHWM) of one `export --bits 4` per checkpoint, in its own process, minus its RSS "
        "after the imports; export_s its wall time",
        "models": {},
    }
    for name, shape in ((n, shapes[n]) for n in names):
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = build_tiny_checkpoint(Path(tmp) / "ckpt", shape, max_shard_size="50MB")
            n_params = sum(p.stat().st_size for p in ckpt.glob("*.safetensors")) / 4
            r = subprocess.run(
                [sys.executable, "-c", CHILD, str(ckpt), str(Path(tmp) / "art"), str(a.num_samples)],
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(r.stdout.strip().splitlines()[-1])
            row.update(
                hidden=shape.hidden_size,
                layers=shape.num_hidden_layers,
                intermediate=shape.intermediate_size,
                vocab=shape.vocab_size,
                checkpoint_params=int(n_params),
            )
            results["models"][name] = row
            print(name, json.dumps(row))
    results["load_average_at_end"] = list(os.getloadavg())
    write_json(a.out, results)


if __name__ == "__main__":
    main()
