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

Large M (prefill of hundreds of audio tokens): the op's in-loop dequantization makes it compute-bound at
about 0.2 ms per row for a 4096×4096 layer, 2.4× slower than a dense bf16 matmul there. From
`DENSE_MIN_ROWS` rows on, `matmul` instead dequantizes the packed weight once per call into a transient
bf16 [K, N] matrix (the same (q − 8)·scale + zero, in bf16) and runs one dense matmul. Measured with
bench/kernels.py on the CI machine (2 cores, torch 2.13, weights rotated so they come from memory):
at M = 800, 107 vs 153 ms (4096×4096), 271 vs 416 ms (4096×11008), 284 vs 414 ms (11008×4096); at
M = 256 the op is still faster (49 vs 58 ms on 4096×4096); the two cross at about 290–340 rows. This reads torch's packed layout (blocks of
64 output rows; byte [k, j] holds row j in its low nibble and row j + 32 in its high one), which is
checked against the op on a probe matrix once per process; if a future torch changes it, the dense path
is disabled and the op is used for every M.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .w4_ref import check_shapes, unpack_cols, unpack_rows

_GROUPS = (256, 128, 64, 32)
DENSE_MIN_ROWS = 320  # from this many rows on, dequantize once + dense bf16 matmul beats the int4 op
_LAYOUT_OK: bool | None = None  # the packed layout probe's verdict, once per process


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

    def dequantize_t(self) -> torch.Tensor:
        """The weight as bf16 [K, N] (K in the activation-permuted order), decoded from the packed layout."""
        n64, k, g = self.n // 64, self.k, self.group
        packed = self.packed.view(n64, k, 32).permute(1, 0, 2)  # [K, N/64, 32]: rows j and j + 32 of each block
        w = torch.empty(k, n64, 64, dtype=torch.bfloat16)
        w[..., :32].copy_(packed & 15)
        w[..., 32:].copy_(packed >> 4)
        wv = w.view(k // g, g, self.n)
        torch.addcmul(self.scales_zeros[..., 1].unsqueeze(1), wv.sub_(8), self.scales_zeros[..., 0].unsqueeze(1), out=wv)
        return w.view(k, self.n)

    def _dense_ok(self) -> bool:
        return self.n % 64 == 0 and _packed_layout_ok()

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.k:
            raise ValueError(f"x has {x.shape[-1]} features, the W4 weight expects {self.k}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        xb = x2.to(torch.bfloat16).contiguous()
        if x2.shape[0] >= DENSE_MIN_ROWS and self._dense_ok():
            y = (xb @ self.dequantize_t()).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, self.group, self.scales_zeros).to(x.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*lead, self.n)


def _packed_layout_ok() -> bool:
    """Does `dequantize_t` read torch's packed layout right? Checked once against the op on a probe."""
    global _LAYOUT_OK
    if _LAYOUT_OK is None:
        gen = torch.Generator().manual_seed(0)
        n, k, g = 128, 64, 32
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
        sz = (torch.rand(k // g, n, 2, generator=gen) + 0.5).to(torch.bfloat16)
        probe = CpuW4Weight(packed=torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros=sz,
                            group=g, perm=None, k=k, n=n)
        eye = torch.eye(k, dtype=torch.bfloat16)
        via_op = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, probe.packed, g, sz)  # = W^T
        _LAYOUT_OK = bool(torch.allclose(probe.dequantize_t().float(), via_op.float(), rtol=1e-2, atol=1e-2))
    return _LAYOUT_OK
