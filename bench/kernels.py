"""Per-kernel W4A16 benchmark on the real Qwen2-Audio-7B decoder layer shapes.

For each shape (K × N: 4096×4096 q/k/v/o, 4096×11008 gate/up, 11008×4096 down, lm_head 4096×156032 as
fp16 reference only) and M: median time, achieved GB/s = bytes of weights (+ scales/zeros) read ÷ time,
% of the device's peak, and speedups vs the dense matmul in the activation dtype and vs torch's built-in
int4 op (tinygemm: `_weight_int4pack_mm` on CUDA, `_weight_int4pack_mm_for_cpu` on CPU).

Cache hygiene: every 7B layer (≤ 23 MB at 4 bits) fits in an H100/H200 L2 (50–60 MB), so repeated
calls on one buffer overstate bandwidth. We rotate through copies of the weights totalling > 2× the
L2 size (--rotate-mib) between calls. A device-to-device copy figure is measured beside the peak.

    python bench/kernels.py --device cpu --out bench/results/cpu/kernels.json
    python bench/kernels.py --device cuda --peak-gbps 4800 --out $OUT/kernels.json   (see gpu_check.sh)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

SHAPES = {"qkvo_4096x4096": (4096, 4096), "gate_up_4096x11008": (4096, 11008), "down_11008x4096": (11008, 4096)}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, dev: torch.device, n_buffers: int, iters: int) -> float:
    """Median seconds per call; fn(i) uses buffer i % n_buffers."""
    for i in range(3):
        fn(i)
    times = []
    for i in range(iters):
        _sync(dev)
        t = time.perf_counter()
        fn(i % n_buffers)
        _sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(dev: torch.device, mib: int = 1024) -> float:
    """Device-to-device copy GB/s (read + write counted)."""
    a = torch.empty(mib << 20, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    t = timeit(lambda i: b.copy_(a), dev, 1, 10)
    return 2 * a.numel() / t / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ms", default="1,8,64")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rotate-mib", type=int, default=128, help="total weight copies cycled through (> 2x L2)")
    ap.add_argument("--peak-gbps", type=float, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from qwen_audio_edge.export.gptq import GPTQConfig, rtn_quantize
    from qwen_audio_edge.kernels.w4_ref import pack_rows, unpack_rows

    dev = torch.device(a.device)
    act = torch.bfloat16 if dev.type == "cpu" else torch.float16
    res = {"device": str(dev), "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "activation_dtype": str(act), "peak_gbps": a.peak_gbps, "copy_gbps": copy_bandwidth(dev, 256 if dev.type == "cpu" else 1024),
           "rows": []}
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)
    gen = torch.Generator().manual_seed(0)
    for name, (k, n) in SHAPES.items():
        q = rtn_quantize(torch.randn(n, k, generator=gen) * 0.02, GPTQConfig(group_size=128))
        perm = torch.randperm(k, generator=gen)
        qweight = pack_rows(unpack_rows(q.qweight)[perm])
        g_idx = q.g_idx[perm].contiguous()
        w4_bytes = qweight.numel() * 4 + q.scales.numel() * 2 + q.qzeros.numel() * 4 + g_idx.numel() * 4
        copies = max(1, (a.rotate_mib << 20) // w4_bytes) if dev.type == "cuda" else 1
        if dev.type == "cpu":
            from qwen_audio_edge.kernels.w4_cpu import CpuW4Weight

            ours = [CpuW4Weight.build(qweight, q.qzeros, q.scales, g_idx)]
            tiny_q = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_rows(q.qweight).T.contiguous(), 1)
            tiny_sz = torch.ones(k // 128, n, 2, dtype=act)
            tiny = lambda x, i: torch.ops.aten._weight_int4pack_mm_for_cpu(x, tiny_q, 128, tiny_sz)  # noqa: E731
        else:
            from qwen_audio_edge.kernels.w4_triton import TritonW4Weight

            ours = [TritonW4Weight.build(qweight.to(dev), q.qzeros.to(dev), q.scales.to(dev), g_idx.to(dev)) for _ in range(copies)]
            nib = unpack_rows(q.qweight).T  # [N, K] values 0..15; tinygemm takes two per byte
            packed_u8 = ((nib[:, ::2] << 4) | nib[:, 1::2]).to(torch.uint8).contiguous()
            tq = [torch.ops.aten._convert_weight_to_int4pack(packed_u8.to(dev), 8) for _ in range(copies)]
            tsz = torch.ones(k // 128, n, 2, dtype=torch.bfloat16, device=dev)
            tiny = lambda x, i: torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), tq[i], 128, tsz)  # noqa: E731
        dense = [torch.randn(n, k, dtype=act, device=dev) for _ in range(max(1, copies // 4))]
        for m in map(int, a.ms.split(",")):
            x = torch.randn(m, k, dtype=act, device=dev)
            t_ours = timeit(lambda i: ours[i % len(ours)].matmul(x), dev, len(ours), a.iters)
            t_dense = timeit(lambda i: x @ dense[i % len(dense)].T, dev, len(dense), a.iters)
            try:
                t_tiny = timeit(lambda i: tiny(x, i), dev, copies, a.iters)
            except Exception as e:  # noqa: BLE001 — report, do not abort the whole benchmark
                t_tiny = None
                print(f"tinygemm failed on {name} M={m}: {e}", flush=True)
            row = {"shape": name, "k": k, "n": n, "m": m, "ours_ms": 1e3 * t_ours, "dense_ms": 1e3 * t_dense,
                   "tinygemm_ms": None if t_tiny is None else 1e3 * t_tiny, "w4_bytes": w4_bytes,
                   "ours_gbps": w4_bytes / t_ours / 1e9, "speedup_vs_dense": t_dense / t_ours,
                   "speedup_vs_tinygemm": None if t_tiny is None else t_tiny / t_ours}
            if a.peak_gbps:
                row["ours_pct_peak"] = 100 * row["ours_gbps"] / a.peak_gbps
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
