"""Offline time to first token, stage by stage: our W4 export vs transformers fp32 on the same checkpoint.

Builds a random Qwen2-Audio checkpoint (`--preset mid`: decoder hidden 1024 × 8 layers, intermediate 2816,
8 heads, vocab 8192; the tiny default audio encoder) and exports it W4 (GPTQ) and fp32, cached in `--work`
so that reruns skip the export. Then, in one process, interleaved, warm, median of `--repeats`:

  ttft      for speech-like audio of each `--lengths` second count: our `Pipeline.run` (one greedy token) on
            the W4 export and on the fp32 export, and transformers' offline pipeline (processor +
            `generate(max_new_tokens=1)`, fp32) — with our stages (mel, encoder, prefill, the rest) from the
            run's own timings. Before timing, the fp32 export's first greedy token must equal transformers'
            (else the script stops: a timing of a different computation means nothing).
  prefill   the decoders alone on the same prompt length (M = the utterance's prompt tokens, random
            embeddings, from position 0): ours W4 with the int4 op for every M (what runs without the
            dense prefill path), ours W4 as planned (kernels/w4_cpu_prefill.py), ours fp32, transformers fp32
            — tokens/s.
  profile   torch.profiler over one W4 run and one transformers run at the longest length: the top ops
            by self CPU time (where the time goes; the ONNX encoder shows as time outside torch ops).
  threads   child processes, each loading the W4 pipeline with `threads` = default (runtime/threads.py),
            1 and 2, on the machine as it is ("idle") and with a busy-loop process pinned to one core of
            this process's affinity ("loaded"): mel, encoder, prefill, TTFT at `--threads-seconds`.

Absolute figures move with other work on the machine (the JSON records the load average); the ratios,
measured side by side and interleaved, are what this script is for.

    python bench/ttft_profile.py --work /tmp/ttft_work --threads 2 --out bench/results/cpu/ttft_profile_mid.json
    python bench/ttft_profile.py --preset tiny --lengths 2 --repeats 1 --parts ttft,prefill --out /tmp/t.json  # check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import environment, write_json  # bench/kernel_bench.py
from qwen_audio_edge.benchmark.shapes import SHAPES

PRESETS = {name: SHAPES[name] for name in ("tiny", "mid")}  # the bench command's random shapes
PARTS = ("ttft", "prefill", "profile", "threads")
PROMPT = "What does the person say?"


def exports(work: Path, preset: str) -> tuple[Path, Path, Path]:
    """(checkpoint, W4 artifacts, fp32 artifacts), built once per `work` dir."""
    from qwen_audio_edge.export.package import ExportOptions, export_checkpoint
    from qwen_audio_edge.random_checkpoint import build_tiny_checkpoint

    ckpt, w4, fp32 = work / f"{preset}-ckpt", work / f"{preset}-w4", work / f"{preset}-fp32"
    if not (ckpt / "config.json").exists():
        build_tiny_checkpoint(ckpt, PRESETS[preset], max_shard_size="50MB")
    for out, bits in ((w4, 4), (fp32, 32)):
        if not (out / "manifest.json").exists():
            export_checkpoint(ckpt, out, ExportOptions(bits=bits, progress=False))
    return ckpt, w4, fp32


def one_token():
    from qwen_audio_edge.runtime.generate import SamplingOptions

    return SamplingOptions(max_new_tokens=1, greedy=True, repetition_penalty=1.0, ignore_eos=True)


def ours(p, x: np.ndarray) -> dict:
    """One offline run: its stage timings (ms) and first token."""
    r = p.run(x, PROMPT, sampling=one_token())
    t = r.timings
    rest = t["ttft_ms"] - t["mel_ms"] - t["encoder_ms"] - t["prefill_ms"]
    return {
        "ttft_ms": t["ttft_ms"],
        "mel_ms": t["mel_ms"],
        "encoder_ms": t["encoder_ms"],
        "prefill_ms": t["prefill_ms"],
        "other_ms": rest,  # the prompt's prefix prefill, the first token's sampling, bookkeeping
        "prefill_tokens": t["prefill_tokens"],
        "token": r.token_ids[0],
    }


class Transformers:
    """transformers' offline pipeline on the checkpoint, fp32: processor + generate(max_new_tokens=1)."""

    def __init__(self, ckpt: Path):
        from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

        self.model = Qwen2AudioForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32).eval()
        self.proc = AutoProcessor.from_pretrained(str(ckpt))
        self.text = self.proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "audio", "audio_url": "x"}, {"type": "text", "text": PROMPT}]}],
            add_generation_prompt=True,
            tokenize=False,
        )

    def run(self, x: np.ndarray) -> dict:
        from transformers import GenerationConfig

        t0 = time.perf_counter()
        inputs = self.proc(text=self.text, audio=[x], sampling_rate=16000, return_tensors="pt")
        t1 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(
                **inputs, generation_config=GenerationConfig(max_new_tokens=1, do_sample=False, pad_token_id=0)
            )
        t2 = time.perf_counter()
        return {
            "ttft_ms": 1000 * (t2 - t0),
            "processor_ms": 1000 * (t1 - t0),
            "generate_ms": 1000 * (t2 - t1),
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "token": int(out[0, -1]),
        }


