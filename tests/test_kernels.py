"""W4A16 kernels against the reference twin (kernels/w4_ref.py), with explicit tolerances.

Sweeps M ∈ {1, 2, 3, 8, 17, 64, 200}, odd K/N within the format's constraints, group sizes 32/64/128/-1,
act-order on/off, sym/asym. Triton runs under TRITON_INTERPRET=1 on CPU (small shapes); the CPU int4
path is also checked on the real 7B layer shapes. Tolerance: max |y − y_ref| ≤ tol × max |y_ref|.
"""

from __future__ import annotations

import pytest
import torch

from qwen_audio_edge.export.gptq import GPTQConfig, HessianAccumulator, gptq_quantize, rtn_quantize
from qwen_audio_edge.kernels.w4_cpu import CpuW4Weight
from qwen_audio_edge.kernels.w4_ref import w4_matmul_ref

MS = (1, 2, 3, 8, 17, 64, 200)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
CPU_TOL = 2e-2  # the CPU int4 op computes in bf16 whatever the input dtype (see kernels/w4_cpu.py)


def _layer(k: int, n: int, gs: int, act: bool, sym: bool, seed: int = 0):
    torch.manual_seed(seed)
    w = torch.randn(n, k)
    if act:  # GPTQ with act-order gives a permuted g_idx
        acc = HessianAccumulator(k)
        acc.add(torch.randn(4 * k, k) * torch.linspace(0.1, 3.0, k)[torch.randperm(k)])
        return gptq_quantize(w, acc.h, GPTQConfig(group_size=gs, act_order=True, sym=sym))
    return rtn_quantize(w, GPTQConfig(group_size=gs, sym=sym))


def _check(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tol: float | None = None) -> None:
    assert y.shape == ref.shape and y.dtype == ref.dtype
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= (tol or TOL[dtype]) * ref.float().abs().max().item(), f"max err {err:.3e}"


CASES = [  # K, N (N % 16 for the CPU op), group size, act-order, sym
    (256, 64, 64, True, True),
    (224, 192, 32, True, False),
    (384, 48, 128, True, False),
    (160, 32, 32, False, False),
    (256, 80, -1, True, True),
    (136, 16, -1, False, False),  # K = 17 × 8
]


@pytest.mark.parametrize("k,n,gs,act,sym", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_int4_kernel_matches_reference(k, n, gs, act, sym, dtype):
    q = _layer(k, n, gs, act, sym)
    w = CpuW4Weight.build(q.qweight, q.qzeros, q.scales, q.g_idx)
    if gs == -1 and k % 32:
        assert w is None  # per-channel K=136 has no 32/64/128/256 sub-group: the caller keeps the reference
        return
    assert w is not None
    bias = torch.randn(n)
    for m in MS:
        x = torch.randn(m, k).to(dtype)
        _check(w.matmul(x, bias), w4_matmul_ref(x, q.qweight, q.qzeros, q.scales, q.g_idx, bias), dtype, CPU_TOL)
    x3 = torch.randn(2, 5, k).to(dtype)
    assert w.matmul(x3).shape == (2, 5, n)


@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 11008), (11008, 4096)])
def test_cpu_int4_kernel_on_real_7b_shapes(k, n):
    q = rtn_quantize(torch.randn(n, k) * 0.02, GPTQConfig(group_size=128))
    perm = torch.randperm(k)  # an act-order-like g_idx: rows of each group scattered
    g_idx = (torch.arange(k) // 128).to(torch.int32)[perm]
    from qwen_audio_edge.kernels.w4_ref import pack_rows, unpack_rows

    qweight = pack_rows(unpack_rows(q.qweight)[perm])
    w = CpuW4Weight.build(qweight, q.qzeros, q.scales, g_idx)
    for m in (1, 8, 400):  # 400 rows: the dequantize + dense bf16 path (prefill)
        x = torch.randn(m, k)
        _check(w.matmul(x), w4_matmul_ref(x, qweight, q.qzeros, q.scales, g_idx), torch.float32, CPU_TOL)


def test_cpu_dense_prefill_path_matches_the_int4_op():
    """The large-M path decodes torch's packed layout itself: it must agree with the op row for row."""
    from qwen_audio_edge.kernels import w4_cpu

    assert w4_cpu.packed_layout() is not None, "the fast prefill path must be active on this CPU"
    for k, n, gs, act, sym in [(256, 64, 64, True, True), (224, 192, 32, True, False), (512, 128, -1, False, True)]:
        q = _layer(k, n, gs, act, sym)
        w = CpuW4Weight.build(q.qweight, q.qzeros, q.scales, q.g_idx)
        x = torch.randn(w4_cpu.DENSE_MIN_ROWS + 3, k)
        dense = w.matmul(x)
        xb = (x.index_select(1, w.perm) if w.perm is not None else x).to(torch.bfloat16)
        op = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w.packed, w.group, w.scales_zeros).float()
        _check(dense, op, torch.float32, 1e-2)
        ref = w4_matmul_ref(x, q.qweight, q.qzeros, q.scales, q.g_idx)
        _check(dense, ref, torch.float32, CPU_TOL)


