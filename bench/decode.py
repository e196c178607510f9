"""Whole-model decode benchmark: our W4 decoder vs transformers `generate()` on the same weights, same run.

Builds a random Qwen2 decoder at a given shape directly on the device: transformers' Qwen2ForCausalLM,
and our decoder sharing its embedding/norm/lm_head, with every linear round-to-nearest quantized from the
transformers model's own weights (GPTQ layout, g128, an act-order-like g_idx permutation: the kernels'
speed does not depend on the values, but the outputs of the two engines are then comparable). Times
batch-1 greedy decode after a prompt. Every row records engine, weights, activation and matmul dtypes,
lm_head, fusion, tok/s (median of --repeats, with min/max and every sample), bytes read per token,
achieved GB/s; the JSON records the command, machine and versions (`environment`).

Rows (CPU defaults; on CUDA transformers runs in fp16, as our decoder does):
  ours_w4_float32_head           our runtime as a CPU user gets it: fp32 activations, the W4 matmuls in
                                 bf16 (torch's CPU int4 op computes in bf16), fp32 lm_head, fused q/k/v, gate/up
  ours_w4_float32_head_unfused   --no-fuse: the same, RuntimeOptions(fuse=False) (before/after fusion)
  ours_w4_int8_head              --int8-head: the int8 lm_head side file
  ours_dense_float32             --dense: our decoder on the unquantized fp32 weights (our runtime's own
                                 overhead against transformers at identical weights and dtype)
  transformers_float32, transformers_bfloat16   --hf-dtypes: transformers fp32, and bf16 (the dtype our W4
                                 matmuls compute in: the like-for-like baseline for the W4 rows)

Outputs are compared before a row is timed (`checks`): every engine's greedy tokens for the timed
prompt (from its untimed warm-up run). On CPU, paths that must agree token for token are required to
(else the script stops before timing them): fused vs unfused (the same W4 weights and kernels), and our
dense fp32 decoder vs transformers fp32 (same weights, same dtype). Paths that legitimately differ (W4
vs fp, bf16 vs fp32, int8 vs fp head; on the GPU path also fused fp16 kernels vs torch ops) record how
many leading greedy tokens agree (`compare_tokens`): random weights make near-ties common, so this is a
sanity figure, not quality (quality: `qwen-audio-edge compare` on real weights).

`--gpu-path` on CPU takes the CUDA run's code path at whatever preset: Triton W4 and fused kernels under
the Triton interpreter (TRITON_INTERPRET=1, set here), fp16 activations, the static decode step (eager:
CUDA graphs need a GPU) and the step breakdown timed eagerly — with `--preset tiny`, a check of this
script in seconds (`bench/gpu_check.sh --dry-run`), not a speed. `--out` is rewritten (atomically) after
every timed run, so a run cut off by a time limit leaves valid JSON with what finished.

    python bench/decode.py --preset cpu-mid --no-fuse --int8-head --dense --out bench/results/cpu/decode_cpu_mid.json
    python bench/decode.py --preset 7b --device cuda   # GPU: W4 vs transformers fp16 (see gpu_check.sh)
    python bench/decode.py --preset tiny --gpu-path --prompt 12 --new 3 --repeats 1 --int8-head   # the dry run
    python bench/decode.py --preset tiny --prompt 16 --new 8 --repeats 1 --no-fuse --int8-head --dense   # CPU check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

from kernel_bench import cpu_seconds, environment, graph_seconds, replay_seconds, write_json  # bench/kernel_bench.py

PRESETS = {
    "cpu-mid": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=156032,
    ),
    # the 7B's kinds of layer (MHA, head_dim 64 so the fused RoPE runs, K multiples of the group 128) at a
    # size the Triton interpreter decodes in well under a second per token: the dry run
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=1024,
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rtn_gptq(weight: torch.Tensor, perm: torch.Tensor, group_size: int = 128) -> dict[str, torch.Tensor]:
    """Round-to-nearest 4-bit (symmetric, fp16 scales) of weight [N, K] in GPTQ layout, with act-order-style
    groups: the K columns taken in `perm`'s order, every `group_size` of them one group (what GPTQ with
    desc_act stores: g_idx[perm] = 0, 0, …, 1, 1, …). Vectorized on weight's device (a 7B layer in
    milliseconds on a GPU); the same group parameters as the exporter (export/gptq.py `group_params`)."""
    from qwen_audio_edge.export.gptq import MAXQ, group_params
    from qwen_audio_edge.kernels.w4_ref import pack_cols, pack_rows

    n, k = weight.shape
    groups = k // group_size
    w = weight.detach().float()[:, perm].reshape(n * groups, group_size)
    scale, zero = group_params(w, sym=True)  # per (row, group)
    codes = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, MAXQ).reshape(n, k)
    q = torch.empty_like(codes)
    q[:, perm] = codes
    g_idx = torch.empty(k, dtype=torch.int32, device=weight.device)
    g_idx[perm] = (torch.arange(k, device=weight.device) // group_size).int()
    return {
        "qweight": pack_rows(q.T.contiguous()),
        "qzeros": pack_cols((zero.view(n, groups).T - 1).long()),
        "scales": scale.view(n, groups).T.to(torch.float16).contiguous(),
        "g_idx": g_idx,
    }


def w4_state(
    hf_model, cfg: dict, device: torch.device, dtype: torch.dtype, group_size: int = 128, values: str = "rtn"
) -> dict[str, torch.Tensor]:
    """The state dict of our W4 decoder: GPTQ tensors for every q/k/v/o/gate/up/down linear, and
    `hf_model`'s embedding/norms/lm_head in `dtype` (shared, not copied, when already in it).
    values="rtn": the linears quantized from hf_model's weights (outputs comparable with it);
    "random": random nibbles (no work at all: the speed does not depend on the values)."""
    from qwen_audio_edge.runtime.decoder import ModelArgs, Qwen2Decoder
    from qwen_audio_edge.runtime.quant_linear import QuantLinear, swap_in_quant_linears

    if values not in ("rtn", "random"):
        raise ValueError(f"values must be rtn or random, got {values!r}")
    with torch.device("meta"):
        model = Qwen2Decoder(ModelArgs.from_config(cfg))
        swap_in_quant_linears(model, {"quant_method": "gptq", "bits": 4, "group_size": group_size})
    gen = torch.Generator(device=device).manual_seed(0)
    hf_sd = hf_model.state_dict()
    sd, perms = {}, {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        k, n = m.in_features, m.out_features
        # GPTQ's act-order permutation comes from the input's Hessian, so q/k/v share one and gate/up
        # share one (which lets the runtime fuse them); o and down have inputs of their own.
        layer_name, _, proj = name.rpartition(".")
        key = name if proj in ("o_proj", "down_proj") else layer_name
        if key not in perms:
            perms[key] = torch.randperm(k, device=device, generator=gen)
        perm = perms[key]
        if values == "rtn":
            sd.update({f"{name}.{t}": v for t, v in rtn_gptq(hf_sd[f"{name}.weight"], perm, group_size).items()})
        else:
            sd[f"{name}.qweight"] = torch.randint(
                -(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device=device, generator=gen
            )
            sd[f"{name}.qzeros"] = torch.full((k // group_size, n // 8), 0x77777777, dtype=torch.int32, device=device)
            sd[f"{name}.scales"] = (torch.rand(k // group_size, n, device=device, generator=gen) * 0.01).half()
            sd[f"{name}.g_idx"] = (torch.arange(k, device=device) // group_size).int()[perm]
        if m.bias is not None:
            sd[f"{name}.bias"] = hf_sd[f"{name}.bias"].to(device=device, dtype=torch.float16)
    for key, t in hf_sd.items():
        if key not in sd and not key.endswith(("proj.weight", "proj.bias")):
            sd[key] = t.to(device=device, dtype=dtype)
    return sd


def _finish(model, device: torch.device, w4_kernel: str, fused: bool | None, fuse: bool):
    """What load_decoder does after loading: fusion (RuntimeOptions.fuse), fused element-wise kernels
    (`fused`; None: on CUDA), one self-check verdict per shape class, the W4 paths prepared."""
    from qwen_audio_edge.runtime.decoder import enable_fused_kernels, fuse_projections
    from qwen_audio_edge.runtime.quant_linear import QuantLinear
    from qwen_audio_edge.runtime.selfcheck import SelfCheck

    model.fused_projections = fuse_projections(model) if fuse else 0
    model.fused_kernels = fuse and (device.type == "cuda" if fused is None else fused) and enable_fused_kernels(model)
    model.selfcheck = SelfCheck()
    model.w4_kernels = sorted(
        {m.prepare(w4_kernel, checks=model.selfcheck) for m in model.modules() if isinstance(m, QuantLinear)}
    )
    return model.eval()


def random_w4_decoder(
    hf_model,
    cfg: dict,
    device: torch.device,
    dtype: torch.dtype,
    group_size: int = 128,
    *,
    w4_kernel: str = "auto",
    fused: bool | None = None,
    fuse: bool = True,
    values: str = "random",
    state: dict[str, torch.Tensor] | None = None,
):
    """Our W4 decoder built directly on `device` from `state` (else `w4_state(..., values)`), sharing the
    embedding/norm/lm_head of `hf_model`. `w4_kernel` as `--w4-kernel` (triton on CPU needs
    TRITON_INTERPRET=1); `fuse`: RuntimeOptions.fuse (q/k/v and gate/up fused, fused kernels allowed);
    `fused`: the fused element-wise kernels (None: on CUDA, as load_decoder does)."""
    from qwen_audio_edge.runtime.decoder import ModelArgs, Qwen2Decoder
    from qwen_audio_edge.runtime.quant_linear import swap_in_quant_linears

    sd = state if state is not None else w4_state(hf_model, cfg, device, dtype, group_size, values)
    with torch.device("meta"):
        model = Qwen2Decoder(ModelArgs.from_config(cfg))
        swap_in_quant_linears(model, {"quant_method": "gptq", "bits": 4, "group_size": group_size})
    model.load_state_dict(dict(sd), assign=True, strict=True)
    return _finish(model, device, w4_kernel, fused, fuse)


def dense_decoder(hf_model, cfg: dict, device: torch.device, dtype: torch.dtype, *, fused: bool | None = None):
    """Our decoder on `hf_model`'s own unquantized weights in `dtype` (shared, not copied, when already in it)."""
    from qwen_audio_edge.runtime.decoder import ModelArgs, Qwen2Decoder

    with torch.device("meta"):
        model = Qwen2Decoder(ModelArgs.from_config(cfg))
    model.load_state_dict(
        {k: t.to(device=device, dtype=dtype) for k, t in hf_model.state_dict().items()}, assign=True, strict=True
    )
    return _finish(model, device, "auto", fused, True)


