"""pytest-benchmark view of the W4 kernels on the real 7B layer shapes at M = 1 (decode):

    python -m pytest bench/test_bench_kernels.py --benchmark-only [--benchmark-json out.json]

On CUDA each benchmarked call replays one CUDA graph of REPEAT calls that cycle through weight copies
totalling > 3× L2 (cold weights, no Python launch in the timing), so per-call time = reported time ÷
REPEAT (also in extra_info as `per_call_us` and `gbps`). On CPU each call is one matmul. Compared: ours
(Triton on CUDA, the CPU int4 path on CPU), torch's int4 op (tinygemm) and the dense matmul, all three over
the same GPTQ layer: before anything is timed, every weight copy's output is checked against the reference
twin (`w4_matmul_ref`) at a stated tolerance, so a fast number is never the number of a wrong answer.
tinygemm is timed as the op alone, on activations already permuted into its act-order (ours permutes inside).
bench/kernel_bench.py gives the full table (more M, the whole-layer row, % of peak) as JSON.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kernel_bench import _nbytes, _random_gptq
from qwen_audio_edge.kernels.w4_ref import dequantize, w4_matmul_ref

SHAPES = {"4096x4096": (4096, 4096), "4096x11008": (4096, 11008), "11008x4096": (11008, 4096)}
CUDA = torch.cuda.is_available()
REPEAT = 32

# max |y − ref| / max |ref| at M = 1, the reference in fp32 over the same (seeded) layer and activations.
# CPU (all three compute in bf16): measured 2.9e-3–3.4e-3 on the three shapes; bound 6e-3 (margin 1.75×).
# CUDA: not measured (no GPU on the machine this was written on); the bounds are tests/test_gpu.py's for the same
# paths: fp16 Triton 3e-3 (the fp16 dense matmul held to it too), tinygemm (bf16) 2e-2.
TOL = {"ours": 3e-3, "tinygemm": 2e-2, "dense": 3e-3} if CUDA else {"ours": 6e-3, "tinygemm": 6e-3, "dense": 6e-3}


def _calls(impl: str, k: int, n: int) -> tuple[list[Callable[[], torch.Tensor]], int, torch.Tensor]:
    """(zero-arg calls over weight copies, bytes each call reads, the reference output they must match)."""
    dev = torch.device("cuda" if CUDA else "cpu")
    act = torch.float16 if CUDA else torch.bfloat16
    gen = torch.Generator().manual_seed(0)  # the same layer and activations for every implementation, every run
    qweight, qzeros, scales, g_idx = _random_gptq(k, n, gen, device=dev)
    w4_bytes = _nbytes(qweight, qzeros, scales, g_idx)
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size if CUDA else 0
    x = torch.randn(1, k, generator=gen).to(device=dev, dtype=act)
    ref = w4_matmul_ref(x.float(), qweight, qzeros, scales, g_idx)
    if impl == "dense":  # the same layer dequantized: what a dense checkpoint would compute
        copies = max(2, -(-3 * l2 // (k * n * 2))) if CUDA else 1
        w = dequantize(qweight, qzeros, scales, g_idx, dtype=act).T.contiguous()  # [N, K], as nn.Linear holds it
        ws = [w] + [w.clone() for _ in range(copies - 1)]
        return [lambda w=w: x @ w.T for w in ws], k * n * 2, ref
    copies = max(2, -(-3 * l2 // w4_bytes)) if CUDA else 1
    if impl == "tinygemm":
        if CUDA:
            from qwen_audio_edge.kernels.w4_tinygemm import TinygemmW4Weight

            built = [TinygemmW4Weight.build(qweight.clone(), qzeros, scales, g_idx) for _ in range(copies)]
            tiny = [t for t in built if t is not None]
            assert len(tiny) == copies, "tinygemm cannot run this layer"
            op = torch.ops.aten._weight_int4pack_mm
        else:
            from qwen_audio_edge.kernels.w4_cpu import CpuW4Weight

            cpu = CpuW4Weight.build(qweight, qzeros, scales, g_idx)
            assert cpu is not None, "torch's CPU int4 op cannot run this layer"
            tiny = [cpu]
            op = torch.ops.aten._weight_int4pack_mm_for_cpu
        perm = tiny[0].perm
        xb = (x.index_select(1, perm) if perm is not None else x).to(torch.bfloat16).contiguous()
        return [lambda t=t: op(xb, t.packed, t.group, t.scales_zeros) for t in tiny], w4_bytes, ref
    if CUDA:
        from qwen_audio_edge.kernels.w4_triton import TritonW4Weight

        ws = [TritonW4Weight.build(qweight.clone(), qzeros.clone(), scales.clone(), g_idx) for _ in range(copies)]
    else:
        from qwen_audio_edge.kernels.w4_cpu import CpuW4Weight

        ws = [CpuW4Weight.build(qweight, qzeros, scales, g_idx)]
    return [lambda w=w: w.matmul(x) for w in ws], w4_bytes, ref


@pytest.mark.parametrize("impl", ["ours", "tinygemm", "dense"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_w4_decode_matmul(benchmark, shape, impl):
    k, n = SHAPES[shape]
    calls, nbytes, ref = _calls(impl, k, n)
    for i, c in enumerate(calls):  # correct before timed (on CUDA this also compiles and tunes outside the capture)
        err = ((c().float() - ref).abs().max() / ref.abs().max()).item()
        print(f"{impl} {shape} copy {i}: relative error {err:.2e}")
        assert err <= TOL[impl], (impl, shape, i, err)
    if not CUDA:
        benchmark(calls[0])
        benchmark.extra_info.update(
            per_call_us=benchmark.stats.stats.median * 1e6, gbps=nbytes / benchmark.stats.stats.median / 1e9
        )
        return
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
