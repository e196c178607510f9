"""Memory plan of Qwen2-Audio-7B (W4 g128) on a CUDA device: 30 s of audio + 1k generated tokens.

Computed, not measured: runtime/memory_plan.py sums the tensors of the real modules built on the meta
device (no weights, no GPU needed) and adds the activation peaks of each stage. Prints one table per
configuration (qwen_audio_edge.benchmark.memory_report.CONFIGS: the defaults on CUDA, the 8 GB card's
options) and writes bench/results/cpu/memory_7b.json (the docs' figures come from it). Target: ≤ 6 GiB.
`qwen-audio-edge bench --shape 7b` shows the same plans' peaks.

    .venv/bin/python bench/memory_7b.py [--out bench/results/cpu/memory_7b.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qwen_audio_edge.benchmark.memory_report import AUDIO_SECONDS, NEW_TOKENS, PROMPT_TOKENS, TARGET_GIB, plans
from qwen_audio_edge.runtime.memory_plan import GIB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu" / "memory_7b.json")
    a = ap.parse_args()
    rows = plans()
    print("\nconfiguration                                 peak GiB   ≤ 6 GiB")
    for r in rows:
        peak = r["plan"]["peak_bytes"] / GIB
        print(f"{r['name']:<44} {peak:>9.2f}   {'yes' if peak <= TARGET_GIB else 'no'}")
    doc = {
        "what": "memory plan of Qwen2-Audio-7B W4 g128 on CUDA (fp16 activations, torch fp16 encoder), "
        f"{AUDIO_SECONDS:g} s audio + {PROMPT_TOKENS} prompt tokens + {NEW_TOKENS} new tokens",
        "method": "runtime/memory_plan.py: tensor sizes of the real modules built on the meta device + "
        "per-stage activation peaks; not a measurement on a GPU",
        "command": "python bench/memory_7b.py",
        "target_gib": TARGET_GIB,
        "configs": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
