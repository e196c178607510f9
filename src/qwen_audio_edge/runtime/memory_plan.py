"""How much memory a pipeline needs, per component, before anything is loaded: `memory_plan(config, options, …)`.

Why: the question an appliance builder asks first is "does the 7B fit my 8 GB card, and with which
options?" — and it must be answerable on a laptop without the weights or the card. The resident parts are
not estimated: they are the tensor sizes of the real modules, built on the meta device by the same code
`load_decoder` runs (`build_meta_decoder`: the W4 linears swapped in per quantization_config), the real
`KVCache` and embedding / lm_head classes, and the real encoder module — so the plan cannot drift from the
code (tests/test_memory_options.py loads a W4 export and checks the weight bytes for exact equality).
The transient peaks (encoder and prefill activations, the decode step) are formulas over the shapes the
code creates, one named term each, as upper bounds: they are small beside the weights (docs/memory.md).

Peak = resident (weights, embeddings, lm_head, KV cache for max_context, encoder weights) + the largest
transient phase (encode | prefill | decode): the stages run one after another, and each frees its
activations before the next. Not counted: the CUDA context (~0.3–0.5 GB outside torch's allocator),
allocator fragmentation, ONNX Runtime's arena rounding, the chunked stream mode's extra CPU encoder.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .decoder import build_meta_decoder, packed_tensor_names, resolve_lm_head
from .embedding import build_embedding, resolve_embeddings
from .encoder import AudioEncoderWithProjector, EncoderConfig
from .kv_cache import KVCache, kv_storage_dtype
from .options import DTYPES, RuntimeOptions
from .quant_linear import Int8Linear, QuantLinear

GIB = 1 << 30
PHASES = ("resident", "encode", "prefill", "decode", "host")
CONTEXT_ROUND = 256  # max_context by default: the tokens needed, rounded up to this


@dataclass(frozen=True)
class Component:
    """One row of the plan: `phase` "resident" (held from load to exit), a transient phase (held during that
    stage only), or "host" (host memory, beside a CUDA device)."""

    name: str
    bytes: int
    phase: str
    note: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per component; `peak_bytes` on the device (on CPU, host rows are the device's)."""

    device: str
    dtype: str
    choices: dict  # the resolved options: embeddings, kv_cache, lm_head, encoder backend/precision, w4_kernel
    inputs: dict  # audio_seconds, audio_tokens, prompt_tokens, new_tokens, max_context
    components: tuple[Component, ...] = field(default_factory=tuple)

    def phase_bytes(self, phase: str) -> int:
        return sum(c.bytes for c in self.components if c.phase == phase)

    @property
    def on_cpu(self) -> bool:
        return torch.device(self.device).type == "cpu"

    @property
    def resident_bytes(self) -> int:
        return self.phase_bytes("resident") + (self.phase_bytes("host") if self.on_cpu else 0)

    @property
    def peak_phase(self) -> str:
        return max(("encode", "prefill", "decode"), key=self.phase_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.resident_bytes + self.phase_bytes(self.peak_phase)

    @property
    def host_bytes(self) -> int:
        """Host memory the plan puts beside a CUDA device (the pinned embedding table); 0 on CPU."""
        return 0 if self.on_cpu else self.phase_bytes("host")

    def to_json(self) -> dict:
        return {
            "device": self.device,
            "dtype": self.dtype,
            "choices": self.choices,
            "inputs": self.inputs,
            "components": [asdict(c) for c in self.components],
            "phase_bytes": {p: self.phase_bytes(p) for p in PHASES},
            "resident_bytes": self.resident_bytes,
            "peak_phase": self.peak_phase,
            "peak_bytes": self.peak_bytes,
            "peak_gib": round(self.peak_bytes / GIB, 3),
            "host_bytes": self.host_bytes,
        }

    def table(self) -> str:
        """A plain-text table (MiB per row, the peak in GiB)."""
        lines = [f"{'component':<34} {'phase':<9} {'MiB':>10}  note"]
        for c in self.components:
            lines.append(f"{c.name:<34} {c.phase:<9} {c.bytes / 2**20:>10.1f}  {c.note}")
        lines.append(
            f"peak on {self.device}: {self.peak_bytes / GIB:.2f} GiB = resident {self.resident_bytes / GIB:.2f} "
            f"+ {self.peak_phase} {self.phase_bytes(self.peak_phase) / GIB:.2f}"
            + (f"; host {self.host_bytes / GIB:.2f} GiB" if self.host_bytes else "")
        )
        return "\n".join(lines)


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "int8"}[dtype]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def audio_tokens_for(seconds: float, audio_config: dict | None = None) -> int:
    """Audio embeddings of `seconds` of audio: 30 s windows (the encoder's), each (((L−1)//2+1)−2)//2+1 tokens
    for L valid mel frames (runtime/audio.py num_audio_tokens; 750 per full window)."""
    from .audio import num_audio_tokens

    max_frames = 2 * int((audio_config or {}).get("max_source_positions", 1500))
    frames = math.ceil(seconds * 16000 / 160)
    full, rest = divmod(frames, max_frames)
    return full * num_audio_tokens(max_frames) + (num_audio_tokens(rest) if rest > 2 else 0)