def median_rows(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    row = {k: statistics.median(r[k] for r in runs) for k in keys}
    row["ttft_ms_samples"] = [round(r["ttft_ms"], 2) for r in runs]
    for k, v in runs[0].items():
        if not isinstance(v, float):
            row[k] = v
    return row


def ttft_section(p4, p32, hf: Transformers, lengths: list[float], repeats: int) -> list[dict]:
    from qwen_audio_edge.export.synthetic_audio import speech_like_signal

    rows = []
    for secs in lengths:
        x = speech_like_signal(secs, seed=0)
        ref, mine = hf.run(x), ours(p32, x)  # also the warm-up of this length
        if mine["token"] != ref["token"]:
            raise SystemExit(
                f"ttft_profile: at {secs} s our fp32 first token {mine['token']} != transformers' {ref['token']}: "
                "the two pipelines do not compute the same thing, so their timings are not comparable"
            )
        ours(p4, x)
        w4, f32, tr = [], [], []
        for _ in range(repeats):  # interleaved: a burst of other work slows one run of each, not one side
            w4.append(ours(p4, x))
            tr.append(hf.run(x))
            f32.append(ours(p32, x))
        row = {
            "seconds": secs,
            "first_token_equal_fp32": True,
            "ours_w4": median_rows(w4),
            "ours_fp32": median_rows(f32),
            "transformers_fp32": median_rows(tr),
        }
        row["w4_over_transformers"] = row["ours_w4"]["ttft_ms"] / row["transformers_fp32"]["ttft_ms"]
        row["fp32_over_transformers"] = row["ours_fp32"]["ttft_ms"] / row["transformers_fp32"]["ttft_ms"]
        row["w4_prefill_tok_s"] = row["ours_w4"]["prefill_tokens"] / (row["ours_w4"]["prefill_ms"] / 1000)
        print(
            json.dumps(
                {
                    "seconds": secs,
                    "w4_ttft_ms": round(row["ours_w4"]["ttft_ms"], 1),
                    "fp32_ttft_ms": round(row["ours_fp32"]["ttft_ms"], 1),
                    "transformers_ttft_ms": round(row["transformers_fp32"]["ttft_ms"], 1),
                    "w4_over_transformers": round(row["w4_over_transformers"], 3),
                }
            ),
            flush=True,
        )
        rows.append(row)
    return rows


def _time_ms(fn, repeats: int) -> dict:
    fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(1000 * (time.perf_counter() - t))
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "samples": samples}


def prefill_section(p4, p32, hf: Transformers, tokens: list[int], repeats: int) -> list[dict]:
    """The decoders alone: M random embeddings from position 0, last position's logits."""
    try:
        from qwen_audio_edge.kernels import w4_cpu_prefill as plans
    except ImportError:  # a tree from before the planned prefill path (a "before" measurement)
        plans = None

    hidden = p4.decoder.args.hidden_size
    lm = hf.model.model.language_model
    planned = plans.prefill_plan() if plans else None
    rows = []
    for m in tokens:
        emb = torch.randn(1, m, hidden, generator=torch.Generator().manual_seed(m)) * 0.02

        def run_ours(p, emb=emb):
            with torch.inference_mode():
                return p.decoder(emb.to(p.dtype), 0, p.cache)

        def run_hf(emb=emb):
            with torch.inference_mode():
                h = lm(inputs_embeds=emb, use_cache=True).last_hidden_state
                return hf.model.lm_head(h[:, -1:])

        def op_only():
            assert plans is not None
            plans.set_prefill_plan(plans.PrefillPlan(None, torch.bfloat16, "forced by bench/ttft_profile.py"))
            try:
                return run_ours(p4)
            finally:
                plans.set_prefill_plan(planned)

        cases = {"ours_w4": lambda: run_ours(p4), "ours_fp32": lambda: run_ours(p32), "transformers_fp32": run_hf}
        if plans is not None:
            cases["ours_w4_int4_op_only"] = op_only
        res: dict = {k: [] for k in cases}
        for fn in cases.values():
            fn()
        for _ in range(repeats):
            for k, fn in cases.items():
                t = time.perf_counter()
                fn()
                res[k].append(1000 * (time.perf_counter() - t))
        row: dict = {"tokens": m}
        for k, samples in res.items():
            ms = statistics.median(samples)
            row[k] = {"median_ms": ms, "tok_s": m / (ms / 1000), "samples": [round(s, 2) for s in samples]}
        row["w4_over_transformers"] = row["ours_w4"]["median_ms"] / row["transformers_fp32"]["median_ms"]
        print(json.dumps({"tokens": m, **{k: round(v["tok_s"], 1) for k, v in row.items() if isinstance(v, dict)}}))
        rows.append(row)
    return rows


