"""Triton kernels that fuse the small element-wise steps of a decoder layer on CUDA.

Why: a batch-1 decode step is bound by weight reads, but written as plain torch ops each layer also
launches dozens of tiny kernels (RMSNorm alone is seven: cast, square, mean, add, rsqrt, multiply,
cast-and-scale; RoPE five per tensor), and even replayed from a CUDA graph each launch has a fixed cost
that 32 layers multiply (an argument from the op count, not a measurement: bench/decode.py's CUDA
breakdown measures it on a GPU). These kernels do each step in one launch:

- `rms_norm`: Qwen2 RMSNorm of each row, optionally after a residual add (`x + delta`, rounded to the
  activation dtype first, as the reference adds) whose sum is also returned for the next residual;
- `rope_kv_cache_`: rotary embedding of the q heads in place in the fused q/k/v projection output, and
  of the k heads, written with the v heads straight into the KV cache at their positions (a device
  tensor in the CUDA-graph decode step): one launch for what was ten RoPE ops and two cache copies;
- `silu_mul`: SwiGLU's silu(gate) · up from the fused gate/up projection output.

Arithmetic runs in fp32 with a rounding to the activation dtype wherever the reference rounds: a product
or sum of two fp16/bf16 values computed in fp32 and rounded once equals the fp16/bf16 operation (fp32
holds the exact product, and its 24 bits make double rounding of a sum harmless). This also keeps the
CPU interpreter, whose bf16 arithmetic is unreliable, out of the tests' way.

Each follows the reference's order of operations and roundings (runtime/decoder.py is the twin: its
torch code is what CPU runs, and tests compare the two under TRITON_INTERPRET=1 with stated tolerances).
Shapes: rows are flattened leading dims; every tensor contiguous in its last dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .w4_triton import on_device


@triton.jit
def _rms_norm_kernel(x_ptr, d_ptr, w_ptr, sum_ptr, out_ptr, D, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0)
    dt = x.dtype
    h = x.to(tl.float32)
    if HAS_DELTA:  # the residual sum, rounded to the activation dtype as the reference adds
        h = (h + tl.load(d_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
        tl.store(sum_ptr + row * D + offs, h, mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
    y = (h * rstd).to(dt).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs, w * y, mask=mask)


@triton.jit
def _rope_cache_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    start,
    row_stride,
    NQ,
    NKV,
    max_ctx,
    POS_FROM_PTR: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    if POS_FROM_PTR:
        pos = tl.load(pos_ptr) + token
    else:
        pos = start + token
    src = qkv_ptr + token * row_stride + heads[:, None] * (2 * HALF) + d[None, :]
    is_q = heads < NQ
    is_k = (heads >= NQ) & (heads < NQ + NKV)
    is_v = (heads >= NQ + NKV) & (heads < NQ + 2 * NKV)
    live = (is_q | is_k | is_v)[:, None]
    x1r = tl.load(src, mask=live, other=0.0)
    dt = x1r.dtype
    x1 = x1r.to(tl.float32)
    x2 = tl.load(src + HALF, mask=live, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + token * (2 * HALF) + d).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + token * (2 * HALF) + HALF + d).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + token * (2 * HALF) + d).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + token * (2 * HALF) + HALF + d).to(tl.float32)[None, :]
    rot = (is_q | is_k)[:, None]
    y1 = tl.where(rot, (x1 * c1).to(dt).to(tl.float32) - (x2 * s1).to(dt).to(tl.float32), x1)
    y2 = tl.where(rot, (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32), x2)
    q_mask = is_q[:, None]
    tl.store(src, y1, mask=q_mask)
    tl.store(src + HALF, y2, mask=q_mask)
    kv_head = tl.where(is_k, heads - NQ, heads - NQ - NKV)
    dst = (kv_head[:, None] * max_ctx + pos) * (2 * HALF) + d[None, :]
    k_mask = is_k[:, None]
    v_mask = is_v[:, None]
    tl.store(k_ptr + dst, y1, mask=k_mask)
    tl.store(k_ptr + dst + HALF, y2, mask=k_mask)
    tl.store(v_ptr + dst, y1, mask=v_mask)
    tl.store(v_ptr + dst + HALF, y2, mask=v_mask)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, I, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(gu_ptr + row * 2 * I + offs, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * 2 * I + I + offs, mask=mask, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    silu = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)  # F.silu rounds to the activation dtype
    tl.store(out_ptr + row * I + offs, silu * u, mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(s) · weight, s) with s = x + delta (or x). x, delta [..., D] in the activation dtype."""
    d = x.shape[-1]
    if weight.shape != (d,) or (delta is not None and delta.shape != x.shape):
        raise ValueError(
            f"rms_norm: x {tuple(x.shape)}, delta {None if delta is None else tuple(delta.shape)}, "
            f"weight {tuple(weight.shape)} do not match"
        )
    x2 = x.reshape(-1, d).contiguous()
    out = torch.empty_like(x2)
    s = torch.empty_like(x2) if delta is not None else x2
    dl = delta.reshape(-1, d).contiguous() if delta is not None else x2
    block = triton.next_power_of_2(d)
    with on_device(x2):
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            dl,
            weight,
            s,
            out,
            d,
            eps,
            HAS_DELTA=delta is not None,
            BLOCK=block,
            num_warps=8 if block >= 4096 else 4,
        )
    return out.view(x.shape), s.view(x.shape)


