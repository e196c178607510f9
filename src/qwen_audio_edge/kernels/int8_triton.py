"""Triton weight-only int8 GEMV for the lm_head on CUDA: y = (x @ Wᵀ) · scale for one row.

Why: the 7B head is 156,032 × 4096. In fp16 it is 1.28 GB read per token, a quarter of a W4 decode
step's bytes; the int8 side file halves that and saves 0.64 GB of device memory (it matters on 8 GB
cards). Without a kernel the int8 head would be dequantized to fp16 in chunks each token (reading the
int8, writing and re-reading fp16), slower than the fp16 head. Here each program streams BLOCK_N rows of
the int8 weight once (rows are contiguous along K: coalesced), converts bytes to fp32 through exponent
bits ((w + 128) | 0x4B000000 read as fp32 is 2²³ + 128 + w, exact) instead of a conversion instruction,
and accumulates in fp32; the per-row scale is applied once at the end.

Shapes/dtypes: x [1, K] fp16/bf16/fp32 → y [1, N] in x's dtype; weight int8 [N, K] contiguous, scales
fp32 [N]. The reference twin is Int8Linear's chunked torch path (runtime/quant_linear.py); tested under
TRITON_INTERPRET=1 on CPU, timed on GPUs by bench/decode.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .w4_triton import TUNER, Tuner, device_arch, fitting, on_device


@dataclass(frozen=True)
class Int8GemvConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


INT8_CANDIDATES: tuple[Int8GemvConfig, ...] = (
    Int8GemvConfig(64, 128, 4, 3),
    Int8GemvConfig(32, 256, 4, 3),
    Int8GemvConfig(128, 128, 8, 3),
    Int8GemvConfig(16, 512, 4, 4),
    Int8GemvConfig(64, 256, 8, 3),
)


@functools.cache
def int8_candidates(arch: int | None = None, dtype: torch.dtype = torch.float16) -> tuple[Int8GemvConfig, ...]:
    """INT8_CANDIDATES that fit sm_<arch> (all of them when arch is None; see w4_triton.fitting)."""
    return fitting("int8", INT8_CANDIDATES, arch, dtype)


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = tl.load(
            w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0
        )
        wb = ((w.to(tl.int32) & 0xFF) ^ 0x80) | 0x4B000000  # bits of 2^23 + (w + 128)
        wf = wb.to(tl.float32, bitcast=True) - 8388736.0  # exact w
        x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        acc += wf * x[None, :]
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, y, mask=n_mask)


def int8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    *,
    config: Int8GemvConfig | None = None,
    tuner: Tuner | None = TUNER,
) -> torch.Tensor:
    """x [1, K] → (x @ weight.T) · scales as [1, N] in x's dtype. `config` forces a launch shape (tests);
    else the tuner picks one per shape on CUDA (the first candidate when tuner is None or on CPU)."""
    if x.ndim != 2 or x.shape[0] != 1 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"int8 GEMV takes x [1, {weight.shape[1]}], got {tuple(x.shape)}")
    if weight.dtype != torch.int8 or not weight.is_contiguous() or scales.shape != (weight.shape[0],):
        raise ValueError("int8 GEMV needs a contiguous int8 weight [N, K] and scales [N]")
    if x.device != weight.device or scales.device != weight.device:
        raise ValueError(f"x, weight and scales must share a device (got {x.device}, {weight.device}, {scales.device})")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x is {x.dtype}; the int8 GEMV takes float16, bfloat16 or float32")
    n, k = weight.shape
    x = x.contiguous()
    out = torch.empty(1, n, device=x.device, dtype=x.dtype)

    def run(c: Int8GemvConfig) -> None:
        _int8_gemv_kernel[(triton.cdiv(n, c.block_n),)](
            x,
            weight,
            scales,
            out,
            n,
            k,
            BLOCK_N=c.block_n,
            BLOCK_K=c.block_k,
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )

    with on_device(x):
        if config is None:
            cands = int8_candidates(device_arch(x.device), x.dtype)
            if tuner is None or x.device.type != "cuda":
                config = cands[0]
            else:
                config = tuner.choose(("int8_gemv", k, n, x.dtype, str(x.device)), cands, run)
        run(config)
    return out