def profile_section(p4, hf: Transformers, secs: float, top: int = 15) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from qwen_audio_edge.export.synthetic_audio import speech_like_signal

    x = speech_like_signal(secs, seed=0)
    out = {"seconds": secs}
    for name, fn in (("ours_w4", lambda: ours(p4, x)), ("transformers_fp32", lambda: hf.run(x))):
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            fn()
            wall = 1000 * (time.perf_counter() - t)
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in ops) / 1000
        out[name] = {
            "wall_ms": wall,
            "torch_ops_self_ms": total,
            "top_ops": [
                {"op": e.key, "self_ms": round(e.self_cpu_time_total / 1000, 2), "calls": e.count} for e in ops[:top]
            ],
        }
    return out


def busy_loop(core: int) -> subprocess.Popen:
    """A process spinning on one core (another program keeping a core busy)."""
    code = f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def threads_child(art: Path, threads: int | None, secs: float, repeats: int) -> dict:
    """In a fresh process (torch's and ORT's pools are per process): load, warm, time `repeats` runs."""
    from qwen_audio_edge.export.synthetic_audio import speech_like_signal
    from qwen_audio_edge.runtime.pipeline import Pipeline

    p = Pipeline.from_artifacts(art, threads=threads, verify_hashes=False)
    x = speech_like_signal(secs, seed=0)
    ours(p, x)
    runs = [ours(p, x) for _ in range(repeats)]
    row = median_rows(runs)
    budget = getattr(p, "threads", None)
    row["budget"] = budget.to_json() if hasattr(budget, "to_json") else None
    row["torch_threads"] = torch.get_num_threads()
    row["load_average"] = list(os.getloadavg())
    return row


def threads_section(art: Path, secs: float, repeats: int) -> list[dict]:
    rows = []
    cores = sorted(os.sched_getaffinity(0))
    for machine in ("idle", "loaded"):
        hog = busy_loop(cores[-1]) if machine == "loaded" else None
        try:
            if hog is not None:
                time.sleep(2.0)  # let it start spinning
            for threads in (None, 1, 2):
                cmd = [sys.executable, __file__, "--child", str(art), str(threads or 0), str(secs), str(repeats)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row.update(machine=machine, threads_option="default" if threads is None else threads)
                print(json.dumps({k: row[k] for k in ("machine", "threads_option", "ttft_ms", "mel_ms", "encoder_ms")}))
                rows.append(row)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        art, threads, secs, repeats = sys.argv[2:6]
        print(json.dumps(threads_child(Path(art), int(threads) or None, float(secs), int(repeats))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mid", choices=sorted(PRESETS))
    ap.add_argument("--work", default="/tmp/ttft_profile_work", help="checkpoint + exports, reused across runs")
    ap.add_argument("--lengths", default="2,5,10,30", help="audio lengths (s)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="threads of both sides in ttft/prefill/profile")
    ap.add_argument("--threads-seconds", type=float, default=5.0, help="audio length of the threads section")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--out", default="bench/results/cpu/ttft_profile_mid.json")
    a = ap.parse_args()
    parts = a.parts.split(",")
    if unknown := [x for x in parts if x not in PARTS]:
        ap.error(f"--parts: unknown {unknown}; choose from {PARTS}")
    torch.set_num_threads(a.threads)
    lengths = [float(s) for s in a.lengths.split(",")]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, w4, fp32 = exports(work, a.preset)
    res: dict = {
        "preset": a.preset,
        "shape": dataclasses.asdict(PRESETS[a.preset]),
        "threads": a.threads,
        "repeats": a.repeats,
        "prompt": PROMPT,
        "audio": "qwen_audio_edge.export.synthetic_audio.speech_like_signal(seconds, seed=0)",
        "environment": environment(("numpy", "transformers", "onnxruntime")),
        "parts": parts,
        "complete": False,
    }
    out = Path(a.out)
    from qwen_audio_edge.runtime.pipeline import Pipeline

    p4 = Pipeline.from_artifacts(w4, threads=a.threads, verify_hashes=False)
    p32 = Pipeline.from_artifacts(fp32, threads=a.threads, verify_hashes=False)
    res["paths_w4"] = p4.active_paths()
    hf = Transformers(ckpt) if {"ttft", "prefill", "profile"} & set(parts) else None
    if "ttft" in parts and hf is not None:
        res["ttft_rows"] = ttft_section(p4, p32, hf, lengths, a.repeats)
        write_json(out, res)
    if "prefill" in parts and hf is not None:
        from qwen_audio_edge.runtime.audio import num_audio_tokens

        extra = len(p4.prompt.encode(p4.prompt.render([{"role": "user", "content": PROMPT}])))
        tokens = [num_audio_tokens(p4.mel.valid_frames(int(s * 16000))) + extra for s in lengths]
        res["prefill_rows"] = prefill_section(p4, p32, hf, tokens, a.repeats)
        write_json(out, res)
    if "profile" in parts and hf is not None:
        res["profile"] = profile_section(p4, hf, max(lengths))
        write_json(out, res)
    if "threads" in parts:
        del p4, p32, hf
        res["threads_rows"] = threads_section(w4, a.threads_seconds, a.repeats)
    res["complete"] = True
    write_json(out, res)


if __name__ == "__main__":
    main()