def bytes_per_token(cfg: dict, context: int, head_bytes: float, act_bytes: int, group: int = 128) -> float:
    """Bytes one decode step must read: W4 weights (nibbles + one fp16 scale and one 4-bit zero per
    group of `group` rows per column, + the int32 act-order permutation per input row of each of the 4
    matmuls), the lm_head, and the K/V cache up to `context`. Norms, biases and the embedding row are
    under 0.01 % and left out."""
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    linear = layers * (h * h * 2 + 2 * h * kv + 3 * h * i)
    w4 = linear * (0.5 + 2 / group + 0.5 / group) + layers * 4 * (3 * h + i)
    kv_cache = 2 * layers * kv * context * act_bytes
    return w4 + head_bytes + kv_cache


def dense_bytes_per_token(cfg: dict, context: int, weight_bytes: int) -> float:
    """Bytes one decode step of a dense model reads: every parameter but the embedding table, + K/V cache."""
    h, i, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    params = layers * (h * h * 2 + 2 * h * kv + 3 * h * i + h + 2 * kv + 2 * h) + h + vocab * h
    return (params + 2 * layers * kv * context) * weight_bytes


def compare_tokens(a: list[int], b: list[int]) -> dict:
    """How far two greedy token sequences agree: the length of their common prefix, out of how many.
    After the first difference the two continue from different histories, so later positions say nothing."""
    n = min(len(a), len(b))
    prefix = next((i for i in range(n) if a[i] != b[i]), n)
    return {"tokens_compared": n, "common_prefix": prefix, "equal": prefix == n and len(a) == len(b)}


