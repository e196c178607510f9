"""The static KV cache: K/V for every layer preallocated for `max_context` positions, fp or int8.

Why int8: at Qwen2-Audio-7B's shape (32 layers × 32 KV heads × head_dim 128, plain MHA) an fp16 cache
costs 0.5 MiB per position — 1 GiB for 30 s of audio plus 1k generated tokens, a sixth of an 8 GB
card. Symmetric int8 with one scale per (position, head) over head_dim halves that (plus 1/64 for the
scales) and keeps the error per element within half a quantization step of that head's largest
|value| / 127. Attention still computes in the activation dtype: each read dequantizes the prefix it
attends over (one layer at a time, a transient of 2 · kv_heads · positions · head_dim activation
elements). The effect on greedy decoding is measured in tests/test_memory_options.py.

Storage names (RuntimeOptions.kv_cache): "dtype" (the activation dtype: the default, what the fused
Triton RoPE+KV-write kernel writes), "fp32" | "fp16" | "bf16" (a float dtype of its own: cast on write
and on read), "int8".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .decoder import ModelArgs

KV_STORAGES = ("dtype", "fp32", "fp16", "bf16", "int8")
_FLOAT_STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def kv_storage_dtype(storage: str, dtype: torch.dtype) -> torch.dtype:
    """The element dtype of the cache's K/V for `storage` with activations in `dtype`."""
    if storage == "dtype":
        return dtype
    if storage == "int8":
        return torch.int8
    if storage in _FLOAT_STORAGE:
        return _FLOAT_STORAGE[storage]
    raise ValueError(f"KV cache storage must be one of {', '.join(KV_STORAGES)}, got {storage!r}")


def kv_scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """int8 KV scales: fp32 beside fp32 activations, else fp16 (bf16's 8-bit mantissa would add up to 0.4 %
    error to every scale; fp16's range is ample for |K|, |V| / 127)."""
    return torch.float32 if dtype == torch.float32 else torch.float16


def kv_bytes_per_token(args: ModelArgs, dtype: torch.dtype, storage: str = "dtype") -> int:
    """KV cache bytes one position costs (all layers, K and V, and the int8 scales); the RoPE tables
    (2 · head_dim activation elements per position) are not included."""
    store = kv_storage_dtype(storage, dtype)
    per_head = args.head_dim * store.itemsize
    if store == torch.int8:
        per_head += kv_scale_dtype(dtype).itemsize
    return 2 * args.num_hidden_layers * args.num_key_value_heads * per_head


def rope_tables(a: ModelArgs, max_context: int, device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_context, head_dim] computed in fp32 (as the reference), cast to the activation dtype."""
    inv_freq = 1.0 / (
        a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.int64, device=device).float() / a.head_dim)
    )
    pos = torch.arange(max_context, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def quantize_heads(x: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim (head_dim): x [.., head_dim] → (int8 [.., head_dim], scale [.., 1]).

    The scale is rounded to its storage dtype first and the values are quantized with that rounded scale,
    so dequantizing (q · scale) is within scale / 2 of x (the bound the tests hold).
    """
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).to(scale_dtype)
    q = torch.round(xf / scale.float().clamp(min=torch.finfo(torch.float32).tiny)).clamp(-127, 127)
    return q.to(torch.int8), scale


class KVCache:
    """Static, preallocated K/V for every layer: [layers, 1, kv_heads, max_context, head_dim], and the RoPE
    tables `cos`/`sin` [max_context, head_dim] of those positions.

    The tables live here, not in the decoder, because they are sized by the cache: whoever holds a cache
    (a conversation, a captured CUDA graph) holds the tables its positions need, and making another cache
    cannot change them. They add 1/(layers·kv_heads) to the K/V's size (1/1024 for Qwen2-Audio-7B).

    `dtype` is the activation dtype (what `update` returns and the tables' dtype); `storage` the K/V's
    (see the module docstring). int8 adds `k_scale`/`v_scale` [layers, 1, kv_heads, max_context, 1].
    """

    def __init__(
        self,
        args: ModelArgs,
        max_context: int,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        storage: str = "dtype",
    ):
        store = kv_storage_dtype(storage, dtype)
        shape = (args.num_hidden_layers, 1, args.num_key_value_heads, max_context, args.head_dim)
        self.dtype, self.storage = dtype, storage
        self.k = torch.zeros(shape, dtype=store, device=device)
        self.v = torch.zeros(shape, dtype=store, device=device)
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        if store == torch.int8:
            self.k_scale = torch.zeros((*shape[:-1], 1), dtype=kv_scale_dtype(dtype), device=device)
            self.v_scale = torch.zeros((*shape[:-1], 1), dtype=kv_scale_dtype(dtype), device=device)
        self.cos, self.sin = rope_tables(args, max_context, self.k.device, dtype)
        self.max_context = max_context

    @property
    def kernel_writable(self) -> bool:
        """Whether the fused Triton RoPE+KV-write kernel may write this cache (it writes activation-dtype K/V)."""
        return self.k.dtype == self.dtype

    def nbytes(self) -> int:
        """Bytes held: K, V, the int8 scales and the RoPE tables."""
        parts = [self.k, self.v, self.cos, self.sin, self.k_scale, self.v_scale]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write positions start… (k, v [1, kv_heads, S, head_dim]); return positions 0…end−1 for attention."""
        end = start + k.shape[2]
        if self.k_scale is not None and self.v_scale is not None:
            qk, sk = quantize_heads(k, self.k_scale.dtype)
            qv, sv = quantize_heads(v, self.v_scale.dtype)
            self.k[layer, :, :, start:end], self.k_scale[layer, :, :, start:end] = qk, sk
            self.v[layer, :, :, start:end], self.v_scale[layer, :, :, start:end] = qv, sv
        else:
            self.k[layer, :, :, start:end] = k
            self.v[layer, :, :, start:end] = v
        return self.read(layer, end)

    def update_at(
        self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bucket: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one position given as a device tensor; return the first `bucket` positions (static shapes)."""
        if self.k_scale is not None and self.v_scale is not None:
            qk, sk = quantize_heads(k, self.k_scale.dtype)
            qv, sv = quantize_heads(v, self.v_scale.dtype)
            self.k_scale[layer].index_copy_(2, pos, sk)
            self.v_scale[layer].index_copy_(2, pos, sv)
            k, v = qk, qv
        self.k[layer].index_copy_(2, pos, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, pos, v.to(self.v.dtype))
        return self.read(layer, bucket)

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions 0…end−1 in the activation dtype (int8: dequantized; a float storage: cast)."""
        k, v = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        if self.k_scale is not None and self.v_scale is not None:
            ks, vs = self.k_scale[layer, :, :, :end], self.v_scale[layer, :, :, :end]
            return k.to(self.dtype) * ks.to(self.dtype), v.to(self.dtype) * vs.to(self.dtype)
        if k.dtype != self.dtype:
            return k.to(self.dtype), v.to(self.dtype)
        return k, v
