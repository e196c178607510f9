"""torch's own CUDA int4 matmul (tinygemm: `aten._weight_int4pack_mm`) over GPTQ W4 weights.

The fallback of the Triton W4 kernels on CUDA (runtime/quant_linear.py): it ships inside torch, so it
works where our Triton kernels cannot compile or fail their self-check. Same math as the reference twin
(kernels/w4_ref.py): w = (q − z)·s per group, written in tinygemm's form (q − 8)·s + s·(8 − z); it
computes in bf16 (its only activation dtype), so fp16/fp32 inputs are cast in and out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .w4_ref import check_shapes, group_sort, int4pack_scales_zeros, unpack_rows

GROUPS = (32, 64, 128, 256)  # the group sizes tinygemm supports
INNER_K_TILES = 8


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm") and hasattr(torch.ops.aten, "_convert_weight_to_int4pack")


@dataclass(frozen=True)
class TinygemmW4Weight:
    packed: torch.Tensor  # tinygemm's tiled int4 layout of [N, K] (K in activation-permuted order)
    scales_zeros: torch.Tensor  # bf16 [K / group, N, 2]
    group: int
    perm: torch.Tensor | None  # activation column permutation (act-order), or None
    k: int
    n: int

    @classmethod
    def build(
        cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor
    ) -> TinygemmW4Weight | None:
        """Repack GPTQ tensors on their CUDA device; None where tinygemm cannot run this layer."""
        if qweight.device.type != "cuda" or not available():
            return None
        k, n, g = check_shapes(qweight, qzeros, scales, g_idx)
        if k % g or n % 8 or k % (INNER_K_TILES * 16):
            return None
        gs = k // g
        ok, perm = group_sort(g_idx, gs)
        if not ok:
            return None
        sub = next((t for t in reversed(GROUPS) if gs % t == 0), None)  # tinygemm group dividing ours
        if sub is None:
            return None
        q = unpack_rows(qweight)  # [K, N] nibbles
        if perm is not None:
            q = q[perm]
        nib = q.T.contiguous()  # [N, K]
        packed_u8 = ((nib[:, ::2] << 4) | nib[:, 1::2]).to(torch.uint8).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, INNER_K_TILES)
        sz = int4pack_scales_zeros(qzeros, scales, gs, sub)
        return cls(packed=packed, scales_zeros=sz, group=sub, perm=perm, k=k, n=n)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.k:
            raise ValueError(f"x has {x.shape[-1]} features, the W4 weight expects {self.k}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        y = torch.ops.aten._weight_int4pack_mm(
            x2.to(torch.bfloat16).contiguous(), self.packed, self.group, self.scales_zeros
        ).to(x.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*lead, self.n)