def _split_config(config: dict) -> tuple[dict, dict | None]:
    """(decoder config, audio config or None) from a manifest, its "config" part ({"text", "audio"}) or a
    bare decoder config.json. A manifest's text config lacks the quantization_config: pass the decoder's
    config.json as "text" (plan_from_artifacts does) for a W4 export."""
    if "config" in config and isinstance(config["config"], dict):
        config = config["config"]
    if "text" in config:
        return config["text"], config.get("audio")
    return config, None


def memory_plan(
    config: dict,
    options: RuntimeOptions,
    audio_seconds: float = 30.0,
    new_tokens: int = 1024,
    prompt_tokens: int = 64,
    *,
    has_int8_head: bool = False,
    device: str | None = None,
) -> MemoryPlan:
    """The plan for one turn of `audio_seconds` + a `prompt_tokens` text prompt answered with `new_tokens`.

    config: {"text": decoder config.json (with its quantization_config for W4), "audio": audio config} (or a
    manifest / a bare decoder config: no encoder rows). has_int8_head: the export wrote the int8 lm_head side
    file (what lm_head="auto" picks up). options.max_context None: exactly the tokens needed, rounded up to
    CONTEXT_ROUND (the pipeline itself would take what fits in memory; pass the size to plan for it).
    device: plan for this device instead of options.device (RuntimeOptions refuses a CUDA device this machine
    does not have; a plan for one needs no GPU): pass options with the dtype meant for it (fp16 on CUDA).
    """
    text_cfg, audio_cfg = _split_config(config)
    dtype = DTYPES[options.dtype or "fp32"]
    dev = torch.device(device or options.device)
    model = build_meta_decoder(text_cfg)
    a = model.args
    head = resolve_lm_head(options.lm_head, has_int8_head)
    emb = resolve_embeddings(options.embeddings, dev, tied_dense_head=a.tie_word_embeddings and head == "dtype")
    kv = "dtype" if options.kv_cache == "auto" else options.kv_cache
    n_audio = audio_tokens_for(audio_seconds, audio_cfg) if audio_cfg is not None else 0
    prefill = n_audio + prompt_tokens
    need = prefill + new_tokens
    max_context = options.max_context or min(a.max_position_embeddings, math.ceil(need / CONTEXT_ROUND) * CONTEXT_ROUND)
    rows = _decoder_rows(model, dtype, dev, emb, head)
    cache = KVCache(a, max_context, dtype, "meta", storage=kv)
    scales = [t for t in (cache.k_scale, cache.v_scale) if t is not None]
    rows.append(
        Component(
            "kv cache K/V",
            _nbytes(cache.k) + _nbytes(cache.v),
            "resident",
            f"{_name(cache.k.dtype)}: {max_context} positions × {a.kv_bytes_per_token(dtype, kv) / 2**10:.0f} KiB"
            + (" (with scales)" if cache.k_scale is not None else ""),
        )
    )
    if scales:
        rows.append(Component("kv cache int8 scales", sum(map(_nbytes, scales)), "resident", "per (position, head)"))
    rows.append(Component("rope tables", _nbytes(cache.cos) + _nbytes(cache.sin), "resident", "cos/sin of the cache"))
    backend, precision = options.encoder_backend, options.encoder_precision or "fp32"
    if audio_cfg is not None:
        enc_cfg = EncoderConfig.from_dict(audio_cfg, a.hidden_size)
        rows += _encoder_rows(enc_cfg, dev, backend, precision, audio_seconds)
    rows += _prefill_rows(model, dtype, dev, kv, prefill, max_context)
    rows += _decode_rows(model, dtype, kv, max_context)
    choices = {
        "embeddings": emb,
        "kv_cache": kv,
        "lm_head": head,
        "encoder": f"{backend} {precision}" if audio_cfg is not None else None,
        "w4": "gptq" if text_cfg.get("quantization_config") else None,
    }
    inputs = {
        "audio_seconds": audio_seconds,
        "audio_tokens": n_audio,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "max_context": max_context,
    }
    return MemoryPlan(str(dev), str(options.dtype), choices, inputs, tuple(rows))


