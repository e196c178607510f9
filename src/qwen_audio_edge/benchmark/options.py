"""`qwen-audio-edge bench` options: the argparse flags and the frozen `BenchConfig` they become.

Validated before anything is built or loaded, so that a typo costs milliseconds, not a model load.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ..runtime.errors import OptionsError

SHAPES = ("tiny", "mid", "7b")
BASELINES = ("transformers-fp32", "transformers-bf16", "transformers-fp16")
DEFAULT_SECONDS = (2.0, 5.0, 10.0, 30.0)
DEFAULT_NEW_TOKENS = (32, 256)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from e
    if not values or any(not 0 < v <= 600 for v in values):
        raise argparse.ArgumentTypeError(f"audio lengths must be in (0, 600] seconds, got {text!r}")
    return values


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from e
    if not values or any(not 1 <= v <= 8192 for v in values):
        raise argparse.ArgumentTypeError(f"token counts must be in [1, 8192], got {text!r}")
    return values


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="an artifacts dir (a real export)")
    src.add_argument(
        "--shape",
        choices=SHAPES,
        help="random weights at this config, built in a temporary dir: tiny (seconds), mid (decoder 1024×8), "
        "7b (Qwen2-Audio-7B's real config, W4 by round-to-nearest; on CPU: memory report + 2 real-shape layers)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the runtime's default)")
    p.add_argument("--seconds", type=_floats, default=DEFAULT_SECONDS, help="audio lengths, comma list (2,5,10,30)")
    p.add_argument("--new-tokens", type=_ints, default=DEFAULT_NEW_TOKENS, help="answer lengths timed (32,256)")
    p.add_argument("--repeats", type=int, default=5, help="warm runs per measurement (median and p90)")
    p.add_argument(
        "--baselines",
        default=None,
        help="comma list of " + ", ".join(BASELINES) + ", or none (default: fp32+bf16 on CPU, fp16 on CUDA)",
    )
    p.add_argument(
        "--llama-cpp",
        type=Path,
        default=None,
        metavar="DIR",
        help="a llama.cpp build (bench/build_llama_cpp.sh): also time llama-bench and llama-mtmd-cli",
    )
    p.add_argument("--check-tokens", type=int, default=16, help="greedy tokens compared before timing")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the results (schema: docs/bench.md)")
    p.add_argument("--plot", type=Path, default=None, metavar="OUT.png", help="stage breakdown + latency vs length")
    p.add_argument("--work", type=Path, default=None, help="keep the built checkpoints/exports here (reused)")
    p.add_argument("--quick", action="store_true", help="fewer lengths and repeats: a smoke run")


@dataclass(frozen=True)
class BenchConfig:
    """What one `bench` run measures (see add_bench_arguments for each field's meaning)."""

    model: Path | None
    shape: str | None
    device: str
    threads: int | None
    seconds: tuple[float, ...]
    new_tokens: tuple[int, ...]
    repeats: int
    baselines: tuple[str, ...]
    llama_cpp: Path | None
    check_tokens: int
    json: Path | None
    plot: Path | None
    work: Path | None

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> BenchConfig:
        cuda = a.device.startswith("cuda")
        if a.baselines is None:
            baselines: tuple[str, ...] = ("transformers-fp16",) if cuda else ("transformers-fp32", "transformers-bf16")
        elif a.baselines.strip() == "none":
            baselines = ()
        else:
            baselines = tuple(b.strip() for b in a.baselines.split(",") if b.strip())
            if unknown := [b for b in baselines if b not in BASELINES]:
                raise OptionsError(f"--baselines: unknown {unknown}; choose from {', '.join(BASELINES)} or none")
        if a.repeats < 1:
            raise OptionsError(f"--repeats must be ≥ 1, got {a.repeats}")
        if a.threads is not None and a.threads < 1:
            raise OptionsError(f"--threads must be ≥ 1, got {a.threads}")
        if a.check_tokens < 1:
            raise OptionsError(f"--check-tokens must be ≥ 1, got {a.check_tokens}")
        if a.model is not None and not (a.model / "manifest.json").is_file():
            raise OptionsError(f"--model {a.model}: no manifest.json there; pass an artifacts dir made by `export`")
        if a.llama_cpp is not None and not a.llama_cpp.is_dir():
            raise OptionsError(f"--llama-cpp {a.llama_cpp}: not a directory; build one with bench/build_llama_cpp.sh")
        for path, flag in ((a.json, "--json"), (a.plot, "--plot")):
            if path is not None and not path.parent.exists():
                raise OptionsError(f"{flag} {path}: the folder {path.parent} does not exist")
        if a.plot is not None and a.plot.suffix.lower() != ".png":
            raise OptionsError(f"--plot {a.plot}: the plot is a PNG; name it *.png")
        seconds, new_tokens, repeats = a.seconds, a.new_tokens, a.repeats
        if a.quick:
            seconds, new_tokens, repeats = seconds[:2], new_tokens[:1], min(repeats, 2)
        return cls(
            model=a.model,
            shape=a.shape,
            device=a.device,
            threads=a.threads,
            seconds=seconds,
            new_tokens=new_tokens,
            repeats=repeats,
            baselines=baselines,
            llama_cpp=a.llama_cpp,
            check_tokens=a.check_tokens,
            json=a.json,
            plot=a.plot,
            work=a.work,
        )
