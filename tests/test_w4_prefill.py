"""The CPU W4 large-M path (dequantize once + dense matmul) against its reference twin, and its selection.

kernels/w4_cpu.py decodes torch's packed int4 weight into a dense matrix (bf16 or fp32, in column chunks)
for prefill; kernels/w4_cpu_prefill.py chooses, once per process, from how many rows and in which dtype.
Tolerance: max |y − y_ref| ≤ tol × max |y_ref|, y_ref = kernels/w4_ref.py on the GPTQ tensors in fp32.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from qwen_audio_edge.export.gptq import GPTQConfig, HessianAccumulator, gptq_quantize, rtn_quantize
from qwen_audio_edge.kernels import w4_cpu, w4_cpu_prefill
from qwen_audio_edge.kernels.w4_cpu import CpuW4Weight
from qwen_audio_edge.kernels.w4_cpu_prefill import PrefillPlan, ProbeCost, choose
from qwen_audio_edge.kernels.w4_ref import dequantize, w4_matmul_ref

# Measured over CASES at 32 and 200 rows: bf16 ≤ 3.8e-3 (the activations, the decoded weight and the output
# are each rounded to bf16, and the folded offset z − 8·s once more; the int4 op itself: ≤ 2.6e-3 on the same
# inputs); fp32 ≤ 1.5e-3 (only the op's bf16 scale/offset table remains). Bounds: bf16 5e-3, fp32 2e-3.
TOL = {torch.bfloat16: 5e-3, torch.float32: 2e-3}
DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture(autouse=True)
def _restore_plan():
    """Tests fix their own plan; the process's probed plan is restored after each."""
    saved = w4_cpu_prefill._PLAN
    yield
    w4_cpu_prefill.set_prefill_plan(saved)


def _layer(k: int, n: int, gs: int, act: bool, sym: bool, seed: int = 0):
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.02
    if act:
        acc = HessianAccumulator(k)
        acc.add(torch.randn(4 * k, k) * torch.linspace(0.1, 3.0, k)[torch.randperm(k)])
        return gptq_quantize(w, acc.h, GPTQConfig(group_size=gs, act_order=True, sym=sym))
    return rtn_quantize(w, GPTQConfig(group_size=gs, sym=sym))


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


CASES = [  # K, N, group size, act-order, sym
    (1024, 1024, 128, True, True),
    (1024, 1024, 128, True, False),
    (256, 192, 64, True, False),
    (512, 128, -1, False, True),
    (384, 320, 32, False, False),
]