@torch.inference_mode()
def breakdown(model, step, pos: int, token_ms: float, dtype: torch.dtype) -> dict:
    """Where one decode step's time goes: every layer's W4 matmuls alone (M = 1, in order), the lm_head
    alone, and the whole static step at `pos`'s bucket — each replayed as a CUDA graph on CUDA (the step:
    the graph the run captured), timed eagerly on CPU (the dry run's path). The rest of the step is
    attention over the cache, norms, RoPE, residuals, the embedding row and graph gaps; the rest of a
    token's wall time is host work (sampling, Python, the token fill)."""
    from qwen_audio_edge.runtime.quant_linear import QuantLinear

    lins = [m for m in model.modules() if isinstance(m, QuantLinear)]
    dev = step.cache.k.device
    xs = [torch.randn(1, m.in_features, device=dev, dtype=dtype) for m in lins]
    h = torch.randn(1, model.args.hidden_size, device=dev, dtype=dtype)
    run_lins, run_head = (lambda: [m(x) for m, x in zip(lins, xs, strict=True)]), (lambda: model.lm_head(h))
    if dev.type == "cuda":
        lin_ms, head_ms = 1e3 * graph_seconds([run_lins]), 1e3 * graph_seconds([run_head])
        captured = step.captured(pos)
        step_ms = 1e3 * replay_seconds(captured) if captured is not None else math.nan
    else:
        lin_ms, head_ms = 1e3 * cpu_seconds([run_lins], 1), 1e3 * cpu_seconds([run_head], 1)
        step_ms = 1e3 * cpu_seconds([lambda: step(0, pos)], 1)  # rewrites the K/V at pos: past the timed tokens
    return {
        "w4_matmuls_ms": lin_ms,
        "w4_launches": len(lins),
        "lm_head_ms": head_ms,
        "step_graph_ms": step_ms,
        "attention_norms_rope_other_ms": step_ms - lin_ms - head_ms,
        "host_sampling_ms": token_ms - step_ms,
        "token_ms": token_ms,
    }