def rope_kv_cache_(
    qkv: torch.Tensor,
    n_q: int,
    n_kv: int,
    head_dim: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    start: int | torch.Tensor,
) -> None:
    """qkv [tokens, (n_q + 2·n_kv)·head_dim]: rotate the q heads in place; write the rotated k heads and the
    v heads into cache_k / cache_v [1, n_kv, max_context, head_dim] (one layer's slice, contiguous) at
    positions start … start + tokens − 1. `start` is an int, or a device tensor [1] (graph replays)."""
    if qkv.ndim != 2 or qkv.stride(-1) != 1 or head_dim % 2 or head_dim & (head_dim - 1):
        raise ValueError(
            f"rope_kv_cache_: qkv must be 2-D, last dim contiguous, power-of-two head_dim (got {head_dim})"
        )
    tokens = qkv.shape[0]
    if cos.shape != (tokens, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"rope_kv_cache_: cos/sin must be [{tokens}, {head_dim}], got {tuple(cos.shape)}")
    if (
        cache_k.shape != cache_v.shape
        or cache_k.ndim != 4
        or cache_k.shape[1] != n_kv
        or cache_k.shape[3] != head_dim
        or not cache_k.is_contiguous()
        or not cache_v.is_contiguous()
    ):
        raise ValueError(f"rope_kv_cache_: caches must be contiguous [1, {n_kv}, max_context, {head_dim}]")
    heads = n_q + 2 * n_kv
    if qkv.shape[1] != heads * head_dim:
        raise ValueError(f"rope_kv_cache_: qkv width {qkv.shape[1]} != ({n_q} + 2·{n_kv}) × {head_dim}")
    from_ptr = isinstance(start, torch.Tensor)
    if not from_ptr and not 0 <= start <= cache_k.shape[2] - tokens:
        raise ValueError(
            f"rope_kv_cache_: positions {start}…{start + tokens - 1} are outside the cache ({cache_k.shape[2]})"
        )
    # a device-tensor position is not read on the host (graph replays); DecodeStep checks it before each step
    block_h = min(16, triton.next_power_of_2(heads))
    with on_device(qkv):
        _rope_cache_kernel[(tokens, triton.cdiv(heads, block_h))](
            qkv,
            cos.contiguous(),
            sin.contiguous(),
            cache_k,
            cache_v,
            start if from_ptr else qkv,
            0 if from_ptr else start,
            qkv.stride(0),
            n_q,
            n_kv,
            cache_k.shape[2],
            POS_FROM_PTR=from_ptr,
            HALF=head_dim // 2,
            BLOCK_H=block_h,
        )


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for gate_up [..., 2I] (gate first) → [..., I]."""
    two_i = gate_up.shape[-1]
    if two_i % 2:
        raise ValueError(f"silu_mul: last dim {two_i} is not gate + up")
    i = two_i // 2
    g2 = gate_up.reshape(-1, two_i).contiguous()
    out = torch.empty(g2.shape[0], i, device=g2.device, dtype=g2.dtype)
    block = min(1024, triton.next_power_of_2(i))
    with on_device(g2):
        _silu_mul_kernel[(g2.shape[0], triton.cdiv(i, block))](g2, out, i, BLOCK=block)
    return out.view(*gate_up.shape[:-1], i)
