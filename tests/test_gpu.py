"""GPU-only checks (marker `gpu`; skipped on CPU machines). Run on a GPU by bench/gpu_check.sh.

Triton W4 kernels on CUDA against the reference on the real 7B layer shapes, and the pipeline on CUDA
(fp32 activations, so greedy tokens must equal transformers' / the CPU reference path).
"""

from __future__ import annotations

import pytest
import torch

from helpers import GREEDY_KW, PROMPT, reference_greedy, reference_inputs, signal
from qwen_audio_edge.runtime.generate import SamplingOptions

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 11008), (11008, 4096)])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_triton_real_shapes_on_cuda(k, n, dtype, tol):
    from qwen_audio_edge.export.gptq import GPTQConfig, rtn_quantize
    from qwen_audio_edge.kernels.w4_ref import pack_rows, unpack_rows, w4_matmul_ref
    from qwen_audio_edge.kernels.w4_triton import TritonW4Weight

    q = rtn_quantize(torch.randn(n, k) * 0.02, GPTQConfig(group_size=128, sym=False))
    perm = torch.randperm(k)
    qweight, g_idx = pack_rows(unpack_rows(q.qweight)[perm]), q.g_idx[perm].contiguous()
    # default configs (tuner=None) keep the compile count low; every tuner candidate is checked below
    w = TritonW4Weight.build(qweight.cuda(), q.qzeros.cuda(), q.scales.cuda(), g_idx.cuda(), tuner=None)
    for m in (1, 2, 3, 8, 17, 64, 200, 800):
        x = torch.randn(m, k, device="cuda")
        ref = w4_matmul_ref(x, qweight.cuda(), q.qzeros.cuda(), q.scales.cuda(), g_idx.cuda())
        y = w.matmul(x.to(dtype)).float()
        assert (y - ref).abs().max().item() <= tol * ref.abs().max().item()


@pytest.mark.parametrize("k,n", [(4096, 4096), (11008, 4096)])
def test_tinygemm_fallback_matches_the_reference_on_cuda(k, n):
    """torch's CUDA int4 op over our repack (the Triton kernels' fallback) computes the same layer, act-order
    included; it runs in bf16, so the bound is bf16's (see the comment at the assertion)."""
    from qwen_audio_edge.kernels.w4_ref import w4_matmul_ref
    from qwen_audio_edge.kernels.w4_tinygemm import TinygemmW4Weight

    qweight, qzeros, scales, g_idx = _real_layer(k, n)
    t = TinygemmW4Weight.build(qweight, qzeros, scales, g_idx)
    assert t is not None and t.perm is not None
    for m in (1, 8, 64):
        x = torch.randn(m, k, device="cuda")
        ref = w4_matmul_ref(x, qweight, qzeros, scales, g_idx)
        err = ((t.matmul(x.half()).float() - ref).abs().max() / ref.abs().max()).item()
        print(f"tinygemm {k}x{n} m={m}: relative error {err:.2e}")
        # Not measured: no GPU on the machines this bound was reviewed on (bench/results/ holds no GPU run yet), so
        # it stays bf16's, as CPU_TOL in test_kernels.py for the CPU int4 op (bf16 too: measured 2.8e-3–4.0e-3 on
        # the 7B shapes, max_rel_err in bench/results/cpu/kernels.json). Tighten to measured + margin from the
        # first GPU run (the value is printed above; pytest -rA shows it).
        assert err <= 2e-2


def _real_layer(k: int, n: int):
    from qwen_audio_edge.export.gptq import GPTQConfig, rtn_quantize
    from qwen_audio_edge.kernels.w4_ref import pack_rows, unpack_rows

    q = rtn_quantize(torch.randn(n, k) * 0.02, GPTQConfig(group_size=128, sym=False))
    perm = torch.randperm(k)
    return [t.cuda() for t in (pack_rows(unpack_rows(q.qweight)[perm]), q.qzeros, q.scales, q.g_idx[perm].contiguous())]