def _decoder_rows(model, dtype: torch.dtype, device: torch.device, emb: str, head: str) -> list[Component]:
    """Weights: each meta tensor at the dtype load_decoder gives it (W4 tensors as stored, the rest `dtype`)."""
    packed = packed_tensor_names(model)
    sums = {"w4": 0, "w4 bias": 0, "dense linears": 0, "norms": 0}
    a = model.args
    for name, t in model.state_dict().items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            continue
        size = t.numel() * (t.element_size() if name in packed else dtype.itemsize)
        kind = (
            ("w4 bias" if name.endswith(".bias") else "w4")
            if name in packed
            else ("norms" if "norm" in name else "dense linears")
        )
        sums[kind] += size
    n_w4 = sum(isinstance(m, QuantLinear) for m in model.modules())
    rows = [
        Component("decoder W4 linears", sums["w4"], "resident", f"qweight/qzeros/scales/g_idx of {n_w4} linears"),
        Component("decoder W4 biases", sums["w4 bias"], "resident", "q/k/v biases (fp16, as stored)"),
        Component("decoder dense linears", sums["dense linears"], "resident", f"non-W4 weights in {_name(dtype)}"),
        Component("decoder norms", sums["norms"], "resident", "RMSNorm weights"),
    ]
    rows = [r for r in rows if r.bytes]
    table = torch.empty(a.vocab_size, a.hidden_size, dtype=dtype, device="meta")
    if emb == "host":
        rows.append(Component("embeddings (host)", _nbytes(table), "host", "pinned host table; one row per token"))
    elif emb == "dtype":
        rows.append(Component("embeddings", _nbytes(table), "resident", f"dense table in {_name(dtype)}"))
    else:
        module = build_embedding(table, emb, dtype, "meta")
        size = sum(_nbytes(b) for b in module.buffers())
        rows.append(Component("embeddings", size, "resident", f"{emb} table on the device"))
    if head == "int8":
        w8 = torch.empty(a.vocab_size, a.hidden_size, dtype=torch.int8, device="meta")
        lm = Int8Linear(w8, torch.empty(a.vocab_size, device="meta"))
        size = sum(_nbytes(b) for b in lm.buffers())
        if device.type == "cpu":  # Int8Linear's CPU op keeps a bf16 copy of the scales (vocab × 2 bytes)
            size += a.vocab_size * torch.bfloat16.itemsize
        rows.append(Component("lm_head", size, "resident", "int8 per row + scales"))
    else:
        rows.append(
            Component("lm_head", a.vocab_size * a.hidden_size * dtype.itemsize, "resident", f"dense {_name(dtype)}")
        )
    return rows


def _encoder_rows(
    cfg: EncoderConfig, device: torch.device, backend: str, precision: str, seconds: float
) -> list[Component]:
    """Encoder weights (the real module's parameters) and its activation peak for one window of the audio."""
    with torch.device("meta"):
        module = AudioEncoderWithProjector(cfg)
    # the torch encoder on CPU always runs fp32 (pipeline._load_encoder); ONNX loads the precision's file
    elt = 4 if precision == "fp32" or (backend == "torch" and device.type == "cpu") else 2
    params = sum(p.numel() for p in module.parameters())
    frames = min(math.ceil(seconds * 100), cfg.max_frames)  # mel frames (hop 160 at 16 kHz) of one window
    pos = (frames - 1) // 2 + 1  # positions after conv2: the transformer's sequence length
    d, ffn, heads = cfg.d_model, cfg.encoder_ffn_dim, cfg.encoder_attention_heads
    # SDPA on CUDA (torch backend) runs flash/memory-efficient attention: no score matrix; ONNX Runtime's
    # exported MatMul→Softmax and the CPU math path hold scores and probabilities, [heads, pos, pos] each.
    scores = 0 if (backend == "torch" and device.type == "cuda") else 2 * heads * pos * pos * elt
    conv = (cfg.num_mel_bins + 2 * d) * (frames + 2) * elt  # mel, conv1 out, its GELU
    attn = pos * 6 * d * elt + scores  # x, norm, q, k, v, attention out (+ scores)
    mlp = pos * (d + 2 * ffn) * elt  # x, fc1 out, its GELU
    return [
        Component("encoder weights", params * elt, "resident", f"{params / 1e6:.0f} M params, {backend} {precision}"),
        Component(
            "encoder activations",
            max(conv, attn, mlp),
            "encode",
            f"{pos} positions; {'no score matrix' if not scores else f'scores {scores / 2**20:.0f} MiB'}",
        ),
    ]


