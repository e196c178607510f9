"""GPTQ W4 quality on the random test fixtures → bench/results/cpu/gptq_quality.json.

Why a script: the GPTQ figures the docs publish (ours vs round-to-nearest vs gptqmodel per linear,
audio-aware vs text-only calibration, the int8 lm_head's error, W4 vs fp end to end) used to exist only as
numbers printed by tests/test_gptq.py. The tests assert bounds; this script records the measured values in a
committed file that bench/report.py turns into docs/measurements.md's `gptq-quality` block. The method is the
tests' (same fixtures, settings and seeds), rewritten here so that bench/ does not import tests/.

Sections of the JSON:
- per_linear: for each decoder linear of the tiny MHA fixture, held-out relative output error
  ‖XWᵀ − XŴᵀ‖/‖XWᵀ‖ of our GPTQ, of round-to-nearest (RTN) and of gptqmodel's GPTQ on the identical
  calibration inputs and matched settings (10 calibration prompts, 6 held-out prompts), for group 128
  act-order sym and group 64 asym.
- calibration: audio-aware vs text-only calibration on a fixture whose audio embeddings are ~8× the scale
  of its token embeddings, 8 calibration prompts, held-out audio prompts, 3 seeds: mean per-layer hidden-state
  error and mean KL(fp ‖ W4) of each.
- int8_head: the W4 export's int8 lm_head side file vs the fp16 head on the same hidden states: max logit
  difference ÷ max |logit|, and whether the argmax agrees at every position.
- transformers_load: transformers + optimum + gptqmodel loading our W4 `decoder/`: max logit difference to
  our runtime ÷ max |logit|.
- end_to_end: `compare` of the fp32 artifacts (reference) with the W4 artifacts on two held-out signals:
  16 tokens greedily decoded by fp, teacher-forced through both: top-1 agreement, mean KL, per-layer error.

These fixtures have deliberately wide random weights (so greedy decoding is decisive); they amplify
quantization error through the layers and measure the machinery, not real-model quality.
No timings are recorded: quality figures do not depend on machine load.

Usage: python bench/gptq_quality.py [--out bench/results/cpu/gptq_quality.json]   (about 3 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from qwen_audio_edge.export.calibrate import CalibrationOptions, build_calibration
from qwen_audio_edge.export.gptq import GPTQConfig, HessianAccumulator, gptq_quantize, rtn_quantize
from qwen_audio_edge.export.package import ExportOptions, export_checkpoint
from qwen_audio_edge.export.synthetic_audio import speech_like_signal
from qwen_audio_edge.random_checkpoint import build_tiny_checkpoint
from qwen_audio_edge.runtime.pipeline import Pipeline
from qwen_audio_edge.runtime.prompt import embed_prompt

ROOT = Path(__file__).resolve().parents[1]
LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
CONFIGS = {"g128-act-sym": GPTQConfig(), "g64-asym": GPTQConfig(group_size=64, act_order=False, sym=False)}
PROMPT = "What does the person say?"


def _embed(pipeline: Pipeline, decoder, sample) -> torch.Tensor:
    return embed_prompt(decoder, sample.ids, sample.audio, pipeline.prompt.audio_token_id)


def layer_inputs(pipeline: Pipeline, samples) -> dict[str, torch.Tensor]:
    """Inputs of every decoder linear of the fp model over `samples` (rows = tokens)."""
    d = pipeline.decoder
    store: dict[str, list] = {}
    handles = []
    for i, layer in enumerate(d.model.layers):
        for path in LINEARS:
            hook = lambda m, inp, out, key=f"{i}.{path}": store.setdefault(key, []).append(inp[0][0].detach().clone())
            handles.append(layer.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for s in samples:
                d(_embed(pipeline, d, s), 0, d.setup_cache(len(s.ids)))
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in store.items()}


def gptqmodel_quantize(weight: torch.Tensor, x: torch.Tensor, cfg: GPTQConfig) -> torch.Tensor:
    """gptqmodel's GPTQ on the same inputs, matched settings, its extras off; returns Ŵ."""
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data = weight.clone()
    qc = QuantizeConfig(
        bits=4,
        group_size=cfg.group_size,
        desc_act=cfg.act_order,
        sym=cfg.sym,
        damp_percent=cfg.damp,
        damp_auto_increment=0.0,
        act_group_aware=False,
    )
    g = GPTQ(lin, qc)
    g.quantizer.configure(perchannel=True)
    g.add_batch(x[None], None)
    g.hf_quantize(
        blocksize=128,
        percdamp=cfg.damp,
        damp_auto_increment=0.0,
        group_size=cfg.group_size,
        actorder=cfg.act_order,
        static_groups=False,
        act_group_aware=False,
    )
    return lin.weight.data.float()


def _output_err(x: torch.Tensor, target: torch.Tensor, wq: torch.Tensor) -> float:
    """Relative error ‖x·Ŵᵀ − target‖/‖target‖ of a linear's output with weight Ŵ = `wq` (target = x·Wᵀ)."""
    return float((x @ wq.T - target).norm() / target.norm())


