"""Our Qwen2 decoder: ModelArgs from config.json, RMSNorm, RoPE, QKV bias, MHA/GQA, SiLU MLP, static KV cache.

Parameter names are those of a text-only `Qwen2ForCausalLM` checkpoint (`model.layers.N.…`,
`lm_head.weight`), so the artifacts' `decoder/` folder is a standard checkpoint and weights load
with no renaming. The KV cache is preallocated once for `max_context` positions and written by
position, so decode never reallocates and a conversation can keep its cache across turns. Each cache
carries its own RoPE tables (cos/sin for its positions): the decoder itself holds nothing that depends
on a context length, so any number of caches — a pipeline's, a scoring run's, a captured decode graph's
— can be made from one decoder and used in any order without one changing what another computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from .embedding import TokenEmbedding
from .errors import ArtifactsError, LimitError, OptionsError
from .kv_cache import KVCache, kv_bytes_per_token  # KVCache lived here: re-exported
from .selfcheck import TOLERANCE, SelfCheck, relative_error, warn_once

if TYPE_CHECKING:
    from .quant_linear import Int8Linear


@dataclass(frozen=True)
class ModelArgs:
    """Decoder hyper-parameters, read from a Qwen2 config.json (every value; nothing assumed)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, cfg: dict) -> ModelArgs:
        """Parse a Qwen2 text config (transformers 4.x `rope_theta` or 5.x `rope_parameters` form)."""
        try:
            act = cfg.get("hidden_act", "silu")
            if act != "silu":
                raise ArtifactsError(f"decoder hidden_act {act!r} is not supported (Qwen2 uses silu)")
            if cfg.get("use_sliding_window"):
                raise ArtifactsError(
                    "decoder config enables sliding-window attention, which this runtime does not implement"
                )
            rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ("default", None):
                raise ArtifactsError(f"decoder RoPE type {rope_type!r} is not supported (only default RoPE)")
            theta = rope.get("rope_theta", cfg.get("rope_theta"))
            if theta is None:
                raise ArtifactsError("decoder config has no rope_theta")
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            kv = cfg.get("num_key_value_heads")
            args = cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(kv) if kv is not None else heads,
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rope_theta=float(theta),
                rms_norm_eps=float(cfg["rms_norm_eps"]),
                max_position_embeddings=int(cfg["max_position_embeddings"]),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise ArtifactsError(f"decoder config is missing {e.args[0]!r}") from e
        if args.num_attention_heads % args.num_key_value_heads:
            raise ArtifactsError("num_attention_heads must be a multiple of num_key_value_heads")
        return args

    def kv_bytes_per_token(self, dtype: torch.dtype, storage: str = "dtype") -> int:
        """KV cache bytes one position costs (all layers, K and V; int8: with its scales), activations in
        `dtype`, K/V stored as `storage` (runtime/kv_cache.py)."""
        return kv_bytes_per_token(self, dtype, storage)