@pytest.mark.parametrize("k,n,gs,act,sym", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_prefill_matches_the_reference_twin(k, n, gs, act, sym, dtype):
    q = _layer(k, n, gs, act, sym)
    w = CpuW4Weight.build(q.qweight, q.qzeros, q.scales, q.g_idx)
    assert w is not None and w._dense_ok(), "the dense prefill path must be available on this CPU"
    w4_cpu_prefill.set_prefill_plan(PrefillPlan(32, dtype, "test"))
    bias = torch.randn(n)
    for m in (32, 200):
        x = torch.randn(m, k)
        ref = w4_matmul_ref(x, q.qweight, q.qzeros, q.scales, q.g_idx, bias)
        assert _rel(w.matmul(x, bias), ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_decode_equals_the_whole_weight(dtype, monkeypatch):
    """Column chunks (the transient bound) compute exactly what one whole dense matrix does."""
    q = _layer(256, 640, 64, True, False)
    w = CpuW4Weight.build(q.qweight, q.qzeros, q.scales, q.g_idx)
    assert w is not None
    x = torch.randn(50, 256)
    whole = w.dense_matmul(x, dtype)
    monkeypatch.setattr(w4_cpu, "DENSE_CHUNK_ELEMS", 256 * 128)  # 128 columns per chunk: 5 chunks
    chunked = w.dense_matmul(x, dtype)
    assert torch.equal(chunked, whole)
    layout = w4_cpu.packed_layout()
    assert layout is not None
    with pytest.raises(ValueError, match="whole"):
        w.dequantize_t(layout, dtype, (0, layout.block + 1))


def test_decoded_weight_matches_the_reference_dequantization():
    """The decode alone: fp32 = the GPTQ weight up to the op's bf16 scale/offset table (measured 3.1e-3 of
    max |W| on this layer, bound 4e-3), bf16 adds one rounding of the weight and of the folded offset
    (measured 5.9e-3, bound 8e-3)."""
    q = _layer(512, 256, 128, True, False)
    w = CpuW4Weight.build(q.qweight, q.qzeros, q.scales, q.g_idx)
    assert w is not None and w.perm is not None
    ref = dequantize(q.qweight, q.qzeros, q.scales, q.g_idx)[w.perm]  # rows in the repacked (group) order
    layout = w4_cpu.packed_layout()
    assert _rel(w.dequantize_t(layout, torch.float32), ref) <= 4e-3
    assert _rel(w.dequantize_t(layout, torch.bfloat16), ref) <= 8e-3


def test_matmul_follows_the_plan_threshold(monkeypatch):
    q = _layer(256, 128, 64, False, True)
    w = CpuW4Weight.build(q.qweight, q.qzeros, q.scales, q.g_idx)
    assert w is not None
    calls: list[str] = []
    dense, op = w.dense_matmul, w.int4_matmul
    monkeypatch.setattr(w, "dense_matmul", lambda x, d: calls.append(f"dense {d}") or dense(x, d))
    monkeypatch.setattr(w, "int4_matmul", lambda x: calls.append("op") or op(x))
    w4_cpu_prefill.set_prefill_plan(PrefillPlan(40, torch.float32, "test"))
    for m in (1, 39, 40, 41):
        w.matmul(torch.randn(m, 256))
    assert calls == ["op", "op", "dense torch.float32", "dense torch.float32"]
    calls.clear()
    w4_cpu_prefill.set_prefill_plan(PrefillPlan(None, torch.bfloat16, "test"))
    w.matmul(torch.randn(500, 256))
    assert calls == ["op"]


def test_choose_picks_the_cheaper_dtype_and_the_crossover():
    bf16 = ProbeCost(decode_ms=0.24, dense_ms=0.39, op_ms=0.81)  # measured here (AVX-512-bf16, one thread)
    fp32 = ProbeCost(decode_ms=0.32, dense_ms=0.73, op_ms=0.81)
    plan = choose({torch.bfloat16: bf16, torch.float32: fp32}, ceiling=320)
    # 0.24 ms ÷ ((0.81 − 0.39) ms / 128 rows) = 73.1 → 74 rows
    assert (plan.dtype, plan.min_rows) == (torch.bfloat16, 74)
    assert "dense bfloat16 from 74 rows" in plan.describe()
    slow_bf16 = ProbeCost(decode_ms=0.3, dense_ms=40.0, op_ms=0.8)  # an AVX2 CPU's bf16 matmul, if probed
    assert choose({torch.bfloat16: slow_bf16, torch.float32: fp32}, 320).dtype == torch.float32
    assert choose({torch.float32: ProbeCost(10.0, 0.7, 0.8)}, 320).min_rows == 320  # clamped to the ceiling
    assert choose({torch.float32: ProbeCost(0.01, 0.7, 0.8)}, 320).min_rows == w4_cpu_prefill.MIN_ROWS_FLOOR
    never = choose({torch.float32: ProbeCost(0.3, 0.9, 0.8)}, 320)  # the op is faster per row
    assert never.min_rows is None and "int4 op for every M" in never.describe()
    assert choose({}, 320).min_rows is None


def test_a_failed_self_check_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(
        w4_cpu_prefill,
        "measure",
        lambda dtypes: ({}, "dense torch.bfloat16 disagrees with the int4 op (max error 0.9 of max |op|)"),
    )
    w4_cpu_prefill.set_prefill_plan(None)
    with pytest.warns(RuntimeWarning, match="failed its self-check.*int4 op for every M instead"):
        plan = w4_cpu_prefill.prefill_plan()
    assert plan.min_rows is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert w4_cpu_prefill.prefill_plan() is plan  # kept: no second probe, no second warning


def test_probe_on_this_machine_chooses_a_dense_path():
    """This CPU (the CI machines: AVX2 or AVX-512) has a readable layout: the probe must find a threshold,
    and in a dtype the CPU multiplies fast (bf16 only where oneDNN reports native bf16)."""
    w4_cpu_prefill.set_prefill_plan(None)
    plan = w4_cpu_prefill.prefill_plan()
    assert plan.min_rows is not None, plan.describe()
    assert w4_cpu_prefill.MIN_ROWS_FLOOR <= plan.min_rows <= w4_cpu.DENSE_MIN_ROWS
    if not w4_cpu_prefill.native_bf16():
        assert plan.dtype == torch.float32