def per_linear(artifacts: Path) -> dict:
    """Held-out relative output error of ours / RTN / gptqmodel for every linear, per GPTQ config."""
    p = Pipeline.from_artifacts(artifacts, fuse=False)  # the hooks need the checkpoint's separate q/k/v, gate/up
    calib, _ = build_calibration(CalibrationOptions(num_samples=10, seed=0), p.prompt, p.mel, p.encoder)
    held, _ = build_calibration(CalibrationOptions(num_samples=6, seed=99), p.prompt, p.mel, p.encoder)
    xs, xh = layer_inputs(p, calib), layer_inputs(p, held)
    out = {}
    for name, cfg in CONFIGS.items():
        rows = []
        for key, x in xs.items():
            layer, path = key.split(".", 1)
            w = p.decoder.model.layers[int(layer)].get_submodule(path).weight.detach().float()
            acc = HessianAccumulator(w.shape[1])
            acc.add(x)
            err = functools.partial(_output_err, xh[key], xh[key] @ w.T)
            ours, rtn = err(gptq_quantize(w, acc.h, cfg).dequantized), err(rtn_quantize(w, cfg).dequantized)
            ref = err(gptqmodel_quantize(w, x, cfg))
            rows.append(
                {
                    "linear": key,
                    "calibration_rows": x.shape[0],
                    "in_features": w.shape[1],
                    "ours": ours,
                    "rtn": rtn,
                    "gptqmodel": ref,
                    "ours_over_gptqmodel": ours / ref,
                }
            )
            print(f"{name:13s} {key:20s} ours {ours:.4f}  rtn {rtn:.4f}  gptqmodel {ref:.4f}", flush=True)
        out[name] = {
            "group_size": cfg.group_size,
            "act_order": cfg.act_order,
            "sym": cfg.sym,
            "damp": cfg.damp,
            "rows": rows,
        }
    return {"calibration_prompts": 10, "heldout_prompts": 6, "configs": out}


def _w4_copy(fp_decoder, state_dir: Path):
    """The fp decoder with every linear replaced by its dequantized GPTQ weight from a quantize state dir."""
    from safetensors.torch import load_file

    from qwen_audio_edge.kernels.w4_ref import dequantize

    d = copy.deepcopy(fp_decoder)
    for i, layer in enumerate(d.model.layers):
        state = load_file(str(state_dir / f"layer-{i:05d}.safetensors"))
        for path in LINEARS:
            k = f"model.layers.{i}.{path}"
            layer.get_submodule(path).weight.data = dequantize(
                state[f"{k}.qweight"], state[f"{k}.qzeros"], state[f"{k}.scales"], state[f"{k}.g_idx"]
            ).T
    return d


def calibration_modes(root: Path) -> dict:
    """Audio-aware vs text-only calibration on the loud-audio fixture, 3 seeds."""
    from qwen_audio_edge.evaluation.compare import Scored, _hook_layers, layer_error_and_kl
    from qwen_audio_edge.export.checkpoint import SourceCheckpoint
    from qwen_audio_edge.export.quantize import quantize_decoder

    ckpt = build_tiny_checkpoint(root / "loud-checkpoint", "mha", audio_embed_scale=8.0, seed=5)
    export_checkpoint(ckpt, root / "loud-artifacts", ExportOptions(bits=32, progress=False))
    p = Pipeline.from_artifacts(root / "loud-artifacts", fuse=False)
    src = SourceCheckpoint.open(ckpt)
    held, _ = build_calibration(CalibrationOptions(num_samples=6, seed=1234), p.prompt, p.mel, p.encoder)
    held = [s for s in held if s.audio is not None]
    audio_norm = float(torch.cat([s.audio for s in held]).norm(dim=-1).mean())
    text_norm = float(p.decoder.model.embed_tokens.weight.detach().norm(dim=-1).mean())

    def score(decoder, sample) -> Scored:
        with torch.inference_mode():
            outs, handles = _hook_layers(decoder.model.layers)
            try:
                logits = decoder(_embed(p, decoder, sample), 0, decoder.setup_cache(len(sample.ids)), all_logits=True)[
                    0
                ]
            finally:
                for h in handles:
                    h.remove()
        return Scored(logits.float(), outs)

    fp_scores = [score(p.decoder, s) for s in held]
    seeds = []
    for seed in (0, 1, 2):
        row: dict = {"seed": seed}
        for mode in ("audio", "text"):
            samples, _ = build_calibration(
                CalibrationOptions(num_samples=8, seed=seed, mode=mode), p.prompt, p.mel, p.encoder
            )
            state = root / f"calib-{mode}-{seed}"
            quantize_decoder(src, p.decoder.args, samples, GPTQConfig(), state, p.prompt.audio_token_id, progress=False)
            q = _w4_copy(p.decoder, state)
            errs, kls = [], []
            for ref, s in zip(fp_scores, held, strict=True):
                r = layer_error_and_kl(ref, score(q, s), 0)
                errs.append(sum(r["layer_rel_err"]) / len(r["layer_rel_err"]))
                kls.append(sum(r["kl"]) / len(r["kl"]))
            row[mode] = {"mean_layer_rel_err": sum(errs) / len(errs), "mean_kl": sum(kls) / len(kls)}
        print(f"seed {seed}: audio-aware {row['audio']} | text-only {row['text']}", flush=True)
        seeds.append(row)
    return {
        "audio_embed_scale": 8.0,
        "audio_embedding_norm_over_token_norm": audio_norm / text_norm,
        "calibration_prompts": 8,
        "heldout_audio_prompts": len(held),
        "seeds": seeds,
    }