class FusedKernels(Protocol):
    """What the decoder calls on its fused kernel module (kernels/fused_triton.py; tests pass substitutes)."""

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, /, delta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def silu_mul(self, gate_up: torch.Tensor, /) -> torch.Tensor: ...

    def rope_kv_cache_(
        self,
        qkv: torch.Tensor,
        n_q: int,
        n_kv: int,
        head_dim: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        start: int | torch.Tensor,
        /,
    ) -> None: ...


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, cast back, then scale (the reference's order of operations)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(a.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(a.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, a.hidden_size, bias=False)
        self.qkv_proj: nn.Module | None = None  # q, k, v fused into one matmul at load (fuse_projections)
        self.fused_kernels: FusedKernels | None = None  # on CUDA: enable_fused_kernels; None: torch ops

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        layer: int,
        start: int | StepPosition,  # a StepPosition: a static-shape decode step (CUDA-graph capturable)
    ) -> torch.Tensor:
        b, s, _ = x.shape
        if self.qkv_proj is not None and self.fused_kernels is not None and b == 1 and cache.kernel_writable:
            # one launch: q rotated in place, rotated k and v written straight into the cache
            qkv = self.qkv_proj(x)
            self.fused_kernels.rope_kv_cache_(
                qkv.view(s, -1),
                self.n_heads,
                self.n_kv,
                self.head_dim,
                cos.reshape(s, -1),
                sin.reshape(s, -1),
                cache.k[layer],
                cache.v[layer],
                start.pos if isinstance(start, StepPosition) else start,
            )
            q = qkv[..., : self.n_heads * self.head_dim].view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
            end = start.bucket if isinstance(start, StepPosition) else start + s
            keys, values = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
        else:
            if self.qkv_proj is not None:
                nq, nkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
                q, k, v = self.qkv_proj(x).split([nq, nkv, nkv], dim=-1)
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = q.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
            v = v.view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
            if isinstance(start, StepPosition):
                keys, values = cache.update_at(layer, start.pos, k, v, start.bucket)
            else:
                keys, values = cache.update(layer, start, k, v)
        mask: torch.Tensor | None
        causal = False
        if isinstance(start, StepPosition):
            mask = start.mask
        else:
            end = start + s
            if s == 1:
                mask = None  # one query attends to every cached position
            elif start == 0:
                # a prefill from position 0 (the offline turn, in one pass): plain causal attention, which the
                # CPU flash kernel computes without the masked half (mid model, 805 positions: 18.7 → 13.3 ms
                # a layer; bit-identical to the explicit mask)
                mask, causal = None, True
            else:
                mask = torch.ones(s, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
        o = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv != self.n_heads
        )
        return self.o_proj(o.transpose(1, 2).reshape(b, s, -1))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up fused into one matmul at load
        self.fused_kernels: FusedKernels | None = None  # on CUDA: enable_fused_kernels; None: torch ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            if self.fused_kernels is not None:
                return self.down_proj(self.fused_kernels.silu_mul(self.gate_up_proj(x)))
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.self_attn = Attention(a)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.fused_kernels: FusedKernels | None = None  # on CUDA: enable_fused_kernels; None: torch ops

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        layer: int,
        start: int | StepPosition,
    ) -> torch.Tensor:
        if self.fused_kernels is not None:
            x, delta = self.forward_fused(x, None, cos, sin, cache, layer, start)
            return x + delta
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        layer: int,
        start: int | StepPosition,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer on the fused kernels, with the residual stream carried as (x, delta): the input is
        x + delta (delta None: x), the output (x', delta') means x' + delta'. Each norm is one launch that
        also does the residual add before it."""
        fk, n1, n2 = self.fused_kernels, self.input_layernorm, self.post_attention_layernorm
        assert fk is not None, "forward_fused runs only on a layer whose fused kernels are enabled"
        h, x = fk.rms_norm(x, n1.weight, n1.eps, delta=delta)
        h, x = fk.rms_norm(x, n2.weight, n2.eps, delta=self.self_attn(h, cos, sin, cache, layer, start))
        return x, self.mlp(h)


@dataclass(frozen=True)
class StepPosition:
    """Where a static-shape decode step writes and reads: position `pos` as a device tensor [1] (so a
    captured CUDA graph can be replayed at every position) and attention over the first `bucket` cache
    positions with `mask` [1, 1, 1, bucket] (True where position ≤ pos)."""

    pos: torch.Tensor
    bucket: int
    mask: torch.Tensor


class DecoderBody(nn.Module):
    """The checkpoint's `model.*` part: token embeddings, the layers, the final norm (its own class so that
    each part has a type; the parameter names are the checkpoint's)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens: TokenEmbedding = nn.Embedding(args.vocab_size, args.hidden_size)  # see load_decoder
        self.layers = nn.ModuleList([DecoderLayer(args) for _ in range(args.num_hidden_layers)])
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def decoder_layers(self) -> Sequence[DecoderLayer]:
        """`layers` typed as what it holds (an nn.ModuleList's items are typed as plain Modules)."""
        return cast("Sequence[DecoderLayer]", self.layers)