_LAYOUT_SCRIPT = """
import warnings, torch
warnings.simplefilter("error")  # a refused fast path warns: that must fail this check
from qwen_audio_edge.kernels import w4_cpu
layout = w4_cpu.packed_layout()
assert layout is not None
gen = torch.Generator().manual_seed(1)
k, n = 256, 192
q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
sz = (torch.rand(k // 64, n, 2, generator=gen) + 0.5).to(torch.bfloat16)
w = w4_cpu.CpuW4Weight(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz, 64, None, k, n)
x = torch.randn(w4_cpu.DENSE_MIN_ROWS, k, generator=gen).to(torch.bfloat16)
op = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.packed, 64, sz).float()
dense = w.matmul(x).float()
err = ((dense - op).abs().max() / op.abs().max()).item()
# measured 5.6e-3 on every build path (5.4e-3 with seed 2): both sides are bf16 matmuls, and rounding the bf16
# output alone is up to 2^-8 = 3.9e-3 of an element; bound 1e-2 (margin 1.8×)
assert err < 1e-2, err
print(torch.backends.cpu.get_cpu_capability(), layout.block, f"{err:.2e}")
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_cpu_dense_prefill_path_on_every_torch_cpu_build_path(capability):
    """torch packs int4 differently per instruction set; ATEN_CPU_CAPABILITY selects each build path
    (one above the CPU's own falls back to the highest it has), and the fast path must read each."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, "-c", _LAYOUT_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    cap, block, _ = out.stdout.split()
    assert int(block) == (64 if cap == "AVX512" else 32)


def _pack_blocks(q: torch.Tensor, block: int, lo: list[int], hi: list[int]) -> torch.Tensor:
    """A reference packer for a hypothetical block layout (written from the layout's definition)."""
    n, k = q.shape
    half = block // 2
    out = torch.empty(n // block, k, half, dtype=torch.uint8)
    for nb in range(n // block):
        for j in range(half):
            out[nb, :, j] = (q[nb * block + lo[j]] | (q[nb * block + hi[j]] << 4)).to(torch.uint8)
    return out.reshape(n, k // 2)


def test_packed_layout_inference_reads_any_block_layout_and_refuses_others():
    from qwen_audio_edge.kernels.w4_cpu import infer_packed_layout

    gen = torch.Generator().manual_seed(0)
    for block in (64, 32, 16):
        rows = torch.randperm(block, generator=gen).tolist()
        lo, hi = rows[: block // 2], rows[block // 2 :]
        layout = infer_packed_layout(lambda q, b=block, lo=lo, hi=hi: _pack_blocks(q, b, lo, hi))
        assert layout is not None and (layout.block, list(layout.lo), list(layout.hi)) == (block, lo, hi)
        q = torch.randint(0, 16, (2 * block, 48), dtype=torch.int32, generator=gen)
        assert torch.equal(layout.unpack(_pack_blocks(q, block, lo, hi), 2 * block, 48).T.to(torch.int32), q)
    # a layout that is no block layout (columns scrambled) is refused, not guessed
    scramble = torch.randperm(128 * 16, generator=gen)
    assert (
        infer_packed_layout(lambda q: _pack_blocks(q, 32, list(range(16)), list(range(16, 32))).reshape(-1)[scramble])
        is None
    )


def test_unreadable_layout_warns_once_and_uses_the_int4_op(monkeypatch):
    from qwen_audio_edge.kernels import w4_cpu

    monkeypatch.setattr(w4_cpu, "_LAYOUT_DONE", False)
    monkeypatch.setattr(w4_cpu, "_LAYOUT", None)
    monkeypatch.setattr(w4_cpu, "_WARNED", set())
    monkeypatch.setattr(w4_cpu, "infer_packed_layout", lambda *a, **k: None)
    q = _layer(256, 64, 64, False, True)
    w = CpuW4Weight.build(q.qweight, q.qzeros, q.scales, q.g_idx)
    x = torch.randn(w4_cpu.DENSE_MIN_ROWS, 256)
    with pytest.warns(RuntimeWarning, match="matches no known block layout"):
        y = w.matmul(x)
    _check(y, w4_matmul_ref(x, q.qweight, q.qzeros, q.scales, q.g_idx), torch.float32, CPU_TOL)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w.matmul(x)  # once only


def test_cpu_kernel_declines_what_it_cannot_run():
    q = _layer(128, 24, 32, False, True)  # N = 24 is not a multiple of 16
    assert CpuW4Weight.build(q.qweight, q.qzeros, q.scales, q.g_idx) is None
    q = _layer(128, 32, 32, False, True)
    w = CpuW4Weight.build(q.qweight, q.qzeros, q.scales, q.g_idx)
    with pytest.raises(ValueError, match="features"):
        w.matmul(torch.randn(1, 127))


# The Triton tests run on CUDA when there is a GPU, else on CPU tensors under TRITON_INTERPRET=1 (conftest).
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _on_dev(q):
    return [t.to(DEV) for t in (q.qweight, q.qzeros, q.scales, q.g_idx)]


@pytest.mark.parametrize("k,n,gs,act,sym", CASES + [(136, 24, -1, True, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_kernels_match_reference(k, n, gs, act, sym, dtype):
    pytest.importorskip("triton", reason="triton is in the dev extra")
    from qwen_audio_edge.kernels.w4_triton import DECODE_MAX_M, TritonW4Weight

    q = _layer(k, n, gs, act, sym)
    w = TritonW4Weight.build(*_on_dev(q), tuner=None)
    assert w is not None
    bias = torch.randn(n, device=DEV)
    for m in MS:
        x = torch.randn(m, k, device=DEV).to(dtype)
        ref = w4_matmul_ref(x.float(), *_on_dev(q), bias).to(dtype)
        _check(w.matmul(x, bias), ref, dtype)
    assert any(m <= DECODE_MAX_M for m in MS) and any(m > DECODE_MAX_M for m in MS)  # both kernels ran
    x3 = torch.randn(2, 5, k, device=DEV).to(dtype)
    assert w.matmul(x3).shape == (2, 5, n)
    with pytest.raises(ValueError, match="features"):
        w.matmul(torch.randn(1, k + 8, device=DEV))


@pytest.mark.parametrize("k,n,gs,act", [(384, 48, 128, True), (512, 40, 32, True), (136, 24, -1, False)])
def test_every_triton_config_matches_reference(k, n, gs, act):
    """Every launch shape the GPU tuner may pick is correct: decode configs (split-K with the in-kernel
    ticket reduction included) for 1/3/8 rows, prefill configs for 17/40 rows; the tickets are back to 0."""
    pytest.importorskip("triton", reason="triton is in the dev extra")
    from qwen_audio_edge.kernels.w4_triton import TritonW4Weight, gemm_candidates, gemv_candidates

    q = _layer(k, n, gs, act, sym=False)
    w = TritonW4Weight.build(*_on_dev(q), tuner=None)
    bias = torch.randn(n, device=DEV)
    for m, bm in ((1, 1), (3, 4), (8, 8), (17, None), (40, None)):
        x = torch.randn(m, k, device=DEV).half()
        ref = w4_matmul_ref(x.float(), *_on_dev(q), bias).half()
        configs = gemv_candidates(bm, w.group, w.k) if bm else gemm_candidates(m)
        assert configs
        for config in configs:
            _check(w.matmul(x, bias, config=config), ref, torch.float16)
        assert int(w.counters.abs().sum()) == 0
    if any(c.split_k > 1 for c in gemv_candidates(1, w.group, w.k)):
        assert w.workspace is not None  # a split-K config really ran


def test_triton_split_k_is_deterministic_and_equals_unsplit():
    """The split-K partial sums are reduced in split order, whichever program finishes last."""
    pytest.importorskip("triton", reason="triton is in the dev extra")
    from qwen_audio_edge.kernels.w4_triton import GemvConfig, TritonW4Weight

    q = _layer(1024, 64, 128, True, False)
    w = TritonW4Weight.build(*_on_dev(q), tuner=None)
    x = torch.randn(1, 1024, device=DEV)
    split = [w.matmul(x, config=GemvConfig(32, 128, 4)) for _ in range(2)]
    assert torch.equal(split[0], split[1])
    whole = w.matmul(x, config=GemvConfig(32, 128, 1))
    _check(split[0], whole, torch.float32)
    assert int(w.counters.abs().sum()) == 0


def test_triton_wrapper_rejects_bad_input():
    pytest.importorskip("triton", reason="triton is in the dev extra")
    from qwen_audio_edge.kernels.w4_triton import GemmConfig, GemvConfig, TritonW4Weight

    q = _layer(256, 64, 64, False, True)
    w = TritonW4Weight.build(*_on_dev(q), tuner=None)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        w.matmul(torch.ones(1, 256, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match="bias must be"):
        w.matmul(torch.randn(1, 256, device=DEV), torch.randn(63, device=DEV))
    with pytest.raises(ValueError, match="not a decode config"):
        w.matmul(torch.randn(1, 256, device=DEV), config=GemmConfig(16, 64))
    with pytest.raises(ValueError, match="not a decode config"):
        w.matmul(torch.randn(2, 256, device=DEV), config=GemvConfig(32, 128, split_k=2))  # split-K is for one row
    with pytest.raises(ValueError, match="not a prefill config"):
        w.matmul(torch.randn(20, 256, device=DEV), config=GemmConfig(16, 64, block_k=64))
    with pytest.raises(ValueError, match="activation prep needs tiles within one group"):
        w.matmul(torch.randn(1, 256, device=DEV), config=GemvConfig(32, 128, x_prep=True))  # group 64 < 128
    x = torch.randn(1, 256, device=DEV)  # a tile straddling groups runs on the general kernel, still exact
    _check(w.matmul(x, config=GemvConfig(32, 128, 2)), w4_matmul_ref(x, *_on_dev(q)), torch.float32)
    assert w.matmul(torch.randn(0, 256, device=DEV)).shape == (0, 64)
    bad = _layer(256, 64, 64, False, True)
    assert (
        TritonW4Weight.build(*_on_dev(bad)[:3], torch.full((256,), 3, dtype=torch.int32, device=DEV)) is None
    )  # groups not contiguous


def test_tuner_picks_the_fastest_config_that_runs_and_remembers_it():
    pytest.importorskip("triton", reason="triton is in the dev extra")
    from qwen_audio_edge.kernels.w4_triton import Tuner

    seconds = {"a": 3.0, "b": 1.0, "c": 0.5, "d": 2.0}
    ran = []

    def run(cfg):
        ran.append(cfg)
        if cfg == "c":
            raise RuntimeError("out of shared memory")  # e.g. a tile too big for this GPU

    def measure(fn):
        fn()
        return seconds[ran[-1]]

    tuner = Tuner(measure=measure)
    assert tuner.choose(("k",), ("a", "b", "c", "d"), run) == "b"
    assert [t is None for _, t in tuner.timings[("k",)]] == [False, False, True, False]
    ran.clear()
    assert tuner.choose(("k",), ("a", "b", "c", "d"), run) == "b" and ran == []  # remembered, not re-timed
    with pytest.raises(RuntimeError, match="no Triton kernel config ran for other"):
        tuner.choose(("other",), ("c",), run)


def test_quantlinear_paths_agree():
    """QuantLinear.prepare: the CPU fast path and the reference give the same layer output."""
    from qwen_audio_edge.runtime.quant_linear import QuantLinear

    q = _layer(256, 64, 64, True, False)
    layers = {}
    interpreted = not torch.cuda.is_available()  # CPU tensors reach Triton only through the interpreter
    for kernel in ("ref", "cpu", "triton") if interpreted else ("ref", "cpu"):
        ql = QuantLinear(256, 64, 64, bias=True)
        ql.qweight, ql.qzeros, ql.scales, ql.g_idx = (
            q.qweight.clone(),
            q.qzeros.clone(),
            q.scales.clone(),
            q.g_idx.clone(),
        )
        ql.bias = torch.randn(64, generator=torch.Generator().manual_seed(0)).half()
        assert ql.prepare(kernel) == kernel
        layers[kernel] = ql
    x = torch.randn(5, 256)
    ref = layers["ref"](x)
    _check(layers["cpu"](x), ref, torch.float32, CPU_TOL)
    if interpreted:
        _check(layers["triton"](x), ref, torch.float32)
    with pytest.raises(ValueError, match="unknown W4 kernel"):
        QuantLinear(256, 64, 64, bias=False).prepare("cuda-magic")


def test_triton_kernel_on_cpu_weights_is_refused_clearly(monkeypatch):
    from qwen_audio_edge.runtime.errors import ArtifactsError
    from qwen_audio_edge.runtime.quant_linear import QuantLinear

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = _layer(256, 64, 64, False, True)
    ql = QuantLinear(256, 64, 64, bias=False)
    ql.qweight, ql.qzeros, ql.scales, ql.g_idx = q.qweight, q.qzeros, q.scales, q.g_idx
    with pytest.raises(ArtifactsError, match=r"cannot run .* on cpu; use --w4-kernel auto or ref"):
        ql.prepare("triton")
    assert ql.prepare("auto") == "cpu"


def test_w4_tuning_opt_out_reaches_the_kernel():
    """--no-w4-tune → RuntimeOptions(w4_tune=False) → the Triton weight has no tuner (default configs)."""
    pytest.importorskip("triton", reason="triton is in the dev extra")
    from qwen_audio_edge.cli import _runtime_options, build_parser
    from qwen_audio_edge.kernels.w4_triton import TUNER
    from qwen_audio_edge.runtime.quant_linear import QuantLinear

    a = build_parser().parse_args(["run", "ARTIFACTS", "--no-w4-tune"])
    assert _runtime_options(a).w4_tune is False
    assert _runtime_options(build_parser().parse_args(["run", "ARTIFACTS"])).w4_tune is True
    if torch.cuda.is_available():
        return
    q = _layer(256, 64, 64, False, True)
    for tune, expected in ((False, None), (True, TUNER)):
        ql = QuantLinear(256, 64, 64, bias=False)
        ql.qweight, ql.qzeros, ql.scales, ql.g_idx = q.qweight, q.qzeros, q.scales, q.g_idx
        assert ql.prepare("triton", tune=tune) == "triton"
        assert ql.kernel.tuner is expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_head_gemv_matches_the_chunked_reference(dtype):
    """The Triton int8 lm_head GEMV (CUDA decode path), every candidate config, odd N and K, vs the chunked twin."""
    pytest.importorskip("triton", reason="triton is in the dev extra")
    from qwen_audio_edge.kernels.int8_triton import INT8_CANDIDATES, int8_gemv
    from qwen_audio_edge.runtime.quant_linear import Int8Linear, quantize_int8_rows

    torch.manual_seed(0)
    q, s = quantize_int8_rows(torch.randn(1000, 200))
    q = q.clone()
    q[0, :4] = torch.tensor([-127, 127, -1, 0], dtype=torch.int8)  # the byte trick's edge values
    head = Int8Linear(q.to(DEV), s.to(DEV))
    x = torch.randn(1, 200, device=DEV).to(dtype)
    ref = head.reference(x)
    for config in INT8_CANDIDATES:
        _check(int8_gemv(x, head.weight, head.scales, config=config, tuner=None), ref, dtype)
    with pytest.raises(ValueError, match="x \\[1, 200\\]"):
        int8_gemv(torch.randn(2, 200, device=DEV), head.weight, head.scales)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        int8_gemv(torch.ones(1, 200, dtype=torch.int32, device=DEV), head.weight, head.scales)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_fused_elementwise_kernels_match_the_torch_ops(dtype, tol):
    """kernels/fused_triton.py against runtime/decoder.py's torch code (RMSNorm with and without the
    residual add, RoPE on q and k heads in place, SwiGLU), odd widths included."""
    pytest.importorskip("triton", reason="triton is in the dev extra")
    from qwen_audio_edge.kernels import fused_triton as ft
    from qwen_audio_edge.runtime.decoder import RMSNorm, _apply_rope

    torch.manual_seed(0)
    norm = RMSNorm(200, 1e-6).to(device=DEV, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(200) + 0.5)
    x, delta = (torch.randn(3, 5, 200, device=DEV) * 3).to(dtype), torch.randn(3, 5, 200, device=DEV).to(dtype)
    out, s = ft.rms_norm(x, norm.weight, norm.eps)
    _check(out, norm(x), dtype, tol)
    assert s is not None and torch.equal(s, x)
    out, s = ft.rms_norm(x, norm.weight, norm.eps, delta=delta)
    if dtype == torch.bfloat16 and DEV == "cpu":  # the CPU interpreter truncates fp32 → bf16 (≤ 1 bf16 ulp)
        _check(s, x + delta, dtype, 2**-7)
    else:
        assert torch.equal(s, x + delta)  # the residual sum is rounded as the reference adds
    _check(out, norm(x + delta), dtype, tol)

    tokens, nq, nkv, hd, ctx = 7, 4, 2, 32, 20
    for start in (3, torch.tensor([5], device=DEV)):  # an int (prefill) or a device tensor (graph step)
        qkv = torch.randn(tokens, (nq + 2 * nkv) * hd, device=DEV).to(dtype)
        ang = torch.rand(tokens, hd // 2, device=DEV) * 6
        cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
        heads = qkv.view(tokens, nq + 2 * nkv, hd).transpose(0, 1)  # [heads, tokens, hd]
        expected = _apply_rope(heads[: nq + nkv], cos, sin)
        v = heads[nq + nkv :].clone()
        ck, cv = (
            torch.zeros(1, nkv, ctx, hd, device=DEV, dtype=dtype),
            torch.zeros(1, nkv, ctx, hd, device=DEV, dtype=dtype),
        )
        ft.rope_kv_cache_(qkv, nq, nkv, hd, cos, sin, ck, cv, start)
        p0 = int(start)
        _check(heads[:nq], expected[:nq], dtype, tol)  # q rotated in place
        _check(ck[0, :, p0 : p0 + tokens], expected[nq:], dtype, tol)  # k rotated into the cache
        assert torch.equal(cv[0, :, p0 : p0 + tokens], v)  # v copied into the cache
        assert not ck[0, :, :p0].any() and not cv[0, :, p0 + tokens :].any()  # nothing else written

    gu = torch.randn(2, 3, 2 * 300, device=DEV).to(dtype)
    gate, up = gu.chunk(2, dim=-1)
    _check(ft.silu_mul(gu), torch.nn.functional.silu(gate) * up, dtype, tol)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        ft.rope_kv_cache_(qkv, nq, nkv, 24, cos, sin, ck, cv, 0)
    with pytest.raises(ValueError, match="caches must be contiguous"):
        ft.rope_kv_cache_(qkv, nq, nkv, hd, cos, sin, ck[:, :1], cv, 0)


def test_permute_rows_in_column_chunks_equals_the_whole_repack():
    pytest.importorskip("triton", reason="triton is in the dev extra")
    from qwen_audio_edge.kernels.w4_ref import pack_rows, unpack_rows
    from qwen_audio_edge.kernels.w4_triton import permute_rows

    qweight = torch.randint(-(2**31), 2**31 - 1, (32, 40), dtype=torch.int32)
    perm = torch.randperm(256)
    assert torch.equal(permute_rows(qweight, perm, chunk=16), pack_rows(unpack_rows(qweight)[perm]))


def test_triton_kernels_compile_for_hopper():
    """Every kernel's default config compiles for sm_90 (H100/H200) on this GPU-less machine
    (bench/compile_check.py; `python bench/compile_check.py` checks every tuner candidate). In a
    subprocess: the tests' TRITON_INTERPRET=1 turns kernels into interpreted functions."""
    pytest.importorskip("triton", reason="triton is in the dev extra")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError:
        pytest.skip("this triton's compiler internals differ from the ones bench/compile_check.py binds to")
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parents[1] / "bench" / "compile_check.py"
    r = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for kernel in ("gemv1", "x_prep", "gemv m=2", "gemm", "int8", "rms_norm", "rope_kv_cache", "silu_mul"):
        assert f"OK    {kernel}" in r.stdout, kernel
    assert "0 failed to compile" in r.stdout