def rate_stats(rates: list[float]) -> dict:
    """Median tok/s of the timed runs with their spread (min, max, (max − min) / median)."""
    med = statistics.median(rates)
    return {
        "decode_tok_s": med,
        "decode_tok_s_min": min(rates),
        "decode_tok_s_max": max(rates),
        "decode_tok_s_spread_pct": 100 * (max(rates) - min(rates)) / med,
        "decode_tok_s_samples": rates,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu-mid", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--int8-head", action="store_true", help="also time our runtime with the int8 lm_head")
    ap.add_argument(
        "--no-fuse",
        action="store_true",
        help="also time our runtime with RuntimeOptions(fuse=False) (separate q/k/v and gate/up, plain "
        "torch ops; the CLI's --no-fuse): the before/after-fusion rows from one run",
    )
    ap.add_argument(
        "--dense",
        action="store_true",
        help="also time our decoder on the unquantized weights in the comparison dtype (same weights "
        "and dtype as transformers: our runtime's own overhead)",
    )
    ap.add_argument(
        "--hf-dtypes",
        default=None,
        help="comma list of transformers baselines (float32, bfloat16, float16); default: float32,bfloat16 "
        "on CPU (our W4 matmuls compute in bf16 there), float16 on the GPU path",
    )
    ap.add_argument(
        "--w4-values",
        default="rtn",
        choices=("rtn", "random"),
        help="rtn: our W4 weights are round-to-nearest of transformers' (outputs comparable); random: "
        "random nibbles (no quantization work; W4-vs-fp token agreement then means nothing)",
    )
    ap.add_argument(
        "--gpu-path",
        action="store_true",
        help="on CPU, the CUDA run's code path: Triton W4 + fused kernels under the Triton interpreter, "
        "fp16, the static decode step run eagerly, the breakdown (implied on CUDA; a check, not a speed)",
    )
    ap.add_argument("--peak-gbps", type=float, default=None, help="device peak memory bandwidth for % of roofline")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    gpu_path = device.type == "cuda" or a.gpu_path
    if gpu_path and device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton kernels are defined (first import, below)
    hf_dtypes = (a.hf_dtypes or ("float16" if gpu_path else "float32,bfloat16")).split(",")
    unknown = [d for d in hf_dtypes if d not in DTYPES]
    if unknown:
        ap.error(f"--hf-dtypes: unknown {unknown}; choose from {sorted(DTYPES)}")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_audio_edge.runtime.generate import GenerationStats, SamplingOptions, generate
    from qwen_audio_edge.runtime.quant_linear import Int8Linear, quantize_int8_rows

    cmp_dtype = torch.float16 if gpu_path else torch.float32
    dt_name = str(cmp_dtype).split(".")[-1]
    cfg = dict(
        PRESETS[a.preset],
        max_position_embeddings=max(4096, a.prompt + a.new + 8),
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(
        torch.float16 if gpu_path else torch.float32
    )  # the 7B reference built in fp16 on the device
    with torch.device(device):
        hf = Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()
    torch.set_default_dtype(default)
    env = environment(("numpy", "transformers", "triton"))
    results = {
        "preset": a.preset,
        "config": cfg,
        "device": str(device),
        "prompt_tokens": a.prompt,
        "new_tokens": a.new,
        "repeats": a.repeats,
        "threads": torch.get_num_threads(),
        "machine": env["machine"],
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "environment": env,
        "w4_weights": (
            "round-to-nearest of the transformers model's weights" if a.w4_values == "rtn" else "random GPTQ tensors"
        )
        + " (g128 sym, act-order-like g_idx)",
        "timing": "greedy decode after a prompt prefill, tok/s of the decode steps; median of --repeats "
        "after one untimed warm-up run (which also gives the tokens compared in `checks`)",
        "gpu_path": gpu_path,
        "complete": False,
        "runs": {},
        "checks": {},
        "ratios": {},
    }
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    elif gpu_path:
        results["note"] = "CPU, Triton interpreter: a check of the GPU run's code path, not a speed"

    checked: list = []  # our decoder, once built: its self-check verdicts say which kernel path each figure timed

    def save() -> None:  # after every timed run: a run cut off by a time limit keeps what finished, as valid JSON
        if checked:
            results["self_check"] = checked[0].selfcheck.report()
        runs = results["runs"]
        for ours in [k for k in runs if runs[k]["engine"] == "qwen-audio-edge"]:
            for ref in [k for k in runs if runs[k]["engine"] == "transformers"]:
                results["ratios"][f"{ours}/{ref}"] = runs[ours]["decode_tok_s"] / runs[ref]["decode_tok_s"]
        if f"ours_w4_{dt_name}_head_unfused" in runs:
            results["fusion_speedup"] = (
                runs[f"ours_w4_{dt_name}_head"]["decode_tok_s"]
                / runs[f"ours_w4_{dt_name}_head_unfused"]["decode_tok_s"]
            )
        if a.out:
            write_json(a.out, results)

    def check(name: str, label_a: str, label_b: str, what: str, required: bool) -> None:
        """Compare two runs' greedy tokens (recorded); stop before timing if they must agree and do not."""
        c = dict(
            compare_tokens(tokens[label_a], tokens[label_b]), a=label_a, b=label_b, compared=what, required=required
        )
        results["checks"][name] = c
        print("check", name, json.dumps(c), flush=True)
        save()
        if required and not c["equal"]:
            raise SystemExit(
                f"bench/decode.py: {label_a} and {label_b} should give the same greedy tokens but "
                f"differ from token {c['common_prefix']} on: {what}. Not timing a wrong path."
            )

    save()
    ids = torch.randint(0, cfg["vocab_size"], (1, a.prompt))
    tokens: dict[str, list[int]] = {}
    if device.type == "cuda":  # our runtime's own peak: what is allocated beyond the HF model, plus the
        torch.cuda.synchronize()  # embedding / norms / lm_head it shares with it
        hf_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    w4_kernel = "triton" if gpu_path else "auto"
    state = w4_state(hf, cfg, device, cmp_dtype, values=a.w4_values)
    ours = random_w4_decoder(hf, cfg, device, cmp_dtype, w4_kernel=w4_kernel, fused=gpu_path, state=state)
    kernels = ours.w4_kernels
    checked.append(ours)
    results["w4_kernels"], results["fused_kernels"] = kernels, bool(ours.fused_kernels)
    act_bytes = torch.finfo(cmp_dtype).bits // 8
    # what the W4 matmuls compute in: torch's CPU int4 op runs in bf16 whatever the activations (kernels/w4_cpu.py)
    w4_matmul_dtype = "bfloat16" if kernels == ["cpu"] else dt_name
    context = a.prompt + a.new // 2  # the mean context of the decode steps

    def time_ours(model, label, row_info: dict, head_bytes: float | None, static_step=False, expect=None) -> None:
        """Warm-up run (its greedy tokens recorded, and checked first if `expect` = (name, other label, what,
        required)), then --repeats timed runs."""
        from qwen_audio_edge.runtime.decode_graph import DecodeStep

        rates = []
        cache = model.setup_cache(a.prompt + a.new + 1)
        # the static step: CUDA graphs on CUDA (captured in the warm-up run), run eagerly on CPU
        step = DecodeStep(model, cache) if static_step else None
        for i in range(a.repeats + 1):  # the first run warms up
            stats = GenerationStats()
            opts = SamplingOptions(max_new_tokens=a.new, greedy=True, repetition_penalty=1.0, ignore_eos=True)
            with torch.inference_mode():
                emb = model.embed(ids.to(device))
                out = list(generate(model, cache, emb, 0, ids[0].tolist(), opts, [], stats, step=step))
            if i == 0:
                tokens[label] = out
                if expect is not None:
                    check(expect[0], expect[1], label, expect[2], expect[3])
            else:
                rates.append(stats.decode_tokens / stats.decode_s)
        bpt = (
            bytes_per_token(cfg, context, head_bytes, act_bytes)
            if head_bytes is not None
            else dense_bytes_per_token(cfg, context, act_bytes)
        )
        row = dict(
            row_info,
            engine="qwen-audio-edge",
            **rate_stats(rates),
            bytes_per_token=bpt,
            cuda_graphs=static_step and device.type == "cuda",
            static_step=static_step,
        )
        row["achieved_gb_s"] = bpt * row["decode_tok_s"] / 1e9
        if a.peak_gbps:
            row["pct_of_peak_bandwidth"] = 100 * row["achieved_gb_s"] / a.peak_gbps
            row["roofline_tok_s"] = a.peak_gbps * 1e9 / bpt
        if static_step:
            row["breakdown"] = breakdown(model, step, a.prompt + a.new - 1, 1e3 / row["decode_tok_s"], cmp_dtype)
            if a.peak_gbps:
                w4 = bytes_per_token(cfg, 0, 0, act_bytes)
                row["breakdown"]["w4_matmuls_pct_of_peak"] = (
                    100 * w4 / (row["breakdown"]["w4_matmuls_ms"] / 1e3) / 1e9 / a.peak_gbps
                )
        results["runs"][label] = row
        print(label, json.dumps({k: v for k, v in row.items() if k != "decode_tok_s_samples"}), flush=True)
        save()

    head_elems = cfg["vocab_size"] * cfg["hidden_size"]
    w4_info = dict(
        weights=f"W4 g128 act-order ({a.w4_values})",
        activation_dtype=dt_name,
        w4_matmul_dtype=w4_matmul_dtype,
        lm_head=dt_name,
        w4_kernels=kernels,
    )
    main_label = f"ours_w4_{dt_name}_head"
    # the static step (CUDA graphs on CUDA) is what the runtime does on CUDA; eager is timed beside it
    time_ours(ours, main_label, dict(w4_info, fused=True), head_elems * act_bytes, gpu_path)
    if gpu_path:
        time_ours(
            ours,
            f"{main_label}_eager",
            dict(w4_info, fused=True),
            head_elems * act_bytes,
            expect=("eager_vs_static_step", main_label, "the same decoder, static step vs eager forward", False),
        )
    if a.no_fuse:  # the same W4 tensors, RuntimeOptions(fuse=False): separate projections, plain torch ops
        unfused = random_w4_decoder(hf, cfg, device, cmp_dtype, w4_kernel=w4_kernel, fuse=False, state=state)
        # on CPU the fused projections are the same int4 op over concatenated columns: the same tokens, required;
        # on the GPU path the fused Triton norm/RoPE/SwiGLU round differently from torch's ops: recorded only
        time_ours(
            unfused,
            f"{main_label}_unfused",
            dict(w4_info, fused=False, w4_kernels=unfused.w4_kernels),
            head_elems * act_bytes,
            gpu_path,
            expect=(
                "fused_vs_unfused",
                main_label,
                "same W4 weights and kernels, q/k/v and gate/up fused or "
                "separate" + ("; fused Triton element-wise kernels vs torch ops" if gpu_path else ""),
                not gpu_path,
            ),
        )
        del unfused
    if a.int8_head:
        q, s = quantize_int8_rows(ours.lm_head.weight.float())
        ours.lm_head = Int8Linear(q, s, checks=getattr(ours, "selfcheck", None))
        if device.type == "cpu" and gpu_path:  # the CUDA path, the Triton GEMV (interpreted), not torch's CPU op
            ours.lm_head._cpu_op = False
        time_ours(
            ours,
            "ours_w4_int8_head",
            dict(w4_info, fused=True, lm_head="int8 per row" + ("" if gpu_path else " (torch's int8 op, bf16)")),
            head_elems * 1,
            gpu_path,
            expect=("int8_head_vs_fp_head", main_label, f"same W4 decoder, int8 vs {dt_name} lm_head", False),
        )
    if device.type == "cuda":
        shared = sum(
            t.numel() * t.element_size()
            for n_, t in hf.state_dict().items()
            if not n_.endswith(("proj.weight", "proj.bias"))
        )
        results["ours_peak_memory_gib"] = (torch.cuda.max_memory_allocated() - hf_bytes + shared) / 2**30
        results["ours_peak_memory_note"] = (
            "peak allocated during our runs beyond the HF fp16 model, plus the "
            "embedding/norms/lm_head tensors shared with it (fp16 and int8 heads both resident)"
        )
    del ours, state

    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        """Timestamps each of generate()'s steps as its logits arrive (after a device sync): the time from
        the first (the prefill's) to the last over N − 1 decode steps is the same interval our
        GenerationStats.decode_s covers (N − 1 forwards and the token picks between them)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            _sync(device)
            self.times.append(time.perf_counter())
            return scores

    def hf_run(ref) -> tuple[list[int], float]:
        """One greedy generate() of --new tokens: (its tokens, its decode tok/s)."""
        clock = StepClock()
        with torch.inference_mode():
            out = ref.generate(
                ids.to(device),
                max_new_tokens=a.new,
                min_new_tokens=a.new,
                do_sample=False,
                pad_token_id=0,
                logits_processor=LogitsProcessorList([clock]),
            )
        return out[0, a.prompt :].tolist(), (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])

    if a.dense:  # our decoder on transformers' own tensors: compared with transformers in the same dtype below
        tokens[f"transformers_{dt_name}"] = hf_run(hf)[0]
        dense = dense_decoder(hf, cfg, device, cmp_dtype, fused=gpu_path)
        # same weights, same dtype: the same greedy tokens are required on CPU (measured equal at every preset;
        # a near-tie in the random logits could in principle flip one: the error says where). On the GPU path
        # the fused fp16 kernels round differently from transformers' ops: recorded only.
        time_ours(
            dense,
            f"ours_dense_{dt_name}",
            dict(
                weights=f"dense {dt_name} (transformers' tensors)",
                activation_dtype=dt_name,
                w4_matmul_dtype=None,
                lm_head=dt_name,
                fused=True,
                w4_kernels=[],
            ),
            None,
            gpu_path,
            expect=(
                "ours_dense_vs_transformers",
                f"transformers_{dt_name}",
                f"same weights, both {dt_name}",
                not gpu_path,
            ),
        )
        del dense

    ref = hf
    for hf_dt in hf_dtypes:
        ref = ref.to(dtype=DTYPES[hf_dt])
        label = f"transformers_{hf_dt}"
        tokens[label] = hf_run(ref)[0]  # also the warm-up
        check(
            f"ours_w4_vs_{label}",
            main_label,
            label,
            f"W4 (RTN of these weights; matmuls in {w4_matmul_dtype}) vs transformers {hf_dt}"
            if a.w4_values == "rtn"
            else "unrelated weights (--w4-values random): meaningless",
            False,
        )
        if label != f"transformers_{hf_dtypes[0]}":
            check(
                f"{label}_vs_transformers_{hf_dtypes[0]}",
                f"transformers_{hf_dtypes[0]}",
                label,
                f"transformers, same weights, {hf_dtypes[0]} vs {hf_dt}",
                False,
            )
        rates = [hf_run(ref)[1] for _ in range(a.repeats)]
        nbytes = torch.finfo(DTYPES[hf_dt]).bits // 8
        row = dict(
            engine="transformers",
            weights=f"dense {hf_dt}",
            activation_dtype=hf_dt,
            w4_matmul_dtype=None,
            lm_head=hf_dt,
            fused=False,
            **rate_stats(rates),
            bytes_per_token=dense_bytes_per_token(cfg, context, nbytes),
            timing="generate(): first to last step's logits (a LogitsProcessor clock), per decode step",
        )
        row["achieved_gb_s"] = row["bytes_per_token"] * row["decode_tok_s"] / 1e9
        results["runs"][label] = row
        print(label, json.dumps({k: v for k, v in row.items() if k != "decode_tok_s_samples"}), flush=True)
        save()
    # the headline ratio (kept for older readers): vs the first baseline; the rest are in "ratios"
    results["speedup_vs_transformers"] = results["ratios"][f"{main_label}/transformers_{hf_dtypes[0]}"]
    results["baseline"] = f"transformers_{hf_dtypes[0]}"
    if device.type == "cuda":
        results["process_peak_memory_gib_ours_then_transformers"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    results["tokens"] = tokens  # the greedy tokens behind `checks`
    results["load_average_at_end"] = list(os.getloadavg())
    results["complete"] = True
    save()
    print(
        json.dumps({k: v for k, v in results.items() if k not in ("config", "tokens", "runs", "environment")}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