class Qwen2Decoder(nn.Module):
    """The decoder. `forward(embeds, start)` runs positions start…start+S−1 through the cache."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = DecoderBody(args)
        self.lm_head: nn.Linear | Int8Linear = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # what load_decoder set up (runtime/pipeline.py reports them): these defaults are a plain decoder's
        self.selfcheck = SelfCheck()  # the fast paths' per-shape verdicts, shared by all its layers
        self.fused_projections = 0  # layers' q/k/v and gate/up fused into one matmul each (fuse_projections)
        self.fused_kernels = False  # norms, RoPE and SwiGLU on the Triton kernels (enable_fused_kernels)
        self.w4_kernels: list[str] = []  # the W4 matmul paths its QuantLinears prepared
        self.kv_storage = "dtype"  # the KV caches' storage (runtime/kv_cache.py): load_decoder's kv_cache
        self.embeddings = "dtype"  # where the embedding table lives (runtime/embedding.py): load_decoder's

    def setup_cache(self, max_context: int, storage: str | None = None) -> KVCache:
        """A new KV cache (with its RoPE tables) for `max_context` positions on the weights' device, in their
        dtype; K/V stored as `storage` (None: the decoder's `kv_storage`, as load_decoder set it).

        Changes nothing in the decoder: caches made earlier stay valid and compute what they did.
        """
        p = self.model.norm.weight
        cache = KVCache(self.args, max_context, p.dtype, p.device, storage=storage or self.kv_storage)
        if self.fused_kernels and not cache.kernel_writable:
            warn_once(
                f"kv/{cache.storage}/no-fused-rope",
                f"{cache.storage} KV cache: the fused Triton RoPE+KV-write kernel writes {p.dtype} K/V only; "
                "RoPE and the cache write run as torch ops (the other fused kernels stay)",
            )
        return cache

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids → embeddings [.., hidden] on the decoder's device, in the activation dtype."""
        return self.model.embed_tokens(ids)

    @property
    def graph_safe_embedding(self) -> bool:
        """Whether `embed` is a device op a CUDA graph can record (False: the table is in host memory)."""
        return bool(getattr(self.model.embed_tokens, "graph_safe", True))

    def forward(self, embeds: torch.Tensor, start: int, cache: KVCache, *, all_logits: bool = False) -> torch.Tensor:
        """embeds [1, S, hidden] at positions start… → logits [1, S, vocab] (or [1, 1, vocab] for the last)."""
        s = embeds.shape[1]
        if start + s > cache.max_context:
            raise LimitError(
                f"sequence of {start + s} positions exceeds the KV cache ({cache.max_context}); raise --max-context"
            )
        cos = cache.cos[start : start + s][None, None]
        sin = cache.sin[start : start + s][None, None]
        return self._layers_and_head(embeds, cos, sin, cache, start, last_only=not all_logits)

    def _layers_and_head(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        start: int | StepPosition,
        *,
        last_only: bool,
    ) -> torch.Tensor:
        layers = self.model.decoder_layers()
        fk = layers[0].fused_kernels if len(layers) else None
        if fk is None:
            for i, layer in enumerate(layers):
                x = layer(x, cos, sin, cache, i, start)
            if last_only:
                x = x[:, -1:]
            return self.lm_head(self.model.norm(x))
        # fused kernels: each layer's closing residual add is done inside the next norm (and the last
        # layer's inside the final norm), so no layer ends with a separate add launch
        delta: torch.Tensor | None = None
        for i, layer in enumerate(layers):
            x, delta = layer.forward_fused(x, delta, cos, sin, cache, i, start)
        if last_only:
            assert delta is not None, "fk came from layers[0], so the loop ran and left a delta"
            x, delta = x[:, -1:], delta[:, -1:]
        h, _ = fk.rms_norm(x, self.model.norm.weight, self.model.norm.eps, delta=delta)
        return self.lm_head(h)

    def step(self, token: torch.Tensor, pos: torch.Tensor, cache: KVCache, bucket: int) -> torch.Tensor:
        """One decode step with static shapes: token [1, 1] and pos [1] are device tensors; attention runs
        over the first `bucket` cache positions, masked past `pos`. Returns logits [vocab].

        Every shape is fixed for a given bucket and no value leaves the device, so the step can be
        captured once as a CUDA graph and replayed at any position below the bucket (runtime/decode_graph.py).
        """
        return self.step_embeds(self.embed(token), pos, cache, bucket)

    def step_embeds(self, x: torch.Tensor, pos: torch.Tensor, cache: KVCache, bucket: int) -> torch.Tensor:
        """`step` from the token's embedding x [1, 1, hidden] (a static device buffer): the form a CUDA graph
        records when the embedding gather runs on the host (runtime/embedding.py HostEmbedding)."""
        cos = cache.cos.index_select(0, pos)[None, None]
        sin = cache.sin.index_select(0, pos)[None, None]
        mask = (torch.arange(bucket, device=pos.device) <= pos)[None, None, None]
        where = StepPosition(pos=pos, bucket=bucket, mask=mask)
        return self._layers_and_head(x, cos, sin, cache, where, last_only=False)[0, -1]


def fuse_projections(model: Qwen2Decoder) -> int:
    """Fuse q/k/v and gate/up of every layer into one linear each (same input); returns how many were fused.

    Halves to thirds the matmul launches per layer in decode, where each launch is a weight-streaming
    GEMV. The separate modules are dropped (their tensors now live in the fused one).
    """
    from .quant_linear import fuse_linears

    fused = 0
    for layer in model.model.decoder_layers():
        attn, mlp = layer.self_attn, layer.mlp
        qkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        if qkv is not None:
            attn.qkv_proj = qkv
            del attn.q_proj, attn.k_proj, attn.v_proj
            fused += 1
        gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj])
        if gate_up is not None:
            mlp.gate_up_proj = gate_up
            del mlp.gate_proj, mlp.up_proj
            fused += 1
    return fused