def _prefill_rows(model, dtype: torch.dtype, device: torch.device, kv: str, m: int, ctx: int) -> list[Component]:
    """The decoder's prefill of m positions in one forward (conversation.prefill): the largest layer-stage
    working set, the attention scores if materialized, the int8 KV read-back, the W4 kernel's scratch."""
    a = model.args
    e = dtype.itemsize
    h, inter, d = a.hidden_size, a.intermediate_size, a.head_dim
    nq, nkv = a.num_attention_heads * d, a.num_key_value_heads * d
    # held across a layer: the prompt's embeddings, the residual x, the norm output (its fp32 temporaries too)
    base = m * (3 * h * e + 2 * h * 4)
    attn = m * ((nq + 2 * nkv) + (nq + nkv) * 2 + 2 * nq) * e  # qkv, RoPE temporaries of q/k, attention out + copy
    # boolean-masked SDPA: on CUDA the memory-efficient kernel (no score matrix); on CPU the math path
    scores = 0 if device.type == "cuda" else 2 * a.num_attention_heads * m * m * 4
    # K/V read back in the activation dtype (int8: dequantized; another float storage: cast), and int8's
    # quantization temporaries (fp32 copies of the new K or V: value, |value|, rounded)
    deq = 2 * nkv * ctx * e if kv_storage_dtype(kv, dtype) != dtype else 0
    if kv == "int8":
        deq += 3 * m * nkv * 4
    mlp = m * 4 * inter * e  # gate_up [2I], SiLU(gate) [I], the product [I]
    # W4 scratch: Triton's GEMM reads a re-laid copy of its input (m × K); the reference / dense prefill
    # paths dequantize one weight to fp32 at a time (the largest, fused gate/up: hidden × 2·intermediate)
    w4 = [mod for mod in model.modules() if isinstance(mod, QuantLinear)]
    if not w4:
        scratch = 0
    elif device.type == "cuda":
        scratch = m * max(q.in_features for q in w4) * e
    else:
        scratch = max(h * 2 * inter, h * (nq + 2 * nkv), nq * h) * 4
    logits = a.vocab_size * 4  # the last position's logits, as fp32 for sampling
    return [
        Component(
            "prefill activations", base + max(attn + scores + deq, mlp), "prefill", f"{m} positions in one forward"
        ),
        Component(
            "prefill W4 scratch", scratch, "prefill", "CUDA: Triton input copy; CPU: one fp32 dequantized weight"
        ),
        Component("prefill logits", logits, "prefill", "last position only"),
    ]


def _decode_rows(model, dtype: torch.dtype, kv: str, ctx: int) -> list[Component]:
    """One decode step: a few [1, hidden]-sized tensors, the logits, and (int8 / cast KV) one layer's
    read-back of the cache over the attended prefix."""
    a = model.args
    e = dtype.itemsize
    nkv = a.num_key_value_heads * a.head_dim
    readback = 2 * nkv * ctx * e if kv_storage_dtype(kv, dtype) != dtype else 0
    step = (8 * a.hidden_size + 3 * a.intermediate_size) * e
    return [
        Component("decode step", step + readback, "decode", "int8 KV: one layer's dequantized K/V" if readback else ""),
        Component("decode logits", a.vocab_size * 4 * 2, "decode", "logits + fp32 copy for sampling"),
    ]


def plan_from_artifacts(path, options: RuntimeOptions, **kwargs) -> MemoryPlan:
    """`memory_plan` for an artifacts directory (its decoder config.json, audio config, int8 head side file)."""
    import dataclasses
    import json
    from pathlib import Path

    root = Path(path)
    manifest = json.loads((root / "manifest.json").read_text())
    text = json.loads((root / manifest["files_role"]["decoder_dir"] / "config.json").read_text())
    config = {"text": text, "audio": manifest["config"]["audio"]}
    has_head = bool(manifest.get("decoder", {}).get("lm_head_int8"))
    if options.encoder_precision is None:  # the export's default encoder, as the pipeline loads it
        options = dataclasses.replace(options, encoder_precision=manifest["encoder"]["default"])
    return memory_plan(config, options, has_int8_head=has_head, **kwargs)