def int8_head(artifacts: Path) -> dict:
    """The int8 lm_head side file vs the fp16 head of the same W4 decoder, on the same ids."""
    from qwen_audio_edge.runtime.decoder import load_decoder

    p = Pipeline.from_artifacts(artifacts)
    fp16_head = load_decoder(artifacts / "decoder", torch.float32, "cpu")
    ids = torch.tensor([[3, 50, 100, 7, 250, 11, 42, 360, 1]])
    with torch.inference_mode():
        a = p.decoder(p.decoder.embed(ids), 0, p.decoder.setup_cache(16), all_logits=True)[0].float()
        b = fp16_head(fp16_head.embed(ids), 0, fp16_head.setup_cache(16), all_logits=True)[0].float()
    return {
        "head_class": type(p.decoder.lm_head).__name__,
        "positions": ids.shape[1],
        "max_logit_diff_over_max_logit": float((a - b).abs().max() / b.abs().max()),
        "argmax_equal": bool(torch.equal(a.argmax(-1), b.argmax(-1))),
    }


def transformers_load(artifacts: Path) -> dict:
    """transformers + optimum + gptqmodel load our W4 decoder/: logits vs our runtime's on the same ids."""
    from transformers import AutoModelForCausalLM
    from transformers import GPTQConfig as HFGPTQConfig

    from qwen_audio_edge.runtime.decoder import load_decoder

    dec = artifacts / "decoder"
    ref = AutoModelForCausalLM.from_pretrained(
        str(dec), quantization_config=HFGPTQConfig(bits=4, backend="torch"), dtype=torch.float32, device_map="cpu"
    ).eval()
    ours = load_decoder(dec, torch.float32, "cpu")
    ids = torch.tensor([[3, 50, 100, 7, 250, 11, 42, 360, 1]])
    with torch.no_grad():
        expected = ref(ids).logits[0].float()
        got = ours(ours.embed(ids), 0, ours.setup_cache(16), all_logits=True)[0].float()
    rel = float((got - expected).abs().max() / expected.abs().max())
    return {"positions": ids.shape[1], "max_logit_diff_over_max_logit": rel}


def end_to_end(fp_artifacts: Path, w4_artifacts: Path) -> dict:
    """`compare` fp32 artifacts (reference) vs W4 artifacts on two held-out signals, 16 teacher-forced tokens."""
    from qwen_audio_edge.evaluation.compare import OurModel, compare

    signals = [(3.1, 50), (7.7, 51)]
    waves = [speech_like_signal(secs, seed=seed) for secs, seed in signals]
    report = compare(OurModel(fp_artifacts), OurModel(w4_artifacts), waves, PROMPT, 16)
    return {
        "signals": [{"seconds": s, "seed": seed} for s, seed in signals],
        "prompt": PROMPT,
        "new_tokens": 16,
        "top1_agreement": report["top1_agreement"],
        "mean_kl": report["mean_kl"],
        "layer_rel_err": report["layer_rel_err"],
    }


def environment() -> dict:
    import gptqmodel
    import transformers

    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gptqmodel": getattr(gptqmodel, "__version__", "unknown"),
        "threads": torch.get_num_threads(),
        "date": datetime.date.today().isoformat(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu" / "gptq_quality.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = build_tiny_checkpoint(root / "checkpoint", "mha")
        export_checkpoint(ckpt, root / "fp", ExportOptions(bits=32, progress=False))
        export_checkpoint(
            ckpt,
            root / "w4",
            ExportOptions(
                bits=4, progress=False, lm_head="int8", threads=2, calibration=CalibrationOptions(num_samples=10)
            ),
        )
        result = {
            "script": "python bench/gptq_quality.py",
            "fixture": "tiny random MHA Qwen2-Audio checkpoint (qwen_audio_edge.random_checkpoint, seed 0): "
            "decoder hidden 128, 2 layers",
            "environment": environment(),
            "per_linear": per_linear(root / "fp"),
            "calibration": calibration_modes(root),
            "int8_head": int8_head(root / "w4"),
            "transformers_load": transformers_load(root / "w4"),
            "end_to_end": end_to_end(root / "fp", root / "w4"),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