def enable_fused_kernels(model: Qwen2Decoder, module: FusedKernels | None = None) -> bool:
    """Route every layer's norms, RoPE (fused q/k/v only) and SwiGLU (fused gate/up only) through the
    Triton kernels of kernels/fused_triton.py; returns False (torch ops kept, with one warning) when
    Triton is missing or a kernel fails its self-check.
    `module` substitutes the kernel module (tests pass it to run the kernels under the interpreter, or a
    broken one). Each kernel is first run once on the model's device, on random rows through the model's
    own norm weight, and compared with the torch code it replaces (runtime/selfcheck.py tolerances): if
    Triton cannot compile or run it there (no C compiler for its launcher, an unsupported GPU) or it
    computes something else, a warning names the kernel and the reason and the torch ops stay, rather
    than the first forward failing deep inside Triton or decoding wrong tokens."""
    if module is None:
        try:
            from ..kernels import fused_triton
        except ImportError:
            warn_once(
                "fused/no-triton",
                "fused decoder kernels: triton is not installed; norms, RoPE and SwiGLU "
                "run as plain torch ops (correct, slower decode): pip install triton",
            )
            return False
        module = fused_triton
    problem = fused_kernels_problem(model, module)
    if problem is not None:
        warn_once(
            f"fused/{problem}",
            f"fused Triton kernels failed their self-check ({problem}); the decoder uses "
            "plain torch ops (correct, slower decode)",
        )
        return False
    hd = model.args.head_dim
    for layer in model.model.decoder_layers():
        layer.fused_kernels = layer.mlp.fused_kernels = module
        layer.self_attn.fused_kernels = module if hd % 2 == 0 and hd & (hd - 1) == 0 else None  # RoPE: 2^n head_dim
    return True


@torch.no_grad()
def fused_kernels_problem(model: Qwen2Decoder, module: FusedKernels) -> str | None:
    """None if each fused kernel runs on the model's device and matches its torch twin, else what failed."""
    a, norm = model.args, model.model.norm
    w = norm.weight
    dev, dt = w.device, w.dtype
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=dev, generator=gen).to(dt)

    def check(name: str, got: torch.Tensor, want: torch.Tensor) -> str | None:
        err, tol = relative_error(got, want), TOLERANCE.get(dt, 1e-3)
        return None if err <= tol else f"{name}: max error {err:.3g} of max |reference|, over the {tol:g} allowed"

    try:
        x, delta = rand(2, a.hidden_size), rand(2, a.hidden_size)
        problems = [
            check("rms_norm", module.rms_norm(x, w, norm.eps)[0], norm(x)),
            check("rms_norm+residual", module.rms_norm(x, w, norm.eps, delta=delta)[0], norm(x + delta)),
        ]
        gu = rand(2, 2 * a.intermediate_size)
        gate, up = gu.chunk(2, dim=-1)
        problems.append(check("silu_mul", module.silu_mul(gu), F.silu(gate) * up))
        hd, nq, nkv = a.head_dim, a.num_attention_heads, a.num_key_value_heads
        if hd % 2 == 0 and hd & (hd - 1) == 0:
            qkv = rand(2, (nq + 2 * nkv) * hd)
            ang = torch.rand(2, hd // 2, device=dev, generator=gen) * 6
            cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)
            heads = qkv.view(2, nq + 2 * nkv, hd).transpose(0, 1)
            expected = _apply_rope(heads[: nq + nkv], cos, sin)
            ck, cv = torch.zeros(1, nkv, 4, hd, device=dev, dtype=dt), torch.zeros(1, nkv, 4, hd, device=dev, dtype=dt)
            module.rope_kv_cache_(qkv, nq, nkv, hd, cos, sin, ck, cv, 1)
            problems += [
                check("rope q", heads[:nq], expected[:nq]),
                check("rope k→cache", ck[0, :, 1:3], expected[nq:]),
            ]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    except Exception as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    return next((p for p in problems if p is not None), None)


