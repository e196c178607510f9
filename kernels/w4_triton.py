"""Triton W4A16 kernels over the GPTQ layout: a split-K GEMV for decode (M ≤ 8) and a tiled GEMM for prefill.

Repacked once at load (`TritonW4Weight.build`): with act-order the K rows are sorted by group (the
activations' K columns are permuted per call instead — no weight gather at run time), so group g owns
rows g·GS … (g+1)·GS−1. Weights stay 4-bit in registers until the multiply:
w = (q − (stored_zero + 1)) · scale, accumulated in fp32.

Shapes/dtypes: x [..., K] fp16/bf16/fp32 on the weights' device → y [..., N] in x's dtype.
qweight int32 [K/8, N], qzeros int32 [G, N/8], scales fp16 [G, N]; K % GS == 0, N % 8 == 0.
Tested on CPU under TRITON_INTERPRET=1 (small shapes) against kernels/w4_ref.py; timed on GPUs by
bench/ (bench/gpu_check.sh).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .w4_ref import check_shapes, pack_rows, unpack_rows

DECODE_MAX_M = 8


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_k, offs_n, k_mask, n_mask, N, GS: tl.constexpr):
    """W[offs_k, offs_n] in fp32 from the packed nibbles: (q − (stored_zero + 1)) · scale."""
    mask = k_mask[:, None] & n_mask[None, :]
    packed = tl.load(qw_ptr + (offs_k[:, None] // 8) * N + offs_n[None, :], mask=mask, other=0)
    q = (packed >> ((offs_k[:, None] % 8) * 4)) & 0xF
    g = offs_k // GS
    s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    zp = tl.load(z_ptr + g[:, None] * (N // 8) + offs_n[None, :] // 8, mask=mask, other=0)
    z = ((zp >> ((offs_n[None, :] % 8) * 4)) & 0xF) + 1
    return (q - z).to(tl.float32) * s


@triton.jit
def _w4_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, K_PER_SPLIT,
                    GS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    for k0 in range(k_begin, k_begin + K_PER_SPLIT, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_k, offs_n, k_mask, n_mask, N, GS)
        acc += tl.sum(x[:, None] * w, axis=0)
    tl.store(out_ptr + (pid_k * M + m) * N + offs_n, acc, mask=n_mask)


@triton.jit
def _w4_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                    GS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_k, offs_n, k_mask, n_mask, N, GS)
        acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=m_mask[:, None] & n_mask[None, :])


@dataclass
class TritonW4Weight:
    qweight: torch.Tensor  # rows sorted by group
    qzeros: torch.Tensor
    scales: torch.Tensor
    perm: torch.Tensor | None
    group: int
    k: int
    n: int

    @classmethod
    def build(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> "TritonW4Weight | None":
        """Repack for the kernels; None if the groups are not contiguous equal blocks even after sorting."""
        k, n, g = check_shapes(qweight, qzeros, scales, g_idx)
        if k % g or n % 8:
            return None
        gs = k // g
        gi = g_idx.long().cpu()
        perm = None
        qw = qweight
        if not bool((gi[1:] >= gi[:-1]).all()):
            perm = torch.argsort(gi, stable=True)
            gi = gi[perm]
            qw = pack_rows(unpack_rows(qweight.cpu())[perm]).to(qweight.device)
        if not torch.equal(gi, torch.arange(k) // gs):
            return None
        return cls(qweight=qw.contiguous(), qzeros=qzeros.contiguous(), scales=scales.contiguous(),
                   perm=None if perm is None else perm.to(qweight.device), group=gs, k=k, n=n)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None, *, split_k: int | None = None) -> torch.Tensor:
        if x.shape[-1] != self.k:
            raise ValueError(f"x has {x.shape[-1]} features, the W4 weight expects {self.k}")
        if x.device != self.qweight.device:
            raise ValueError(f"x is on {x.device}, the W4 weight on {self.qweight.device}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        x2 = x2.contiguous()
        m = x2.shape[0]
        # Blocks may straddle groups (the group is computed per row), so any group size works; blocks
        # stay powers of two ≥ 16 as tl.arange and tl.dot require.
        block_k = 64 if self.group >= 64 else 32 if self.group >= 32 else 16
        if m <= DECODE_MAX_M:
            block_n = 64
            splits = split_k or max(1, min(self.k // self.group, 8))
            k_per = triton.cdiv(triton.cdiv(self.k, splits), block_k) * block_k
            splits = triton.cdiv(self.k, k_per)
            part = torch.empty(splits, m, self.n, device=x.device, dtype=torch.float32)
            grid = (triton.cdiv(self.n, block_n), m, splits)
            _w4_gemv_kernel[grid](x2, self.qweight, self.scales, self.qzeros, part, m, self.n, self.k, x2.stride(0), k_per,
                                  GS=self.group, BLOCK_N=block_n, BLOCK_K=block_k)
            y = part.sum(0)
        else:
            y = torch.empty(m, self.n, device=x.device, dtype=torch.float32)
            bm, bn = 32, 64
            grid = (triton.cdiv(m, bm), triton.cdiv(self.n, bn))
            _w4_gemm_kernel[grid](x2, self.qweight, self.scales, self.qzeros, y, m, self.n, self.k, x2.stride(0), y.stride(0),
                                  GS=self.group, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k)
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*lead, self.n)
