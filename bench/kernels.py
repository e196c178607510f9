"""Per-kernel W4A16 benchmark on the real Qwen2-Audio-7B decoder layer shapes.

Rows, for each shape and M: median time, achieved GB/s = bytes of weights + scales/zeros (+ g_idx) read
÷ time, % of the device's peak, speedups vs the dense matmul in the activation dtype and vs torch's
built-in int4 op (tinygemm: `_weight_int4pack_mm` on CUDA, `_weight_int4pack_mm_for_cpu` on CPU), and
the max error of our output against the reference dequant-matmul (fp32).

Shapes (K × N): 4096×4096 (q/k/v/o), 4096×11008 (gate/up), 11008×4096 (down), the fused projections our
runtime actually runs (q+k+v 4096×12288, gate+up 4096×22016), and `layer`: one whole decoder layer's
four W4 matmuls back to back (fused qkv with bias, o, fused gate/up, down), as the decode step runs them.

GPU timing: a lone 4096×4096 GEMV takes a few µs, less than one Python launch, so calls are never timed
one by one. The calls are captured into one CUDA graph that cycles through copies of the weights
totalling more than 3× the L2 cache (so each call reads cold weights, as in a real decode step where
the layer's weights were evicted by the 31 others), replayed, timed with CUDA events, and divided by
the number of calls. The Triton configs are tuned first (kernels/w4_triton.py `Tuner`, L2 flushed).
A device-to-device copy figure is measured beside the datasheet peak.

    python bench/kernels.py --device cpu --out bench/results/cpu/kernels.json
    python bench/kernels.py --device cuda --peak-gbps 3350 --out $OUT/kernels.json   (see gpu_check.sh)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

SHAPES = {"qkvo_4096x4096": (4096, 4096), "gate_up_4096x11008": (4096, 11008), "down_11008x4096": (11008, 4096),
          "qkv_fused_4096x12288": (4096, 12288), "gate_up_fused_4096x22016": (4096, 22016)}
LAYER = (("qkv", 4096, 12288, True), ("o", 4096, 4096, False), ("gate_up", 4096, 22016, False), ("down", 11008, 4096, False))


def cpu_seconds(fns: list[Callable[[], None]], iters: int) -> float:
    """Median wall seconds per call on CPU (fns cycled)."""
    for f in fns[:3]:
        f()
    times = []
    for i in range(iters):
        t = time.perf_counter()
        fns[i % len(fns)]()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def graph_seconds(fns: list[Callable[[], None]], replays: int = 20) -> float:
    """Device seconds per call: every fn captured once, in order, into one CUDA graph; replayed; timed."""
    for f in fns:  # compile, tune, allocate outside the capture
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    return replay_seconds(graph, replays) / len(fns)


def replay_seconds(graph, replays: int = 20) -> float:
    """Device seconds per replay of a captured CUDA graph (median of 5 event-timed runs of `replays`)."""
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / replays)
    return statistics.median(samples)


def copy_bandwidth(dev: torch.device, mib: int) -> float:
    """Device-to-device copy GB/s (read + write counted)."""
    a = torch.empty(mib << 20, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    t = cpu_seconds([lambda: b.copy_(a)], 10) if dev.type == "cpu" else graph_seconds([lambda: b.copy_(a)] * 4, 5)
    return 2 * a.numel() / t / 1e9


def _random_gptq(k: int, n: int, gen: torch.Generator, group: int = 128, act_order: bool = True,
                 device: torch.device | str = "cpu"):
    """Random GPTQ tensors made directly on `device` (the kernels' speed does not depend on the values;
    quantizing a real 7B-sized matrix on the host would take most of a GPU session's minutes): random
    nibbles and zero points, scales ~0.01, and an act-order-like permuted g_idx."""
    qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, generator=gen).to(device)
    qzeros = torch.randint(-2**31, 2**31 - 1, (k // group, n // 8), dtype=torch.int32, generator=gen).to(device)
    scales = (torch.rand(k // group, n, generator=gen) * 0.01 + 0.001).half().to(device)
    g_idx = (torch.arange(k) // group).int()
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)].contiguous()
    return qweight, qzeros, scales, g_idx.to(device)


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _tinygemm_cuda(qweight, dev, copies: int):
    """torch's CUDA int4 op on the same nibbles (its own layout, group 128, bf16 scales/zeros)."""
    from qwen_audio_edge.kernels.w4_ref import unpack_rows

    nib = unpack_rows(qweight.to(dev)).T  # [N, K] 0..15, two per byte for the converter
    packed_u8 = ((nib[:, ::2] << 4) | nib[:, 1::2]).to(torch.uint8).contiguous()
    k, n = nib.shape[1], nib.shape[0]
    tq = [torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8) for _ in range(copies)]
    tsz = [torch.ones(k // 128, n, 2, dtype=torch.bfloat16, device=dev) for _ in range(copies)]
    return lambda x, i: torch.ops.aten._weight_int4pack_mm(x, tq[i], 128, tsz[i])


def _chosen(k: int, n: int) -> list[str]:
    from qwen_audio_edge.kernels.w4_triton import TUNER

    return [f"{key[0]} m≤{key[4]}: {cfg}" for key, cfg in TUNER.choices.items() if key[1] == k and key[2] == n]


def bench_shape(name: str, k: int, n: int, ms: list[int], dev: torch.device, act: torch.dtype, rotate_bytes: int,
                iters: int, gen: torch.Generator) -> list[dict]:
    from qwen_audio_edge.kernels.w4_ref import w4_matmul_ref

    qweight, qzeros, scales, g_idx = _random_gptq(k, n, gen, device=dev)
    w4_bytes = _nbytes(qweight, qzeros, scales, g_idx)
    rows = []
    if dev.type == "cpu":
        from qwen_audio_edge.kernels.w4_cpu import CpuW4Weight

        ours = [CpuW4Weight.build(qweight, qzeros, scales, g_idx)]
        from qwen_audio_edge.kernels.w4_ref import unpack_rows

        tiny_q = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_rows(qweight).T.contiguous(), 1)
        tiny_sz = torch.ones(k // 128, n, 2, dtype=act)
        tiny = lambda x, i: torch.ops.aten._weight_int4pack_mm_for_cpu(x, tiny_q, 128, tiny_sz)  # noqa: E731
        copies = dense_copies = 1
    else:
        from qwen_audio_edge.kernels.w4_triton import TritonW4Weight

        copies = max(2, -(-rotate_bytes // w4_bytes))
        first = TritonW4Weight.build(qweight, qzeros, scales, g_idx)
        ours = [first] + [TritonW4Weight.build(first.qweight.clone(), qzeros.clone(), scales.clone(),
                                               torch.arange(k, device=dev, dtype=torch.int32) // 128)
                          for _ in range(copies - 1)]  # copies of the repacked tensors (same bytes read)
        for w in ours[1:]:
            w.perm, w._xcols = first.perm, first._xcols
        try:
            tiny = _tinygemm_cuda(qweight, dev, copies)
        except Exception as e:  # noqa: BLE001 — report, do not abort the whole benchmark
            print(f"tinygemm setup failed on {name}: {e}", flush=True)
            tiny = None
        dense_copies = max(2, -(-rotate_bytes // (k * n * 2)))
    dense = [torch.randn(n, k, dtype=act, device=dev) for _ in range(dense_copies)]
    ref_args = (qweight.to(dev), qzeros.to(dev), scales.to(dev), g_idx.to(dev))
    for m in ms:
        x = torch.randn(m, k, dtype=act, device=dev)
        xb = x.to(torch.bfloat16)
        ref = w4_matmul_ref(x.float(), *ref_args)
        err = ((ours[0].matmul(x).float() - ref).abs().max() / ref.abs().max()).item()
        if dev.type == "cpu":
            t_ours = cpu_seconds([lambda: ours[0].matmul(x)], iters)
            t_dense = cpu_seconds([lambda: x @ dense[0].T], iters)
        else:
            t_ours = graph_seconds([lambda w=w: w.matmul(x) for w in ours])
            t_dense = graph_seconds([lambda d=d: x @ d.T for d in dense])
        try:
            if tiny is None:
                raise RuntimeError("no tinygemm weights")
            if dev.type == "cpu":
                t_tiny = cpu_seconds([lambda: tiny(x, 0)], iters)
            else:
                t_tiny = graph_seconds([lambda i=i: tiny(xb, i) for i in range(copies)])
        except Exception as e:  # noqa: BLE001 — report, do not abort the whole benchmark
            t_tiny = None
            print(f"tinygemm failed on {name} M={m}: {e}", flush=True)
        row = {"shape": name, "k": k, "n": n, "m": m, "ours_ms": 1e3 * t_ours, "dense_ms": 1e3 * t_dense,
               "tinygemm_ms": None if t_tiny is None else 1e3 * t_tiny, "w4_bytes": w4_bytes,
               "ours_gbps": w4_bytes / t_ours / 1e9, "speedup_vs_dense": t_dense / t_ours,
               "speedup_vs_tinygemm": None if t_tiny is None else t_tiny / t_ours, "max_rel_err": err,
               "weight_copies": copies}
        if dev.type == "cuda":
            row["configs"] = _chosen(k, n)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_layer(dev: torch.device, act: torch.dtype, rotate_bytes: int, gen: torch.Generator) -> dict:
    """One decoder layer's four W4 matmuls at M = 1, back to back, cold weights (GPU only)."""
    from qwen_audio_edge.kernels.w4_triton import TritonW4Weight

    parts = []
    for name, k, n, bias in LAYER:
        qweight, qzeros, scales, g_idx = _random_gptq(k, n, gen, device=dev)
        parts.append((name, k, n, bias, (qweight, qzeros, scales, g_idx), _nbytes(qweight, qzeros, scales, g_idx)))
    layer_bytes = sum(p[5] for p in parts)
    copies = max(2, -(-rotate_bytes // layer_bytes))
    ours, tiny, dense, calls_ours, calls_tiny, calls_dense = [], [], [], [], [], []
    for name, k, n, bias, t, _ in parts:
        b = torch.randn(n, device=dev, dtype=act) if bias else None
        x = torch.randn(1, k, device=dev, dtype=act)
        ws = [TritonW4Weight.build(*(a.clone() for a in t)) for _ in range(copies)]  # every copy cold, scales too
        tg = _tinygemm_cuda(t[0], dev, copies)
        dn = [torch.randn(n, k, dtype=act, device=dev) for _ in range(copies)]
        ours.append((ws, x, b))
        tiny.append((tg, x.to(torch.bfloat16)))
        dense.append((dn, x, b))
    for c in range(copies):
        for ws, x, b in ours:
            calls_ours.append(lambda w=ws[c], x=x, b=b: w.matmul(x, b))
        for tg, xb in tiny:
            calls_tiny.append(lambda tg=tg, xb=xb, c=c: tg(xb, c))
        for dn, x, b in dense:
            calls_dense.append(lambda d=dn[c], x=x, b=b: torch.nn.functional.linear(x, d, b))
    t_ours = graph_seconds(calls_ours) * len(LAYER)  # per layer
    t_tiny = graph_seconds(calls_tiny) * len(LAYER)
    t_dense = graph_seconds(calls_dense) * len(LAYER)
    row = {"shape": "layer", "parts": [p[0] for p in parts], "m": 1, "ours_ms": 1e3 * t_ours, "tinygemm_ms": 1e3 * t_tiny,
           "dense_ms": 1e3 * t_dense, "w4_bytes": layer_bytes, "ours_gbps": layer_bytes / t_ours / 1e9,
           "speedup_vs_dense": t_dense / t_ours, "speedup_vs_tinygemm": t_tiny / t_ours, "weight_copies": copies}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ms", default="1,8,64")
    ap.add_argument("--shapes", default="qkvo_4096x4096,gate_up_4096x11008,down_11008x4096",
                    help=f"comma list from {', '.join(SHAPES)}; 'all' for every one")
    ap.add_argument("--iters", type=int, default=20, help="CPU timing iterations")
    ap.add_argument("--rotate-mib", type=int, default=0, help="weight copies cycled through on GPU (default 3× L2)")
    ap.add_argument("--no-layer", action="store_true", help="skip the whole-layer row (GPU)")
    ap.add_argument("--peak-gbps", type=float, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    dev = torch.device(a.device)
    act = torch.bfloat16 if dev.type == "cpu" else torch.float16
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size if dev.type == "cuda" else 0
    rotate = max(a.rotate_mib << 20, 3 * l2)
    res = {"device": str(dev), "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "activation_dtype": str(act), "peak_gbps": a.peak_gbps, "l2_bytes": l2, "rotate_bytes": rotate,
           "timing": "CUDA graph of calls over rotating weight copies, CUDA events" if dev.type == "cuda" else "wall clock, median",
           "copy_gbps": copy_bandwidth(dev, 256 if dev.type == "cpu" else 1024), "rows": []}
    if dev.type == "cuda":
        import triton

        res["triton"] = triton.__version__
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)
    gen = torch.Generator().manual_seed(0)
    names = list(SHAPES) if a.shapes == "all" else a.shapes.split(",")
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape(s) {unknown}: choose from {list(SHAPES)}")
    def save() -> None:  # after every shape: a run cut off by a time limit keeps what it measured
        if a.peak_gbps:
            for row in res["rows"]:
                row["ours_pct_peak"] = 100 * row["ours_gbps"] / a.peak_gbps
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(res, indent=2))

    save()
    for name in names:
        k, n = SHAPES[name]
        res["rows"] += bench_shape(name, k, n, [int(m) for m in a.ms.split(",")], dev, act, rotate, a.iters, gen)
        save()
    if dev.type == "cuda" and not a.no_layer:
        try:
            res["rows"].append(bench_layer(dev, act, rotate, gen))
        except Exception as e:  # noqa: BLE001 — the per-shape rows are already saved
            res["layer_error"] = f"{type(e).__name__}: {e}"
            print("layer row failed:", res["layer_error"], flush=True)
        save()


if __name__ == "__main__":
    main()