LM_HEAD_MODES = ("auto", "dtype", "int8")


def build_meta_decoder(cfg: dict) -> Qwen2Decoder:
    """The module `load_decoder` fills, built on the meta device (no memory): W4 linears swapped in when the
    config has a quantization_config. runtime/memory_plan.py sums its tensors, so the plan is this code."""
    from .quant_linear import swap_in_quant_linears

    args = ModelArgs.from_config(cfg)
    with torch.device("meta"):
        model = Qwen2Decoder(args)
        if cfg.get("quantization_config"):
            swap_in_quant_linears(model, cfg["quantization_config"])
    return model


def packed_tensor_names(model: nn.Module) -> set[str]:
    """State-dict names of the W4 tensors, which keep their stored dtypes at load (every other float
    tensor takes the activation dtype)."""
    from .quant_linear import QuantLinear

    return {
        f"{name}.{b}"
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
        for b in ("qweight", "qzeros", "scales", "g_idx", "bias")
    }


def resolve_lm_head(mode: str, has_int8_file: bool) -> str:
    """ "auto": int8 when the export has the side file, else the dense head in the activation dtype ("dtype");
    "int8" with no side file quantizes the dense head at load (quantize_int8_rows: the rule export uses)."""
    if mode not in LM_HEAD_MODES:
        raise OptionsError(f"lm_head must be one of {', '.join(LM_HEAD_MODES)}, got {mode!r}")
    return ("int8" if has_int8_file else "dtype") if mode == "auto" else mode


