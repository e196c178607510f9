"""Reference W4A16 kernel: GPTQ-format pack/unpack, dequantize, matmul — the twin every fast kernel is tested against.

GPTQ checkpoint format ("gptq", v1), for a linear with K inputs and N outputs, G groups:
- qweight int32 [K/8, N]: 8 consecutive input rows per int32, row 8i+j in bits 4j…4j+3 (LSB first);
- qzeros  int32 [G, N/8]: zero points along N, same nibble order, stored as zero − 1;
- scales  fp16  [G, N];
- g_idx   int32 [K]: group of each input row (i // group_size, or a permuted order with act-order);
- W[k, n] = scales[g_idx[k], n] · (q[k, n] − (stored_zero[g_idx[k], n] + 1)); y = x @ W + bias.
"""

from __future__ import annotations

import torch

BITS = 4
PACK = 32 // BITS  # values per int32
MASK = (1 << BITS) - 1


def _to_int32(packed64: torch.Tensor) -> torch.Tensor:
    """Wrap uint32 bit patterns held in int64 into int32 (two's complement), without relying on overflow casts."""
    return torch.where(packed64 >= 2**31, packed64 - 2**32, packed64).to(torch.int32)


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """int values [K, N] in 0…15 → qweight int32 [K/8, N]."""
    k, n = q.shape
    if k % PACK:
        raise ValueError(f"in_features {k} must be a multiple of {PACK} to pack 4-bit rows")
    q64 = q.to(torch.int64).reshape(k // PACK, PACK, n)
    shifts = (torch.arange(PACK, dtype=torch.int64, device=q.device) * BITS).view(1, PACK, 1)
    return _to_int32((q64 << shifts).sum(dim=1))


def unpack_rows(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int32 [K/8, N] → int values [K, N] (int32)."""
    shifts = (torch.arange(PACK, dtype=torch.int32, device=qweight.device) * BITS).view(1, PACK, 1)
    vals = (qweight.unsqueeze(1) >> shifts) & MASK
    return vals.reshape(-1, qweight.shape[1])


def pack_cols(z: torch.Tensor) -> torch.Tensor:
    """int values [G, N] in 0…15 → int32 [G, N/8] (nibbles along N)."""
    g, n = z.shape
    if n % PACK:
        raise ValueError(f"out_features {n} must be a multiple of {PACK} to pack 4-bit zeros")
    z64 = z.to(torch.int64).reshape(g, n // PACK, PACK)
    shifts = (torch.arange(PACK, dtype=torch.int64, device=z.device) * BITS).view(1, 1, PACK)
    return _to_int32((z64 << shifts).sum(dim=2))


def unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 [G, N/8] → int values [G, N]."""
    shifts = (torch.arange(PACK, dtype=torch.int32, device=packed.device) * BITS).view(1, 1, PACK)
    vals = (packed.unsqueeze(2) >> shifts) & MASK
    return vals.reshape(packed.shape[0], -1)


def check_shapes(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor
) -> tuple[int, int, int]:
    """Validate a GPTQ tensor set; return (K, N, G). Raises ValueError naming the inconsistent tensor."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    k, n = qweight.shape[0] * PACK, qweight.shape[1]
    g = scales.shape[0]
    if scales.shape != (g, n):
        raise ValueError(f"scales shape {tuple(scales.shape)} does not match out_features {n}")
    if qzeros.shape != (g, n // PACK):
        raise ValueError(f"qzeros shape {tuple(qzeros.shape)} != ({g}, {n // PACK})")
    if g_idx.shape != (k,):
        raise ValueError(f"g_idx shape {tuple(g_idx.shape)} != ({k},)")
    return k, n, g


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """GPTQ tensors → W [K, N] in `dtype` (x @ W is the layer)."""
    check_shapes(qweight, qzeros, scales, g_idx)
    q = unpack_rows(qweight)
    zeros = unpack_cols(qzeros) + 1  # stored as zero - 1
    g = g_idx.long()
    return ((q - zeros[g]).to(dtype)) * scales[g].to(dtype)


def w4_matmul_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequant(W) + bias. x [..., K] (any float dtype) → y [..., N] in x's dtype."""
    w = dequantize(qweight, qzeros, scales, g_idx, dtype=x.dtype)
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x has {x.shape[-1]} features, the W4 weight expects {w.shape[0]}")
    y = x @ w
    return y + bias.to(y.dtype) if bias is not None else y


def group_sort(g_idx: torch.Tensor, group_size: int) -> tuple[bool, torch.Tensor | None]:
    """(ok, perm): whether the rows form contiguous equal groups of `group_size` once sorted by group (GPTQ
    act-order stores them permuted), and that stable sort (None when already in order). The repacked fast
    paths (CPU and CUDA int4 ops) need the groups contiguous and permute the activations instead."""
    gi = g_idx.long()
    perm = None
    if not bool((gi[1:] >= gi[:-1]).all()):
        perm = torch.argsort(gi, stable=True)
        gi = gi[perm]
    return torch.equal(gi, torch.arange(gi.numel(), device=gi.device) // group_size), perm


def int4pack_scales_zeros(qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, sub: int) -> torch.Tensor:
    """torch's int4 ops' bf16 [K / sub, N, 2] table of (scale, offset) for GPTQ zeros/scales: they compute
    (q − 8)·s + offset, so offset = s·(8 − z) gives (q − z)·s; each group's row is repeated for its
    group_size / sub sub-groups (the ops support fewer group sizes than GPTQ)."""
    z = (unpack_cols(qzeros) + 1).float()
    s = scales.float()
    return (
        torch.stack([s, s * (8.0 - z)], dim=-1)
        .repeat_interleave(group_size // sub, dim=0)
        .to(torch.bfloat16)
        .contiguous()
    )
