"""GPTQ 4-bit quantization of one linear layer (Frantar et al., 2022), plus the round-to-nearest baseline.

Given W [N, K] (nn.Linear layout) and the Hessian H = 2/n Σ x xᵀ of its inputs, GPTQ quantizes one
input column at a time and spreads the rounding error over the not-yet-quantized columns through the
upper Cholesky factor of H⁻¹ ("lazy batches" of 128 columns: updates within a block are applied
immediately, the rest once per block). Options: dampening (fraction of mean diag H), group size
(32/64/128, −1 = one group per output row), act-order (columns by decreasing diag H, recorded in
g_idx), symmetric or asymmetric zero points.

Group parameters are computed from the *current* (already error-updated) weights of the group: blocks
are aligned to group boundaries, so a group never straddles a lazy batch. The output is the standard
GPTQ tensor set (kernels/w4_ref.py describes it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.w4_ref import BITS, pack_cols, pack_rows
from ..runtime.errors import ExportError, OptionsError

MAXQ = (1 << BITS) - 1


@dataclass(frozen=True)
class GPTQConfig:
    """Quantization settings (the `quantization_config` of the checkpoint, plus damp)."""

    bits: int = 4
    group_size: int = 128
    act_order: bool = True
    sym: bool = True
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise OptionsError(f"--bits {self.bits}: only 4-bit GPTQ is supported")
        if self.group_size not in (32, 64, 128, -1):
            raise OptionsError(f"--group-size {self.group_size}: use 32, 64, 128 or -1 (per channel)")
        if not 0 < self.damp < 1:
            raise OptionsError(f"--damp {self.damp}: must be in (0, 1)")

    def check_layer(self, name: str, in_features: int, out_features: int) -> None:
        if in_features % 8 or out_features % 8:
            raise OptionsError(
                f"{name}: in/out features {in_features}/{out_features} must be multiples of 8 for 4-bit packing"
            )
        if self.group_size != -1 and in_features % self.group_size:
            raise OptionsError(f"--group-size {self.group_size} does not divide {name}'s in_features {in_features}")

    def quantization_config(self) -> dict:
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.act_order,
            "sym": self.sym,
            "checkpoint_format": "gptq",
            "damp_percent": self.damp,
            "true_sequential": True,
            "static_groups": False,
            "pack_dtype": "int32",
        }


@dataclass
class QuantizedLinear:
    """GPTQ tensors of one layer (checkpoint dtypes) plus the dequantized weight used to run it onwards."""

    qweight: torch.Tensor  # int32 [K/8, N]
    qzeros: torch.Tensor  # int32 [G, N/8]
    scales: torch.Tensor  # fp16 [G, N]
    g_idx: torch.Tensor  # int32 [K]
    dequantized: torch.Tensor  # float32 [N, K] (nn.Linear layout), exactly what the runtime computes

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.qweight": self.qweight,
            f"{prefix}.qzeros": self.qzeros,
            f"{prefix}.scales": self.scales,
            f"{prefix}.g_idx": self.g_idx,
        }


def group_params(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and integer zero for a slice w [N, g] (scales rounded to fp16, as stored)."""
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(flat, torch.full_like(xmax, 1.0), xmax)
    scale = ((xmax - xmin) / MAXQ).to(torch.float16).float()
    scale = torch.where(scale == 0, torch.full_like(scale, 2.0**-14), scale)  # fp16 underflow
    if sym:
        zero = torch.full_like(scale, (MAXQ + 1) // 2)
    else:
        # Zero ≥ 1: the checkpoint stores zero − 1 in a nibble, so 0 cannot be represented (it would wrap).
        # Where the zero would be 0 (a group with no negative value), use zero 1 and stretch the scale so
        # that xmax still maps to the top code (15 − 1 steps above zero) instead of being clipped.
        zero = torch.round(-xmin / scale)
        low = zero < 1
        if bool(low.any()):
            scale = torch.where(low, (xmax / (MAXQ - 1)).to(torch.float16).float(), scale)
            scale = torch.where(scale == 0, torch.full_like(scale, 2.0**-14), scale)
        zero = zero.clamp(1, MAXQ)
    return scale, zero


def _quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Integer codes of w [N] or [N, g] given per-row scale/zero."""
    if w.ndim == 2:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w / scale) + zero, 0, MAXQ)


def _finish(
    q_perm: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    perm: torch.Tensor | None,
    cfg: GPTQConfig,
    n: int,
    k: int,
) -> QuantizedLinear:
    """Codes in processing order [N, K] + per-group params [G, N] → GPTQ tensors in the original column order."""
    gs = k if cfg.group_size == -1 else cfg.group_size
    order = torch.arange(k) if perm is None else perm
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // gs).to(torch.int32)
    q = torch.empty(n, k, dtype=torch.int64)
    q[:, order] = q_perm.to(torch.int64)
    scales16 = scales.to(torch.float16)
    deq = (q - zeros.T[:, g_idx.long()]) * scales16.float().T[:, g_idx.long()]
    return QuantizedLinear(
        qweight=pack_rows(q.T.contiguous()),
        qzeros=pack_cols((zeros - 1).to(torch.int64)),
        scales=scales16.contiguous(),
        g_idx=g_idx,
        dequantized=deq.float(),
    )


def rtn_quantize(weight: torch.Tensor, cfg: GPTQConfig) -> QuantizedLinear:
    """Round-to-nearest with the same groups/zero points (no act-order): the baseline GPTQ must beat."""
    w = weight.detach().float()
    n, k = w.shape
    gs = k if cfg.group_size == -1 else cfg.group_size
    scales, zeros, codes = [], [], []
    for g0 in range(0, k, gs):
        s, z = group_params(w[:, g0 : g0 + gs], cfg.sym)
        scales.append(s)
        zeros.append(z)
        codes.append(_quantize(w[:, g0 : g0 + gs], s, z))
    return _finish(torch.cat(codes, 1), torch.stack(scales), torch.stack(zeros), None, cfg, n, k)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, cfg: GPTQConfig) -> QuantizedLinear:
    """GPTQ of weight [N, K] with hessian [K, K] (fp32, = 2/n Σ x xᵀ). Deterministic for fixed inputs.

    Runs on the Hessian's device (a GPU makes the 7B export fast); the result tensors are on the CPU.
    """
    h = hessian.detach().float().clone()
    w = weight.detach().float().to(h.device).clone()
    n, k = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = None
    if cfg.act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    damp = cfg.damp * torch.mean(torch.diag(h))
    h += damp * torch.eye(k, device=h.device)
    hinv = _upper_cholesky_inverse(h)
    gs = k if cfg.group_size == -1 else cfg.group_size
    block = cfg.block_size if cfg.group_size == -1 else max(gs, cfg.block_size // gs * gs)
    codes = torch.zeros(n, k, device=w.device)
    n_groups = k // gs
    scales = torch.zeros(n_groups, n, device=w.device)
    zeros = torch.zeros(n_groups, n, device=w.device)
    if cfg.group_size == -1:
        s, z = group_params(w, cfg.sym)
        scales[0], zeros[0] = s, z
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = col // gs
            if cfg.group_size != -1 and col % gs == 0:
                s, z = group_params(w1[:, i : i + gs], cfg.sym)  # current, error-updated weights
                scales[g], zeros[g] = s, z
            q = _quantize(w1[:, i], scales[g], zeros[g])
            codes[:, col] = q
            dq = scales[g] * (q - zeros[g])
            e = (w1[:, i] - dq) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return _finish(codes.cpu(), scales.cpu(), zeros.cpu(), None if perm is None else perm.cpu(), cfg, n, k)


def _upper_cholesky_inverse(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹, retrying with more dampening if H is not positive definite."""
    extra = 0.0
    mean = torch.mean(torch.diag(h))
    for _ in range(6):
        try:
            lower = torch.linalg.cholesky(h + extra * mean * torch.eye(h.shape[0], device=h.device))
            inv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inv, upper=True)
        except torch.linalg.LinAlgError:
            extra = 0.01 if extra == 0 else extra * 10
    raise ExportError(
        "the calibration Hessian is not positive definite even with 1000x extra dampening: "
        "give more (or longer) calibration samples or a larger --damp"
    )


class HessianAccumulator:
    """Running H = 2/n Σ x xᵀ over calibration rows (fp32, the standard GPTQ normalisation), on `device`."""

    def __init__(self, k: int, device: torch.device | str = "cpu"):
        self.h = torch.zeros(k, k, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float().to(self.h.device)
        m = x.shape[0]
        self.h *= self.n / (self.n + m)
        self.n += m
        x = (2.0 / self.n) ** 0.5 * x
        self.h += x.T @ x
