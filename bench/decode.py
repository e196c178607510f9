"""Whole-model decode benchmark: our W4 decoder vs transformers `generate()` in the same run.

Builds a random Qwen2 decoder at a given shape directly on the device (the kernels' speed does not
depend on the values): transformers' Qwen2ForCausalLM in the comparison dtype, and our decoder sharing
its embedding/norm/lm_head with random GPTQ tensors (g128, an act-order-like g_idx permutation). Times
batch-1 greedy decode after a prompt for both. Reports tokens/s
(median of --repeats), bytes read per token, achieved GB/s and peak memory.

`--gpu-path` on CPU takes the CUDA run's code path at whatever preset: Triton W4 and fused kernels under
the Triton interpreter (TRITON_INTERPRET=1, set here), fp16 activations, the static decode step (eager:
CUDA graphs need a GPU) and the step breakdown timed eagerly — with `--preset tiny`, a check of this
script in seconds (`bench/gpu_check.sh --dry-run`), not a speed. `--out` is rewritten (atomically) after
every timed run, so a run cut off by a time limit leaves valid JSON with what finished.

    python bench/decode.py --preset cpu-mid            # CPU: W4 (fp32 acts) vs transformers fp32
    python bench/decode.py --preset 7b --device cuda   # GPU: W4 vs transformers fp16 (see gpu_check.sh)
    python bench/decode.py --preset tiny --gpu-path --prompt 12 --new 3 --repeats 1 --int8-head   # the dry run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
from kernel_bench import cpu_seconds, graph_seconds, replay_seconds, write_json  # bench/kernel_bench.py

PRESETS = {
    "cpu-mid": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=8, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=156032),
    # the 7B's kinds of layer (MHA, head_dim 64 so the fused RoPE runs, K multiples of the group 128) at a
    # size the Triton interpreter decodes in well under a second per token: the dry run
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=1024),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_w4_decoder(hf_model, cfg: dict, device: torch.device, dtype: torch.dtype, group_size: int = 128, *,
                      w4_kernel: str = "auto", fused: bool | None = None):
    """Our decoder with random GPTQ tensors (act-order-like g_idx) built directly on `device`, sharing the
    embedding/norm/lm_head of `hf_model`: the kernels' speed does not depend on the values. `w4_kernel` as
    `--w4-kernel` (triton on CPU needs TRITON_INTERPRET=1); `fused`: the fused element-wise kernels (None:
    on CUDA, as load_decoder does)."""
    from qwen_audio_edge.runtime.decoder import ModelArgs, Qwen2Decoder
    from qwen_audio_edge.runtime.quant_linear import QuantLinear, swap_in_quant_linears

    args = ModelArgs.from_config(cfg)
    with torch.device("meta"):
        model = Qwen2Decoder(args)
        swap_in_quant_linears(model, {"quant_method": "gptq", "bits": 4, "group_size": group_size})
    gen = torch.Generator(device=device).manual_seed(0)
    sd = {}
    hf_sd = hf_model.state_dict()
    perms = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            k, n = m.in_features, m.out_features
            sd[f"{name}.qweight"] = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device=device, generator=gen)
            sd[f"{name}.qzeros"] = torch.full((k // group_size, n // 8), 0x77777777, dtype=torch.int32, device=device)
            sd[f"{name}.scales"] = (torch.rand(k // group_size, n, device=device, generator=gen) * 0.01).half()
            # GPTQ's act-order permutation comes from the input's Hessian, so q/k/v share one and gate/up
            # share one (which lets the runtime fuse them); o and down have inputs of their own.
            layer_name, _, proj = name.rpartition(".")
            key = name if proj in ("o_proj", "down_proj") else layer_name
            if key not in perms:
                perms[key] = torch.randperm(k, device=device, generator=gen)
            perm = perms[key]
            sd[f"{name}.g_idx"] = (torch.arange(k, device=device) // group_size).int()[perm]
            if m.bias is not None:
                sd[f"{name}.bias"] = torch.zeros(n, dtype=torch.float16, device=device)
    for key, t in hf_sd.items():
        if key not in sd and not key.endswith(("proj.weight", "proj.bias")):
            sd[key] = t.to(device=device, dtype=dtype)
    model.load_state_dict(sd, assign=True, strict=True)
    from qwen_audio_edge.runtime.decoder import enable_fused_kernels, fuse_projections

    model.fused_projections = fuse_projections(model)  # as load_decoder does
    model.fused_kernels = (device.type == "cuda" if fused is None else fused) and enable_fused_kernels(model)
    from qwen_audio_edge.runtime.selfcheck import SelfCheck

    model.selfcheck = SelfCheck()  # one verdict per shape class for all layers, as load_decoder does
    model.w4_kernels = sorted({m.prepare(w4_kernel, checks=model.selfcheck) for m in model.modules()
                               if isinstance(m, QuantLinear)})
    return model.eval()


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
    run_lins, run_head = (lambda: [m(x) for m, x in zip(lins, xs)]), (lambda: model.lm_head(h))
    if dev.type == "cuda":
        lin_ms, head_ms = 1e3 * graph_seconds([run_lins]), 1e3 * graph_seconds([run_head])
        captured = step.captured(pos)
        step_ms = 1e3 * replay_seconds(captured) if captured is not None else math.nan
    else:
        lin_ms, head_ms = 1e3 * cpu_seconds([run_lins], 1), 1e3 * cpu_seconds([run_head], 1)
        step_ms = 1e3 * cpu_seconds([lambda: step(0, pos)], 1)  # rewrites the K/V at pos: past the timed tokens
    return {"w4_matmuls_ms": lin_ms, "w4_launches": len(lins), "lm_head_ms": head_ms, "step_graph_ms": step_ms,
            "attention_norms_rope_other_ms": step_ms - lin_ms - head_ms, "host_sampling_ms": token_ms - step_ms,
            "token_ms": token_ms}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu-mid", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--int8-head", action="store_true", help="also time our runtime with the int8 lm_head")
    ap.add_argument("--gpu-path", action="store_true",
                    help="on CPU, the CUDA run's code path: Triton W4 + fused kernels under the Triton interpreter, "
                         "fp16, the static decode step run eagerly, the breakdown (implied on CUDA; a check, not a speed)")
    ap.add_argument("--peak-gbps", type=float, default=None, help="device peak memory bandwidth for % of roofline")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    gpu_path = device.type == "cuda" or a.gpu_path
    if gpu_path and device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton kernels are defined (first import, below)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_audio_edge.runtime.generate import GenerationStats, SamplingOptions, generate
    from qwen_audio_edge.runtime.quant_linear import Int8Linear, quantize_int8_rows

    cmp_dtype = torch.float16 if gpu_path else torch.float32
    cfg = dict(PRESETS[a.preset], max_position_embeddings=max(4096, a.prompt + a.new + 8), rope_theta=10000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # build the 7B reference directly in fp16 on the device
    with torch.device(device):
        hf = Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()
    torch.set_default_dtype(default)
    results = {"preset": a.preset, "config": cfg, "device": str(device), "prompt_tokens": a.prompt, "new_tokens": a.new,
               "threads": torch.get_num_threads(), "machine": platform.platform(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "w4_weights": "random GPTQ tensors (g128, act-order-like g_idx)",
               "gpu_path": gpu_path, "complete": False, "runs": {}}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    elif gpu_path:
        results["note"] = "CPU, Triton interpreter: a check of the GPU run's code path, not a speed"

    checked: list = []  # our decoder, once built: its self-check verdicts say which kernel path each figure timed

    def save() -> None:  # after every timed run: a run cut off by a time limit keeps what finished, as valid JSON
        if checked:
            results["self_check"] = checked[0].selfcheck.report()
        if a.out:
            write_json(a.out, results)

    save()
    ids = torch.randint(0, cfg["vocab_size"], (1, a.prompt))
    if device.type == "cuda":  # our runtime's own peak: what is allocated beyond the HF model, plus the
        torch.cuda.synchronize()  # embedding / norms / lm_head it shares with it
        hf_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    ours = random_w4_decoder(hf, cfg, device, cmp_dtype, w4_kernel="triton" if gpu_path else "auto", fused=gpu_path)
    kernels = ours.w4_kernels
    checked.append(ours)
    results["w4_kernels"], results["fused_kernels"] = kernels, bool(ours.fused_kernels)
    act_bytes = torch.finfo(cmp_dtype).bits // 8

    def time_ours(model, label, head_bytes, static_step=False):
        from qwen_audio_edge.runtime.decode_graph import DecodeStep

        rates = []
        cache = model.setup_cache(a.prompt + a.new + 1)
        # the static step: CUDA graphs on CUDA (captured in the warm-up run), run eagerly on CPU
        step = DecodeStep(model, cache) if static_step else None
        for _ in range(a.repeats + 1):  # the first run warms up
            stats = GenerationStats()
            opts = SamplingOptions(max_new_tokens=a.new, greedy=True, repetition_penalty=1.0, ignore_eos=True)
            with torch.inference_mode():
                emb = model.embed(ids.to(device))
                list(generate(model, cache, emb, 0, ids[0].tolist(), opts, [], stats, step=step))
            rates.append(stats.decode_tokens / stats.decode_s)
        rate = statistics.median(rates[1:])
        bpt = bytes_per_token(cfg, a.prompt + a.new // 2, head_bytes, act_bytes)
        row = {"decode_tok_s": rate, "bytes_per_token": bpt, "achieved_gb_s": bpt * rate / 1e9, "w4_kernels": kernels,
               "cuda_graphs": static_step and device.type == "cuda", "static_step": static_step}
        if a.peak_gbps:
            row["pct_of_peak_bandwidth"] = 100 * row["achieved_gb_s"] / a.peak_gbps
            row["roofline_tok_s"] = a.peak_gbps * 1e9 / bpt
        if static_step:
            row["breakdown"] = breakdown(model, step, a.prompt + a.new - 1, 1e3 / rate, cmp_dtype)
            if a.peak_gbps:
                w4 = bytes_per_token(cfg, 0, 0, act_bytes)
                row["breakdown"]["w4_matmuls_pct_of_peak"] = 100 * w4 / (row["breakdown"]["w4_matmuls_ms"] / 1e3) / 1e9 / a.peak_gbps
        results["runs"][label] = row
        print(label, json.dumps(row), flush=True)
        save()

    head_elems = cfg["vocab_size"] * cfg["hidden_size"]
    dt_name = str(cmp_dtype).split(".")[-1]
    # the static step (CUDA graphs on CUDA) is what the runtime does on CUDA; eager is timed beside it
    time_ours(ours, f"ours_w4_{dt_name}_head", head_elems * act_bytes, gpu_path)
    if gpu_path:
        time_ours(ours, f"ours_w4_{dt_name}_head_eager", head_elems * act_bytes)
    if a.int8_head:
        q, s = quantize_int8_rows(ours.lm_head.weight.float())
        ours.lm_head = Int8Linear(q, s, checks=getattr(ours, "selfcheck", None))
        if device.type == "cpu" and gpu_path:  # the CUDA path, the Triton GEMV (interpreted), not torch's CPU op
            ours.lm_head._cpu_op = False
        time_ours(ours, "ours_w4_int8_head", head_elems * 1, gpu_path)
    if device.type == "cuda":
        shared = sum(t.numel() * t.element_size() for n_, t in hf.state_dict().items() if not n_.endswith(("proj.weight", "proj.bias")))
        results["ours_peak_memory_gib"] = (torch.cuda.max_memory_allocated() - hf_bytes + shared) / 2**30
        results["ours_peak_memory_note"] = ("peak allocated during our runs beyond the HF fp16 model, plus the "
                                            "embedding/norms/lm_head tensors shared with it (fp16 and int8 heads both resident)")
    del ours

    ref = hf.to(dtype=cmp_dtype)
    rates = []
    with torch.inference_mode():
        for _ in range(a.repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            ref.generate(ids.to(device), max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
            _sync(device)
            t1 = time.perf_counter()
            ref.generate(ids.to(device), max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, pad_token_id=0)
            _sync(device)
            t2 = time.perf_counter()
            rates.append((a.new - 1) / ((t2 - t1) - (t1 - t0)))
    rate = statistics.median(rates[1:])
    dense = sum(p.numel() for p in ref.parameters()) - ref.model.embed_tokens.weight.numel()
    results["runs"][f"transformers_{dt_name}"] = {"decode_tok_s": rate, "bytes_per_token": dense * act_bytes}
    print("transformers", rate, flush=True)
    results["speedup_vs_transformers"] = results["runs"][f"ours_w4_{dt_name}_head"]["decode_tok_s"] / rate
    if device.type == "cuda":
        results["process_peak_memory_gib_ours_then_transformers"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    results["complete"] = True
    save()
    print(json.dumps({k: v for k, v in results.items() if k != "config"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