def test_every_triton_decode_config_on_cuda():
    """Each config the tuner may pick compiles and is correct on this GPU at a real shape (fp16, M = 1),
    and the tuner's pick is one of them."""
    from qwen_audio_edge.kernels.w4_ref import w4_matmul_ref
    from qwen_audio_edge.kernels.w4_triton import TritonW4Weight, Tuner, device_arch, gemv_candidates

    arch = device_arch(torch.device("cuda"))  # the candidates the tuner may pick on this GPU
    t = _real_layer(4096, 4096)
    tuner = Tuner()
    w = TritonW4Weight.build(*t, tuner=tuner)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    bias = torch.randn(4096, device="cuda", dtype=torch.float16)
    ref = w4_matmul_ref(x.float(), *t, bias.float())
    for config in gemv_candidates(1, 128, 4096, arch, torch.float16):
        y = w.matmul(x, bias, config=config).float()
        assert (y - ref).abs().max().item() <= 3e-3 * ref.abs().max().item(), config
    y = w.matmul(x, bias).float()
    assert (y - ref).abs().max().item() <= 3e-3 * ref.abs().max().item()
    (choice,) = tuner.choices.values()
    assert choice in gemv_candidates(1, 128, 4096, arch, torch.float16)
    assert int(w.counters.abs().sum()) == 0


def test_every_triton_prefill_and_small_batch_config_on_cuda():
    """The prefill GEMM configs (M = 64, 800), the 2–8-row GEMV configs and the int8 head GEMV configs the
    tuner may pick are each correct on this GPU (fp16, a real 7B shape)."""
    from qwen_audio_edge.kernels.int8_triton import int8_candidates, int8_gemv
    from qwen_audio_edge.kernels.w4_ref import w4_matmul_ref
    from qwen_audio_edge.kernels.w4_triton import TritonW4Weight, device_arch, gemm_candidates, gemv_candidates
    from qwen_audio_edge.runtime.quant_linear import Int8Linear, quantize_int8_rows

    arch, fp16 = device_arch(torch.device("cuda")), torch.float16  # what the tuner may pick on this GPU
    t = _real_layer(4096, 4096)
    w = TritonW4Weight.build(*t, tuner=None)
    for m, configs in (
        (64, gemm_candidates(64, arch, fp16)),
        (800, gemm_candidates(800, arch, fp16)),
        (8, gemv_candidates(8, 128, 4096, arch, fp16)),
    ):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        ref = w4_matmul_ref(x.float(), *t)
        for config in configs:
            y = w.matmul(x, config=config).float()
            assert (y - ref).abs().max().item() <= 3e-3 * ref.abs().max().item(), (m, config)
    q, s = quantize_int8_rows(torch.randn(32768, 4096, device="cuda") * 0.02)
    head = Int8Linear(q, s)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    ref = head.reference(x).float()
    for config in int8_candidates(arch, fp16):
        y = int8_gemv(x, q, s, config=config, tuner=None).float()
        assert (y - ref).abs().max().item() <= 3e-3 * ref.abs().max().item(), config


def test_fused_kernels_give_the_torch_tokens_on_cuda(gqa, pipelines):
    """fp16 GQA decoding on CUDA with the fused norm / RoPE+KV / SwiGLU kernels (and graphs) gives the
    tokens of the same pipeline on plain torch ops."""
    fused = pipelines(gqa, device="cuda", dtype="fp16", encoder_backend="torch")
    plain = pipelines(gqa, device="cuda", dtype="fp16", encoder_backend="torch", fuse=False)
    assert fused.decoder.fused_kernels and not plain.decoder.fused_kernels
    wave = signal(3.7)
    opts = SamplingOptions(max_new_tokens=24, **GREEDY_KW)
    a = fused.run(wave, "What does the person say?", sampling=opts)
    b = plain.run(wave, "What does the person say?", sampling=opts)
    assert a.token_ids == b.token_ids


