"""Fast CPU W4A16 path: GPTQ weights repacked once into torch's CPU int4 layout (tinygemm for CPU).

torch ≥ 2.6 ships `aten._weight_int4pack_mm_for_cpu`: y = x @ Wᵀ with W[n, k] = (q − 8)·scale + zero per
(group of k, n), q in 0…15 packed by `_convert_weight_to_int4pack_for_cpu`. GPTQ's W[k, n] =
s·(q − z) = s·(q − 8) + s·(8 − z), so scale = s and zero = s·(8 − z): sym and asym zeros map exactly.
Act-order (a non-monotonic g_idx) is handled without any per-call weight gather: the K rows are sorted
by group once at repack time and each call permutes the activations' K columns instead.
Constraints of the op: N % 16 == 0 and groups of 32/64/128/256 rows (larger groups, e.g. per-channel,
are split into 128-row groups with repeated parameters). `CpuW4Weight.build` returns None when a layer
does not fit; the caller then keeps the reference kernel (kernels/w4_ref.py).

Shapes/dtypes: x [..., K] fp32/bf16/fp16 → y [..., N] in x's dtype. The op runs in bf16 whatever the
input dtype: measured on this project's 2-core CI machine (torch 2.13), a 4096×4096 GEMV takes 0.44 ms
with bf16 activations, 15.6 ms with fp16 and ~33× the bf16 time with fp32. So fp32/fp16 activations are
rounded to bf16 for the W4 matmul, and so are the per-group scale and zero (relative error ~2⁻⁹ per
weight, far below the 4-bit error); the result is returned in the input dtype. Tests compare with the
reference at a bf16 tolerance; use `--w4-kernel ref` where bit-exact agreement with the export matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .w4_ref import check_shapes, unpack_cols, unpack_rows

_GROUPS = (256, 128, 64, 32)


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


@dataclass
class CpuW4Weight:
    packed: torch.Tensor  # uint8, torch's CPU int4 layout of [N, K]
    scales_zeros: torch.Tensor  # bf16 [K / group, N, 2]
    group: int
    perm: torch.Tensor | None  # K permutation applied to activations (act-order), or None
    k: int
    n: int

    @classmethod
    def build(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> "CpuW4Weight | None":
        """Repack GPTQ tensors; None when this layer cannot use the CPU int4 op."""
        if not available():
            return None
        k, n, g = check_shapes(qweight, qzeros, scales, g_idx)
        if n % 16 or k % g:
            return None
        gs = k // g
        gi = g_idx.long()
        perm = None
        if not bool((gi[1:] >= gi[:-1]).all()):
            perm = torch.argsort(gi, stable=True)
            gi = gi[perm]
        if not torch.equal(gi, torch.arange(k) // gs):
            return None  # groups are not contiguous equal blocks even after sorting
        sub = next((t for t in _GROUPS if gs % t == 0), None)
        if sub is None:
            return None
        q = unpack_rows(qweight)  # [K, N]
        if perm is not None:
            q = q[perm]
        z = (unpack_cols(qzeros) + 1).float()  # [G, N]
        s = scales.float()
        sz = torch.stack([s, s * (8.0 - z)], dim=-1).repeat_interleave(gs // sub, dim=0).to(torch.bfloat16).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.T.contiguous().to(torch.int32), 1)
        return cls(packed=packed, scales_zeros=sz, group=sub, perm=perm, k=k, n=n)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.k:
            raise ValueError(f"x has {x.shape[-1]} features, the W4 weight expects {self.k}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), self.packed, self.group,
                                                       self.scales_zeros).to(x.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*lead, self.n)
