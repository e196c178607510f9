"""Layer-by-layer GPTQ of the decoder, one layer materialized at a time, resumable.

Each decoder layer is read from the source checkpoint in fp32, quantized "true-sequentially" — (q, k,
v), then o, then (gate, up), then down, each group calibrated on inputs computed with the groups before
it already quantized — and the calibration hidden states are pushed through the finished quantized
layer to become the next layer's inputs. Only one layer's fp32 weights, the hidden states of the
calibration set and one Hessian group ever live in memory.

Non-quantized tensors of a layer (biases, norms) are rounded to fp16 before use, exactly as stored, so
the forward pass here equals the runtime's and a resumed run reproduces an uninterrupted one bit for
bit. Each finished layer is written to `state_dir/layer-NNNNN.safetensors` (atomically); `resume`
reloads those instead of recomputing them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..runtime.decoder import DecoderLayer, KVCache, ModelArgs
from ..runtime.errors import CheckpointError, ExportError
from ..runtime.prompt import place_audio
from ..runtime.quant_linear import W4_LINEARS
from .calibrate import CalibrationSample
from .checkpoint import SourceCheckpoint, map_key
from .gptq import GPTQConfig, HessianAccumulator, gptq_quantize

SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def _tensor_index(src: SourceCheckpoint) -> dict[str, tuple[Path, str]]:
    """runtime decoder key → (shard file, checkpoint key), from the safetensors headers only."""
    from safetensors import safe_open

    index = {}
    for f in src.weight_files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():  # noqa: SIM118 -- safe_open has keys() but is not iterable
                part, new = map_key(key)
                if part == "decoder":
                    index[new] = (f, key)
    return index


def _read(index: dict, key: str) -> torch.Tensor:
    from safetensors import safe_open

    if key not in index:
        raise CheckpointError(f"source checkpoint lacks decoder tensor {key}")
    f, orig = index[key]
    with safe_open(str(f), framework="pt", device="cpu") as sf:
        return sf.get_tensor(orig)


def _get(layer: nn.Module, path: str) -> nn.Linear:
    parent, child = path.split(".")
    return getattr(getattr(layer, parent), child)


class _LayerRunner:
    """Runs one decoder layer over every calibration sample (a one-layer fp32 KV cache and its RoPE tables)."""

    def __init__(self, args: ModelArgs, max_len: int, device: torch.device):
        self.one = dataclasses.replace(args, num_hidden_layers=1)
        self.cache = KVCache(self.one, max_len, torch.float32, device)

    @torch.no_grad()
    def run(self, layer: DecoderLayer, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        cos, sin = self.cache.cos, self.cache.sin
        out = []
        for x in hidden:
            s = x.shape[1]
            out.append(layer(x, cos[:s][None, None], sin[:s][None, None], self.cache, 0, 0))
        return out


def _fp16_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)  # a resumed export trusts every layer file it finds: never expose a torn one
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _layer_from_state(
    args: ModelArgs, state: dict[str, torch.Tensor], prefix: str, device: torch.device
) -> DecoderLayer:
    """An fp32 DecoderLayer whose linears hold the dequantized W4 weights of a saved layer."""
    from ..kernels.w4_ref import dequantize

    layer = DecoderLayer(args)
    sd = {}
    for name in layer.state_dict():
        base = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and base in W4_LINEARS:
            p = f"{prefix}.{base}"
            sd[name] = dequantize(
                state[f"{p}.qweight"], state[f"{p}.qzeros"], state[f"{p}.scales"], state[f"{p}.g_idx"]
            ).T
        else:
            sd[name] = state[f"{prefix}.{name}"].float()
    layer.load_state_dict(sd)
    return layer.to(device).eval()


def quantize_decoder(
    src: SourceCheckpoint,
    args: ModelArgs,
    samples: list[CalibrationSample],
    cfg: GPTQConfig,
    state_dir: Path,
    audio_token_id: int,
    *,
    device: str = "cpu",
    progress: bool = True,
    eval_samples: int = 4,
) -> dict:
    """Quantize every decoder layer into `state_dir/layer-*.safetensors`; returns per-layer metrics."""
    from safetensors import safe_open
    from tqdm import tqdm

    dev = torch.device(device)
    state_dir.mkdir(parents=True, exist_ok=True)
    index = _tensor_index(src)
    embed = _read(index, "model.embed_tokens.weight")  # stored dtype: rows are converted as they are gathered
    hidden = []
    for s in samples:
        x = place_audio(embed[torch.tensor(s.ids)].float(), s.ids, s.audio, audio_token_id)
        hidden.append(x[None].to(dev))
    del embed
    runner = _LayerRunner(args, max(len(s.ids) for s in samples), dev)
    metrics: dict[str, dict] = {}
    # Export-time quality report on a few calibration prompts: an fp stream beside the quantized one.
    eval_idx = list(range(min(eval_samples, len(hidden))))
    fp_stream = [hidden[j].clone() for j in eval_idx]
    eval_err: list[float] = []
    bar = tqdm(
        range(args.num_hidden_layers), desc="GPTQ layers", disable=not progress, file=sys.stderr, dynamic_ncols=True
    )
    for i in bar:
        prefix = f"model.layers.{i}"
        done = state_dir / f"layer-{i:05d}.safetensors"
        if done.exists():
            try:
                with safe_open(str(done), framework="pt", device="cpu") as sf:
                    state = {k: sf.get_tensor(k) for k in sf.keys()}  # noqa: SIM118 -- safe_open is not iterable
                    layer_metrics = json.loads(sf.metadata()["metrics"])
            except Exception as e:
                raise ExportError(f"GPTQ resume state {done} is unreadable ({e}); rerun without --resume") from e
            layer = _layer_from_state(args, state, prefix, dev)
            fp_stream = runner.run(_fp_layer(index, args, prefix, dev, cfg), fp_stream)
        else:
            layer = _fp_layer(index, args, prefix, dev, cfg)
            fp_stream = runner.run(layer, fp_stream)  # before its weights are replaced by quantized ones
            state, layer_metrics = _quantize_layer(layer, hidden, runner, cfg, prefix)
            _save_atomic(state, done, {"metrics": json.dumps(layer_metrics), "format": "pt"})
        metrics[prefix] = layer_metrics
        hidden = runner.run(layer, hidden)
        eval_err.append(_rel_err([hidden[j] for j in eval_idx], fp_stream))
        bar.set_postfix_str(f"hidden rel err {eval_err[-1]:.4f}")
        del layer
    report = {"samples": len(eval_idx), "layer_rel_err": eval_err}
    report.update(_head_agreement(index, args, [hidden[j] for j in eval_idx], fp_stream))
    return {"layers": metrics, "eval": report}


def _fp_layer(index: dict, args: ModelArgs, prefix: str, dev: torch.device, cfg: GPTQConfig) -> DecoderLayer:
    """Layer `prefix` from the source in fp32; non-quantized tensors rounded to fp16 as they will be stored."""
    layer = DecoderLayer(args)
    sd = {}
    for name in layer.state_dict():
        t = _read(index, f"{prefix}.{name}").float()
        base = name.rsplit(".", 1)[0]
        sd[name] = t if (name.endswith(".weight") and base in W4_LINEARS) else _fp16_round(t)
    for k in W4_LINEARS:
        cfg.check_layer(f"{prefix}.{k}", sd[f"{k}.weight"].shape[1], sd[f"{k}.weight"].shape[0])
    layer.load_state_dict(sd)
    return layer.to(dev).eval()


def _rel_err(cand: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    num = sum(float((c - r).pow(2).sum()) for c, r in zip(cand, ref, strict=True))
    den = sum(float(r.pow(2).sum()) for r in ref)
    return math.sqrt(num / den) if den > 0 else 0.0


@torch.no_grad()
def _head_agreement(index: dict, args: ModelArgs, quant: list[torch.Tensor], fp: list[torch.Tensor]) -> dict:
    """Top-1 agreement and mean KL(fp ‖ W4) of next-token distributions over every eval position."""
    from ..runtime.decoder import RMSNorm

    norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
    norm.weight.data = _read(index, "model.norm.weight").float()
    key = "lm_head.weight" if "lm_head.weight" in index else "model.embed_tokens.weight"
    head = _read(index, key)  # stored dtype; converted in row chunks (a 156k-row fp32 head is 2.5 GB)
    chunk = 16384

    def logits(x: torch.Tensor, fp16: bool) -> torch.Tensor:
        parts = []
        for i in range(0, head.shape[0], chunk):
            h = head[i : i + chunk].float()
            parts.append(x @ (_fp16_round(h) if fp16 else h).T)
        return torch.cat(parts, dim=-1)

    kl_sum = agree = n = 0.0
    for q, f in zip(quant, fp, strict=True):
        hf_, hq = norm(f.cpu())[0], norm(q.cpu())[0]
        for p0 in range(0, hf_.shape[0], 256):  # positions in chunks: [S, 156k] fp32 logits are large
            lf = logits(hf_[p0 : p0 + 256], False).log_softmax(-1)
            lq = logits(hq[p0 : p0 + 256], True).log_softmax(-1)
            kl_sum += float((lf.exp() * (lf - lq)).sum())
            agree += float((lf.argmax(-1) == lq.argmax(-1)).sum())
            n += lf.shape[0]
    return {"top1_agreement": agree / n if n else None, "mean_kl": kl_sum / n if n else None, "positions": int(n)}


def _accumulate_into(acc: HessianAccumulator) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
    """A forward hook adding the module's input rows to `acc` (a function, so each group's hook binds its own)."""

    def hook(module: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        acc.add(inp[0].detach())

    return hook


def _quantize_layer(
    layer: DecoderLayer, hidden: list[torch.Tensor], runner: _LayerRunner, cfg: GPTQConfig, prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """GPTQ one layer group by group (true-sequential); returns its stored tensors and per-linear metrics."""
    state: dict[str, torch.Tensor] = {}
    metrics: dict[str, dict] = {}
    for group in SEQUENTIAL_GROUPS:
        first = _get(layer, group[0])
        acc = HessianAccumulator(first.in_features, first.weight.device)
        handle = first.register_forward_hook(_accumulate_into(acc))
        try:
            runner.run(layer, hidden)
        finally:
            handle.remove()
        for path in group:
            lin = _get(layer, path)
            w = lin.weight.detach().float()
            q = gptq_quantize(w, acc.h, cfg)
            w = w.cpu()
            state.update(q.tensors(f"{prefix}.{path}"))
            if lin.bias is not None:
                state[f"{prefix}.{path}.bias"] = lin.bias.detach().cpu().to(torch.float16)
            diff = w - q.dequantized
            h = acc.h.cpu()
            num = torch.einsum("ij,jk,ik->", diff, h, diff).clamp(min=0)
            den = torch.einsum("ij,jk,ik->", w, h, w)
            metrics[path] = {"rel_err": math.sqrt(float(num / den)) if den > 0 else 0.0, "rows": acc.n}
            with torch.no_grad():
                lin.weight.copy_(q.dequantized.to(lin.weight.device))
    for name, t in layer.state_dict().items():
        base = name.rsplit(".", 1)[0]
        if base not in W4_LINEARS:
            state[f"{prefix}.{name}"] = t.detach().cpu().to(torch.float16)
    return state, metrics