def test_triton_split_k_replayed_in_a_cuda_graph():
    """The split-K tickets reset themselves, so graph replays give the eager result bit for bit."""
    from qwen_audio_edge.kernels.w4_triton import GemvConfig, TritonW4Weight

    w = TritonW4Weight.build(*_real_layer(11008, 4096), tuner=None)
    x = torch.randn(1, 11008, device="cuda", dtype=torch.float16)
    config = GemvConfig(32, 128, 4)
    eager = w.matmul(x, config=config)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = w.matmul(x, config=config)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, eager)


def test_int8_head_on_cuda_at_the_7b_shape():
    """The int8 lm_head's one-row CUDA path (Triton GEMV) equals its chunked reference at 156,032 × 4096."""
    from qwen_audio_edge.runtime.quant_linear import Int8Linear, quantize_int8_rows

    q, s = quantize_int8_rows(torch.randn(156032, 4096, device="cuda") * 0.02)
    head = Int8Linear(q, s)
    x = torch.randn(1, 1, 4096, device="cuda", dtype=torch.float16)
    y, ref = head(x).float(), head.reference(x).float()
    assert y.shape == (1, 1, 156032)
    assert (y - ref).abs().max().item() <= 3e-3 * ref.abs().max().item()


def test_fp_pipeline_on_cuda_matches_transformers(mha, pipelines):
    p = pipelines(mha, device="cuda", dtype="fp32", encoder_backend="torch")
    wave = signal(4.4)
    inputs = reference_inputs(mha, wave, "What does the person say?")
    expected = reference_greedy(mha, inputs, 32)
    got = p.run(wave, PROMPT, sampling=SamplingOptions(max_new_tokens=32, **GREEDY_KW))
    assert got.token_ids == expected


def test_w4_pipeline_on_cuda_uses_triton(mha, tmp_path):
    from qwen_audio_edge.export.calibrate import CalibrationOptions
    from qwen_audio_edge.export.package import ExportOptions, export_checkpoint
    from qwen_audio_edge.runtime.pipeline import Pipeline, RuntimeOptions

    export_checkpoint(
        mha.checkpoint,
        tmp_path / "w4",
        ExportOptions(bits=4, progress=False, quant_device="cuda", calibration=CalibrationOptions(num_samples=8)),
    )
    # default launch configs: tuning (timed in bench/) would compile every candidate for this tiny shape
    gpu = Pipeline.from_artifacts(
        tmp_path / "w4", RuntimeOptions(device="cuda", dtype="fp32", encoder_backend="torch", w4_tune=False)
    )
    ref = Pipeline.from_artifacts(tmp_path / "w4", RuntimeOptions(w4_kernel="ref"))
    assert gpu.decoder.w4_kernels == ["triton"]
    wave = signal(3.3)
    a = gpu.run(wave, "Hi", sampling=SamplingOptions(max_new_tokens=16, **GREEDY_KW))
    b = ref.run(wave, "Hi", sampling=SamplingOptions(max_new_tokens=16, **GREEDY_KW))
    assert a.token_ids == b.token_ids
    half = Pipeline.from_artifacts(
        tmp_path / "w4", RuntimeOptions(device="cuda", dtype="fp16", encoder_backend="torch", w4_tune=False)
    )
    assert len(half.run(wave, "Hi", sampling=SamplingOptions(max_new_tokens=16, **GREEDY_KW)).token_ids) == 16


def test_cuda_graph_decode_equals_eager(mha, pipelines):
    """Decode steps replayed as CUDA graphs give the eager tokens, across context buckets."""
    p = pipelines(mha, device="cuda", dtype="fp32", encoder_backend="torch")
    wave = signal(3.1)
    opts = SamplingOptions(max_new_tokens=40, **GREEDY_KW)
    graphed = p.run(wave, PROMPT, sampling=opts)
    assert p.decode_step() is not None and p.decode_step()._captured  # graphs were captured and replayed
    p.decode_step().min_bucket = 16
    p.decode_step()._captured.clear()
    small_buckets = p.run(wave, PROMPT, sampling=opts)
    eager = pipelines(mha, device="cuda", dtype="fp32", encoder_backend="torch", cuda_graphs=False)
    ref = eager.run(wave, "What does the person say?", sampling=opts)
    assert graphed.token_ids == ref.token_ids == small_buckets.token_ids
