"""llama.cpp beside ours in one bench run: the same weights, the same audio files, the same thread count.

What llama.cpp converts is the checkpoint of the weights we run: transformers' model on our dequantized W4
weights (hf_baseline.py), saved as a Hugging Face folder, so its F16 GGUF holds our weights (rounded to
fp16) and its Q4_0 / Q4_K_M are its own 4-bit formats of the same. Then:
- llama-bench pp128/pp512 (prefill) and tg32 (decode from an empty context) per quantization, against our
  decoder measured the same way (`text_bench`: random token ids, a prefill of N, then N decode steps);
- llama-mtmd-cli end to end on each audio file (a cold process each: load + encode + prefill + decode),
  its TTFT (encode + prompt eval, as llama_cpp_parse documents) beside ours (warm, from the audio file).
Agreement: the decoders are compared on a text-only turn (llama-mtmd-cli's chat mode, F16 GGUF, greedy)
against our answer to the same turn, as the common prefix of the two texts. With audio the texts cannot
match: llama.cpp's Qwen2-Audio path encodes whole 30 s windows and prefills all 750 audio positions of
each (2 s of audio: 750 audio tokens; we and transformers keep the 50 that cover it), which is also why
its encode and TTFT do not shrink with shorter audio. Neither comparison is a gate (transformers is).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from ..runtime.generate import GenerationStats, generate
from .llama_cpp import bench_decoder, convert_checkpoint, find_llama_cpp, run_end_to_end, run_text_only
from .llama_cpp_parse import common_prefix
from .ours import greedy

QUANTS = ("F16", "Q4_0", "Q4_K_M")
PP, TG = (128, 512), (32,)


def text_bench(pipeline, n_prompt: int, n_gen: int, repeats: int) -> dict:
    """Our decoder as llama-bench measures one: prefill of `n_prompt` random ids, and `n_gen` decode steps
    after a one-token prompt (EOS ignored). Tokens/s per repeat; the cache is the pipeline's own."""
    p = pipeline
    vocab = int(p.artifacts.text_config["vocab_size"])
    gen = torch.Generator().manual_seed(0)

    pp, tg = [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        ids = torch.randint(0, vocab, (1, n_prompt), generator=gen).to(p.device)
        stats = GenerationStats()
        with torch.inference_mode():
            list(generate(p.decoder, p.cache, p.decoder.embed(ids), 0, ids[0].tolist(), greedy(1), (), stats))
        pp.append(n_prompt / stats.prefill_s)
        stats = GenerationStats()
        with torch.inference_mode():
            list(
                generate(
                    p.decoder,
                    p.cache,
                    p.decoder.embed(ids[:, :1]),
                    0,
                    ids[0, :1].tolist(),
                    greedy(n_gen + 1),
                    (),
                    stats,
                )
            )
        tg.append(stats.decode_tokens / stats.decode_s)
    return {f"pp{n_prompt}": pp[1:], f"tg{n_gen}": tg[1:]}


def _dequantized_checkpoint(baseline, checkpoint: Path, out: Path) -> Path:
    """The baseline's fp32 model (our dequantized weights) as an HF folder, with the checkpoint's tokenizer,
    processor and template files beside it (what convert_hf_to_gguf.py reads)."""
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    baseline.model.float().save_pretrained(tmp)
    for f in checkpoint.iterdir():
        if (
            f.is_file()
            and not f.name.endswith(".safetensors")
            and f.name not in ("config.json", "model.safetensors.index.json")
        ) and not (tmp / f.name).exists():
            shutil.copy2(f, tmp / f.name)
    tmp.replace(out)
    return out


def run_llama_peer(cfg, checkpoint: Path, work: Path, wavs: dict, prompt: str, result: dict, ours, baseline) -> dict:
    tools = find_llama_cpp(cfg.llama_cpp)
    threads = cfg.threads or torch.get_num_threads()
    t = time.perf_counter()
    hf_dir = _dequantized_checkpoint(baseline, checkpoint, work / "hf-dequantized-w4")
    ggufs = convert_checkpoint(tools, hf_dir, work / "gguf", QUANTS, threads=threads)
    out: dict = {
        "version": tools.version,
        "threads": threads,
        "weights": "our dequantized W4 weights (transformers save_pretrained), converted by convert_hf_to_gguf.py",
        "convert_s": round(time.perf_counter() - t, 1),
        "gguf_bytes": ggufs.sizes,
        "rows": [],
        "end_to_end": [],
    }
    ours_text = text_bench(ours.p, PP[0], TG[0], cfg.repeats) | text_bench(ours.p, PP[1], TG[0], cfg.repeats)
    for test, samples in ours_text.items():
        out["rows"].append(
            {
                "engine": "ours (W4 g128)",
                "test": test,
                "tokens_per_s": sorted(samples)[len(samples) // 2],
                "samples": samples,
            }
        )
    for q in QUANTS:
        for r in bench_decoder(tools, ggufs.text[q], threads=threads, n_prompt=PP, n_gen=TG, repetitions=cfg.repeats):
            out["rows"].append({"engine": f"llama.cpp {q}", **r})
    n = max(cfg.new_tokens)
    mine = ours.p.run(None, prompt, sampling=greedy(16)).text
    theirs = run_text_only(tools, ggufs.text["F16"], ggufs.mmproj, prompt, n_predict=16, threads=threads)["text"]
    out["text_only_agreement"] = {
        "prompt": prompt,
        "ours": mine,
        "llama_cpp_f16": theirs,
        "common_prefix_chars": common_prefix(mine, theirs),
        "identical": mine == theirs,
    }
    for secs, wav in wavs.items():
        mine = ours.p.run(
            wav,
            prompt,
            sampling=greedy(n),
        ).text
        ttft = next(
            (
                s["median"]
                for s in result["stages"]
                if (s["engine"], s["stage"], s["audio_s"]) == ("ours", "ttft", secs)
            ),
            None,
        )
        for q in ("Q4_0", "F16"):
            r = run_end_to_end(tools, ggufs.text[q], ggufs.mmproj, wav, prompt, n_predict=n, threads=threads)
            r.update(engine=f"llama.cpp {q}", audio_s=secs, ours_ttft_ms=ttft, ours_text=mine)
            r["common_prefix_chars"] = common_prefix(mine, r.get("text", ""))
            out["end_to_end"].append(r)
    return out
