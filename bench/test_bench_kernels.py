"""pytest-benchmark view of the W4 kernels on the real 7B layer shapes at M = 1 (decode):

    python -m pytest bench/test_bench_kernels.py --benchmark-only [--benchmark-json out.json]

On CUDA each benchmarked call replays one CUDA graph of REPEAT calls that cycle through weight copies
totalling > 3× L2 (cold weights, no Python launch in the timing), so per-call time = reported time ÷
REPEAT (also in extra_info as `per_call_us` and `gbps`). On CPU each call is one matmul. Compared: ours
(Triton on CUDA, the CPU int4 path on CPU), torch's int4 op (tinygemm), and the dense matmul.
bench/kernel_bench.py gives the full table (more M, the whole-layer row, % of peak) as JSON.
"""

from __future__ import annotations

import pytest
import torch

from kernel_bench import _nbytes, _random_gptq, _tinygemm_cuda

SHAPES = {"4096x4096": (4096, 4096), "4096x11008": (4096, 11008), "11008x4096": (11008, 4096)}
CUDA = torch.cuda.is_available()
REPEAT = 32


def _calls(impl: str, k: int, n: int):
    """(list of zero-arg calls over weight copies, bytes each call reads)."""
    dev = torch.device("cuda" if CUDA else "cpu")
    act = torch.float16 if CUDA else torch.bfloat16
    qweight, qzeros, scales, g_idx = _random_gptq(k, n, torch.Generator().manual_seed(0), device=dev)
    w4_bytes = _nbytes(qweight, qzeros, scales, g_idx)
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size if CUDA else 0
    x = torch.randn(1, k, dtype=act, device=dev)
    if impl == "dense":
        copies = max(2, -(-3 * l2 // (k * n * 2))) if CUDA else 1
        ws = [torch.randn(n, k, dtype=act, device=dev) for _ in range(copies)]
        return [lambda w=w: x @ w.T for w in ws], k * n * 2
    copies = max(2, -(-3 * l2 // w4_bytes)) if CUDA else 1
    if impl == "tinygemm":
        if CUDA:
            tiny = _tinygemm_cuda(qweight, dev, copies)
            xb = x.to(torch.bfloat16)
            return [lambda i=i: tiny(xb, i) for i in range(copies)], w4_bytes
        from qwen_audio_edge.kernels.w4_ref import unpack_rows

        tq = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_rows(qweight).T.contiguous(), 1)
        sz = torch.ones(k // 128, n, 2, dtype=act)
        return [lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, tq, 128, sz)], w4_bytes
    if CUDA:
        from qwen_audio_edge.kernels.w4_triton import TritonW4Weight

        ws = [TritonW4Weight.build(qweight.clone(), qzeros.clone(), scales.clone(), g_idx) for _ in range(copies)]
    else:
        from qwen_audio_edge.kernels.w4_cpu import CpuW4Weight

        ws = [CpuW4Weight.build(qweight, qzeros, scales, g_idx)]
    return [lambda w=w: w.matmul(x) for w in ws], w4_bytes


@pytest.mark.parametrize("impl", ["ours", "tinygemm", "dense"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_w4_decode_matmul(benchmark, shape, impl):
    k, n = SHAPES[shape]
    calls, nbytes = _calls(impl, k, n)
    if not CUDA:
        benchmark(calls[0])
        benchmark.extra_info.update(
            per_call_us=benchmark.stats.stats.median * 1e6, gbps=nbytes / benchmark.stats.stats.median / 1e9
        )
        return
    for c in calls:  # compile and tune outside the capture
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(REPEAT):
            calls[i % len(calls)]()

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(replay, rounds=20, warmup_rounds=2)
    per_call = benchmark.stats.stats.median / REPEAT
    benchmark.extra_info.update(per_call_us=per_call * 1e6, gbps=nbytes / per_call / 1e9, weight_copies=len(calls))