def load_decoder(
    decoder_dir,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    lm_head_int8=None,
    w4_kernel: str = "ref",
    fuse: bool = True,
    w4_tune: bool = True,
    embeddings: str = "dtype",
    kv_cache: str = "dtype",
    lm_head: str = "auto",
) -> Qwen2Decoder:
    """Load a text-only Qwen2 checkpoint folder (config.json + safetensors, sharded or not), fp or GPTQ W4.

    The module is built on the meta device and each tensor is assigned as it is read, so peak memory is
    the weights once, never a random init plus a copy. GPTQ tensors (qweight/qzeros/g_idx int32, scales
    and W4 biases fp16) keep their stored dtypes; other float tensors take the activation `dtype`.
    `lm_head_int8` (a side file with `weight` int8 and `scales`) replaces the fp16 head, which is then not
    read, unless `lm_head` says otherwise (resolve_lm_head: "dtype" keeps the dense head; "int8" without a
    side file quantizes the dense head on load).
    `embeddings` places the token-embedding table (runtime/embedding.py: dtype | host | int8 | fp32 | fp16 |
    bf16 | auto); the table is read on the host and only what that mode keeps reaches the device.
    `kv_cache` is the storage of the caches `setup_cache` makes (runtime/kv_cache.py; "auto" = "dtype").
    `w4_kernel` picks the W4 matmul path (see QuantLinear.prepare); "ref" keeps the GPTQ tensors as stored.
    `fuse` merges q/k/v and gate/up into one matmul each (fuse_projections) and, on CUDA, routes norms,
    RoPE and SwiGLU through fused Triton kernels (enable_fused_kernels). `w4_tune` lets the Triton
    kernels time their launch configs per shape on first use (else the defaults).
    """
    import json
    from pathlib import Path

    from safetensors import safe_open

    from .embedding import build_embedding, resolve_embeddings
    from .kv_cache import KV_STORAGES
    from .quant_linear import Int8Linear, QuantLinear, quantize_int8_rows

    if kv_cache not in (*KV_STORAGES, "auto"):
        raise OptionsError(f"kv_cache must be auto or one of {', '.join(KV_STORAGES)}, got {kv_cache!r}")
    d = Path(decoder_dir)
    cfg = json.loads((d / "config.json").read_text())
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ArtifactsError(f"{d}: no *.safetensors weight files")
    model = build_meta_decoder(cfg)
    args = model.args
    head = resolve_lm_head(lm_head, lm_head_int8 is not None)
    emb = resolve_embeddings(embeddings, device, tied_dense_head=args.tie_word_embeddings and head == "dtype")
    embed_key, head_key = "model.embed_tokens.weight", "lm_head.weight"
    packed = packed_tensor_names(model)
    expected = set(model.state_dict())
    # read on the host, not moved to the device as they are: the table (placed by `emb`), a head to quantize
    host_keys = ({embed_key} if emb != "dtype" else set()) | (
        {head_key} if head == "int8" and not lm_head_int8 else set()
    )
    skip = {head_key} if head == "int8" and lm_head_int8 is not None else set()
    state: dict[str, torch.Tensor] = {}
    host: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():  # noqa: SIM118 (safe_open has keys() but is not iterable)
                if key in skip:
                    continue
                if key not in expected:
                    raise ArtifactsError(f"{f.name}: unexpected tensor {key!r} for this decoder config")
                t = sf.get_tensor(key)
                if key in host_keys:
                    host[key] = t
                else:
                    state[key] = t.to(device) if key in packed else t.to(device=device, dtype=dtype)
    if args.tie_word_embeddings and head == "dtype" and head_key not in state:
        if embed_key in state:
            state[head_key] = state[embed_key]
        elif embed_key in host:  # the table is placed elsewhere; the dense head needs it on the device
            state[head_key] = host[embed_key].to(device=device, dtype=dtype)
    not_needed = {head_key} if head == "int8" else set()
    missing = sorted(expected - set(state) - set(host) - not_needed)
    if missing:
        raise ArtifactsError(f"{d}: decoder weights are missing {len(missing)} tensors, e.g. {missing[:3]}")
    reference = model.state_dict()
    for name, t in (state | host).items():
        if t.shape != reference[name].shape:
            raise ArtifactsError(
                f"{d}: tensor {name} has shape {tuple(t.shape)}, config implies {tuple(reference[name].shape)}"
            )
    checks = SelfCheck()  # the fast paths' per-shape verdicts, shared by all layers (runtime/selfcheck.py)
    model.selfcheck = checks
    if head == "int8":
        if lm_head_int8 is not None:
            from safetensors.torch import load_file

            side = load_file(str(lm_head_int8))
            w8, scales = side["weight"], side["scales"]
        else:  # tied weights: the head is the embedding table
            source = host.get(head_key, host.get(embed_key, state.get(embed_key)))
            if source is None:
                raise ArtifactsError(f"{d}: no lm_head.weight (nor tied embedding table) to quantize to int8")
            w8, scales = quantize_int8_rows(source)
        model.lm_head = Int8Linear(w8.to(device), scales.to(device), tune=w4_tune, checks=checks)
        host.pop(head_key, None)
    model.load_state_dict(state, assign=True, strict=False)  # completeness and shapes were checked above
    del state
    if emb != "dtype":
        model.model.embed_tokens = build_embedding(host.pop(embed_key), emb, dtype, device)
    del host
    model.embeddings = emb
    model.kv_storage = "dtype" if kv_cache == "auto" else kv_cache
    model.fused_projections = fuse_projections(model) if fuse and torch.device(device).type != "meta" else 0
    # on CUDA the small element-wise steps are fused too (each ~2 µs per launch, even inside a CUDA graph)
    model.fused_kernels = fuse and torch.device(device).type == "cuda" and enable_fused_kernels(model)
    kernels = {m.prepare(w4_kernel, tune=w4_tune, checks=checks) for m in model.modules() if isinstance(m, QuantLinear)}
    model.w4_kernels = sorted(kernels)
    return model.eval()
