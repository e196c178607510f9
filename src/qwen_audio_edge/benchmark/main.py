"""`qwen-audio-edge bench`: build or load the model, check agreement, measure, report.

The JSON is rewritten (atomically) after every audio length, with "complete": false until the end, so a
run cut off by a time limit still leaves valid results for what finished.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from ..runtime.errors import OptionsError
from .options import BenchConfig
from .report import SCHEMA_ID, plot, print_tables, validate

PROMPT = "What does the person say?"


def run_bench(a: argparse.Namespace) -> int:
    cfg = BenchConfig.from_args(a)
    with ExitStack() as stack:
        work = cfg.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qae-bench-")))
        work.mkdir(parents=True, exist_ok=True)
        result = Bench(cfg, work).run()
    print_tables(result)
    if cfg.json:
        print(f"wrote {cfg.json}", file=sys.stderr)
    if cfg.plot:
        plot(result, cfg.plot)
        print(f"wrote {cfg.plot}", file=sys.stderr)
    return 0


class Bench:
    """One run: the state shared by its steps (config, work dir, the result being filled in)."""

    def __init__(self, cfg: BenchConfig, work: Path):
        from .system import device_info, git_commit, versions

        self.cfg, self.work = cfg, work
        self.t0 = time.perf_counter()
        self.result: dict = {
            "schema": SCHEMA_ID,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(["qwen-audio-edge", *sys.argv[1:]]) if sys.argv else "",
            "git_commit": git_commit(),
            "versions": versions(),
            "device": device_info(cfg.device),
            "config": {
                "seconds": list(cfg.seconds),
                "new_tokens": list(cfg.new_tokens),
                "repeats": cfg.repeats,
                "baselines": list(cfg.baselines),
                "threads": cfg.threads,
                "check_tokens": cfg.check_tokens,
                "prompt": PROMPT,
            },
            "model": {},
            "agreement": [],
            "stages": [],
            "memory": {},
            "roofline": None,
            "cold_start": [],
            "llama_cpp": None,
            "memory_plan": None,
            "notes": [],
            "complete": False,
        }

    def tick(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def save(self) -> None:
        if self.cfg.json:
            # a writer that breaks the schema fails here, not in a reader; skipped without jsonschema (the
            # [dev] extra), e.g. on a bare GPU machine
            with contextlib.suppress(ImportError):
                validate(self.result)
            tmp = self.cfg.json.with_name(self.cfg.json.name + ".tmp")
            tmp.write_text(json.dumps(self.result, indent=1) + "\n")
            os.replace(tmp, self.cfg.json)

    def run(self) -> dict:
        import torch

        from ..runtime.pipeline import Pipeline, RuntimeOptions
        from .hf_baseline import HfBaseline
        from .measure import Measurement, write_wav
        from .ours import OurEngine

        cfg = self.cfg
        if cfg.shape == "7b":
            return self._memory_only()
        checkpoint, artifacts = self._model()
        options = RuntimeOptions(device=cfg.device, threads=cfg.threads)
        self.tick(f"loading {artifacts}")
        ours = OurEngine(Pipeline.from_artifacts(artifacts, options), PROMPT)
        self.result["config"]["threads"] = torch.get_num_threads()
        self._describe(ours, checkpoint, artifacts)
        baselines = {}
        for name in cfg.baselines:
            self.tick(f"loading the {name} baseline on the same weights")
            baselines[name] = HfBaseline.load(artifacts, name.split("-")[1], cfg.device)
        from ..export.synthetic_audio import speech_like_signal

        wavs = {}
        for secs in cfg.seconds:
            wavs[secs] = self.work / f"speech_{secs:g}s.wav"
            write_wav(wavs[secs], speech_like_signal(secs, seed=int(secs * 10)))
        gate = baselines.get("transformers-fp32")
        if baselines and gate is None:  # e.g. CUDA's fp16 baseline: the fp32 gate runs on the CPU
            self.tick("loading transformers fp32 on the CPU for the agreement check")
            gate = HfBaseline.load(artifacts, "fp32", "cpu")
        reference = self._reference(artifacts, options) if gate is not None else None
        m = Measurement(ours, baselines, cfg.repeats, cfg.check_tokens, self.tick, reference, gate)
        for secs in cfg.seconds:
            m.length(wavs[secs], secs, cfg.new_tokens)
            self._collect(m)
            self.save()
        self._roofline(ours, baselines, m)
        self._cold_start(checkpoint, artifacts, wavs[cfg.seconds[0]])
        if cfg.llama_cpp:
            self._llama_cpp(checkpoint, wavs, ours, baselines)
        self.result["complete"] = True
        self.result["wall_s"] = round(time.perf_counter() - self.t0, 1)  # the whole run, model build included
        self.save()
        return self.result

    # --- steps ----------------------------------------------------------------------------------
    def _reference(self, artifacts: Path, options):
        """Our pipeline on the kernels' fp32 reference twins (W4 dequantize-matmul, the int8 head's chunked
        dequantize): what the fp32 baseline must match token for token (measure.Measurement._agree)."""
        import dataclasses

        from ..runtime.pipeline import Pipeline
        from ..runtime.quant_linear import Int8Linear
        from .ours import OurEngine

        self.tick("loading our pipeline on its fp32 reference kernels (the agreement check's)")
        p = Pipeline.from_artifacts(
            artifacts, dataclasses.replace(options, w4_kernel="ref", dtype="fp32", device="cpu", cuda_graphs=False)
        )
        if isinstance(p.decoder.lm_head, Int8Linear):
            p.decoder.lm_head.use_reference = True
        return OurEngine(p, PROMPT, encoders=False)

    def _model(self) -> tuple[Path | None, Path]:
        cfg = self.cfg
        if cfg.model is not None:
            return None, cfg.model
        from .shapes import build_shape

        assert cfg.shape is not None
        self.tick(f"building the random {cfg.shape} model in {self.work} (cached for --work reruns)")
        return build_shape(cfg.shape, self.work)

    def _describe(self, ours, checkpoint: Path | None, artifacts: Path) -> None:
        from .shapes import shape_dict

        m = ours.p.artifacts.manifest
        size = sum(f.stat().st_size for f in artifacts.rglob("*") if f.is_file())
        self.result["model"] = {
            "source": f"random {self.cfg.shape} shape" if self.cfg.shape else f"artifacts {artifacts}",
            "shape": shape_dict(self.cfg.shape) if self.cfg.shape else None,
            "artifacts_bytes": size,
            "decoder": {
                **m.get("decoder", {}),
                "text_config": {
                    k: m["config"]["text"].get(k)
                    for k in (
                        "hidden_size",
                        "intermediate_size",
                        "num_hidden_layers",
                        "num_attention_heads",
                        "num_key_value_heads",
                        "vocab_size",
                    )
                },
            },
            "paths": ours.p.active_paths(),
            "weights_note": "random weights; W4 = our GPTQ export; every baseline runs the dequantized W4 weights",
        }

    def _collect(self, m) -> None:
        self.result["stages"] = [s.to_json() for s in m.results.samples]
        self.result["agreement"] = m.results.agreements
        self.result["memory"]["stages"] = m.results.memory

    def _roofline(self, ours, baselines: dict, m) -> None:
        from .roofline import roofline

        self.tick("roofline: measuring memory bandwidth")
        self.result["roofline"] = roofline(ours, baselines, m.results, self.cfg)
        self.result["memory"]["kv_bytes_per_token"] = self.result["roofline"]["kv_bytes_per_token"]
        self.save()

    def _cold_start(self, checkpoint: Path | None, artifacts: Path, wav: Path) -> None:
        from .cold_start import measure_cold_start

        if self.cfg.device != "cpu":
            self.result["notes"].append("cold start is measured on CPU runs only")
            return
        self.tick("cold start: a fresh process to ready and first token")
        rows = [measure_cold_start("ours", artifacts, wav, self.cfg.threads)]
        if checkpoint is not None and self.cfg.baselines:
            rows.append(measure_cold_start("transformers", checkpoint, wav, self.cfg.threads))
        else:
            self.result["notes"].append("transformers' cold start needs the HF checkpoint (--shape runs have it)")
        self.result["cold_start"] = rows
        self.save()

    def _llama_cpp(self, checkpoint: Path | None, wavs: dict, ours, baselines: dict) -> None:
        from .hf_baseline import HfBaseline
        from .llama_peer import run_llama_peer

        if checkpoint is None:
            raise OptionsError("--llama-cpp converts a Hugging Face checkpoint's files: use it with --shape")
        self.tick("llama.cpp: converting our weights and timing llama-bench and llama-mtmd-cli")
        base = baselines.get("transformers-fp32") or HfBaseline.load(ours.p.artifacts.root, "fp32")
        self.result["llama_cpp"] = run_llama_peer(
            self.cfg, checkpoint, self.work, wavs, PROMPT, self.result, ours, base
        )
        self.save()

    def _memory_only(self) -> dict:
        from .memory_report import memory_report_7b

        self.tick("7b shape: the memory plan (no 7B checkpoint is built: its export alone outlasts a bench run)")
        self.result["model"] = {"source": "random 7b shape (not built)", "artifacts_bytes": 0, "decoder": {}}
        self.result["memory_plan"] = memory_report_7b()
        self.result["notes"].append(
            "the 7b shape reports the memory plan; its decoder is timed by bench/decode.py --preset 7b "
            "(bench/gpu_check.sh runs both on a GPU)"
        )
        self.result["complete"] = True
        self.save()
        return self.result
