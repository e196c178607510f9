"""Every figure the docs publish, generated from the committed result files under bench/results/.

README.md and docs/*.md hold figures only inside generated blocks:

    <!-- BEGIN GENERATED name: produced by python bench/report.py; do not edit by hand -->
    ...markdown made by the function registered for `name` below...
    <!-- END GENERATED name -->

`python bench/report.py` rewrites the inside of every block from the JSON; `--check` rewrites nothing
and exits 1 naming each stale block (CI runs it through tests/test_report.py), so a result file and the
tables made from it cannot drift apart. An unknown block name, a block outside the file it belongs to,
a registered block missing from its file, or a missing result file / key is an error that names it.

Why generate instead of copying numbers by hand: copies went stale (docstrings and README disagreed with
the result files), and a reader could not tell which script and which machine a number came from. Each
block therefore says the machine (as its result file records it), the command that produced the file,
and what the figures are compared with.

    python bench/report.py                       # rewrite every block
    python bench/report.py --check               # exit 1 if any block is stale
    python bench/report.py --print decode-cpu    # print one block's markdown
    python bench/report.py --results DIR --print stream-latency   # render from other result files (a trial run)

Only the standard library (and the bench command's own table code, qwen_audio_edge.benchmark.report, which is
standard library too): it runs anywhere, in a fraction of a second.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# Design constants the blocks judge figures against. tests/test_report.py checks that they equal the
# runtime's own (runtime/chunked.py TARGET_RATIO, DEFAULT_CHUNK_S, DEFAULT_LOOKAHEAD_S).
WER_TARGETS = (1.1, 1.2)  # chunked mode's WER ÷ exact mode's: clean, noisy at 10 dB SNR (issue #10)
DEFAULT_CHUNKED = (3.0, 2.0)  # chunked mode's default block and look-ahead, seconds
FLATNESS_TARGET = 1.2  # push-to-talk end() → first token, 30 s utterance ÷ 5 s utterance (issue #10)

BEGIN = re.compile(r"^<!-- BEGIN GENERATED ([^\s:]+)[^\n]*?-->\n?", re.M)  # at a line start: not when quoted in prose
END = "<!-- END GENERATED {name} -->"
HEADER = "<!-- BEGIN GENERATED {name}: produced by python bench/report.py; do not edit by hand -->"


class ReportError(Exception):
    """A one-line reason why the report cannot be made or is stale (printed as `error: …`)."""


# --- reading result files -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Results:
    """The result files under one directory (bench/results/ by default), read on demand."""

    root: Path = RESULTS

    def load(self, rel: str) -> Doc:
        path = self.root / rel
        if not path.is_file():
            raise ReportError(f"bench/results/{rel} is missing: run the script that writes it (docs/measurements.md)")
        try:
            return Doc(rel, json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ReportError(f"bench/results/{rel} is not valid JSON: {e}") from None

    def glob(self, pattern: str) -> list[Doc]:
        docs = [self.load(str(p.relative_to(self.root))) for p in sorted(self.root.glob(pattern))]
        if not docs:
            raise ReportError(f"no result files match bench/results/{pattern}")
        return docs


@dataclass(frozen=True)
class Doc:
    """One result file's JSON and its name, so that every missing key is reported with the file it is missing from."""

    rel: str
    data: dict

    def get(self, path: str | tuple, obj=None):
        """`a.b.0.c` in the file (or in `obj`, a part of it; a tuple of keys for names holding dots, such as
        `causal-2+0.5`); a missing key names the file and the path."""
        cur = self.data if obj is None else obj
        for part in path if isinstance(path, tuple) else path.split("."):
            try:
                cur = cur[int(part)] if isinstance(cur, list) else cur[part]
            except (KeyError, IndexError, ValueError, TypeError):
                shown = ".".join(path) if isinstance(path, tuple) else path
                raise ReportError(f"bench/results/{self.rel}: key {shown!r} missing") from None
        return cur

    def opt(self, path: str | tuple, default=None, obj=None):
        try:
            return self.get(path, obj)
        except ReportError:
            return default

    def machine(self) -> str:
        """The machine as the file records it: the CPU model and cores where recorded (kernel_bench.environment),
        else the platform string; thread count and torch version when present."""
        env = self.opt("environment", {})
        what = env.get("cpu") or self.opt("cpu") or env.get("machine") or self.opt("machine") or self.opt("name")
        if what is None:
            raise ReportError(f"bench/results/{self.rel}: no machine recorded (key 'environment' or 'machine')")
        cores = env.get("cpu_count")
        threads = env.get("torch_threads") or self.opt("threads")
        torch = (env.get("versions") or {}).get("torch") or self.opt("torch")
        parts = [
            what + (f", {cores} cores" if cores else ""),
            f"{threads} threads" if threads else None,
            f"torch {torch}" if torch else None,
        ]
        return "; ".join(p for p in parts if p)

    def source(self, command: str, baseline: str | None = None) -> str:
        """The line under each table: file (date), machine, command (the file's own record wins), baseline."""
        date = (
            self.opt("environment.started") or self.opt("date") or self.opt("environment.date") or "date not recorded"
        )
        cmd = self.opt("environment.command") or command
        load = self.opt("environment.load_average_at_start") or self.opt("load_average_at_start")
        line = f"Source: `bench/results/{self.rel}` ({str(date)[:10]}), `{cmd}`. Machine: {self.machine()}"
        if load:
            line += f" (load average {load[0]:.1f} at start)"
        line += "."
        return line + (f" Baseline: {baseline}." if baseline else "")


# --- formatting --------------------------------------------------------------------------------------
def table(header: list[str], rows: list[list[str]], drop_empty: bool = False) -> str:
    """A markdown table; drop_empty leaves out the columns with no value in any row (fields an older result
    file does not record)."""
    if drop_empty:
        keep = [i for i in range(len(header)) if any(r[i] != "–" for r in rows)]
        header, rows = [header[i] for i in keep], [[r[i] for i in keep] for r in rows]
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    )


def ms(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def times(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def span(values: list[float], fmt: str = "{:.2f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def secs(x: float) -> str:
    return f"{x:g} s"


# --- blocks ------------------------------------------------------------------------------------------
def _kernel_shape(d: Doc, row: dict) -> str:
    """`qkvo_4096x4096` → `qkvo 4096×4096`; a row without K×N (a whole layer's matmuls) keeps its name and parts."""
    if "k" not in row:
        return (
            f"{d.get('shape', row)} ({' + '.join(row.get('parts', []))})" if row.get("parts") else d.get("shape", row)
        )
    return f"{d.get('shape', row).rsplit('_', 1)[0]} {d.get('k', row)}×{d.get('n', row)}"


def _dtype_table(d: Doc) -> str:
    """torch's CPU int4 / int8 ops and the dense matmul per activation dtype (one row per op, ms per dtype)."""
    by_op: dict[str, dict[str, str]] = {}
    for row in d.get("dtype_rows"):
        value = d.get("ms", row)
        by_op.setdefault(d.get("op", row), {})[d.get("activation_dtype", row)] = (
            ms(value) if value is not None else f"fails ({row.get('error', 'no error recorded')})"
        )
    dtypes = list(dict.fromkeys(dt for cells in by_op.values() for dt in cells))
    rows = [[op, *[cells.get(dt, "–") for dt in dtypes]] for op, cells in by_op.items()]
    return table(["op, M = 1", *[f"{dt} ms" for dt in dtypes]], rows)


def kernels_cpu(r: Results) -> str:
    """W4A16 matmul on the 7B's layer shapes, CPU path vs dense bf16 matmul and torch's raw int4 op."""
    d = r.load("cpu/kernels.json")
    rows = []
    for row in d.get("rows"):
        o = row.get
        err = row.get("max_rel_err")
        rows.append(
            [
                _kernel_shape(d, row),
                str(d.get("m", row)),
                ms(d.get("ours_ms", row)),
                ms(o("dense_ms")),
                ms(o("tinygemm_ms")),
                times(o("speedup_vs_dense")),
                times(o("speedup_vs_tinygemm")),
                "–" if err is None else f"{err:.1e}",
            ]
        )
    act = str(d.get("activation_dtype")).replace("torch.", "")
    out = [
        table(
            [
                "layer shape (K×N)",
                "M (rows)",
                "ours ms",
                f"dense {act} ms",
                "torch int4 op ms",
                "÷ dense time",
                "÷ int4 op time",
                "max error ÷ largest reference value",
            ],
            rows,
        ),
        "",
        f"Times are {d.get('timing')}; “÷ dense time” above 1× means ours is faster. {act} activations. "
        + d.source(
            "python bench/kernel_bench.py --device cpu --out bench/results/cpu/kernels.json",
            f"the dense {act} matmul on the dequantized weight, and torch's own CPU int4 op "
            "(`_weight_int4pack_mm_for_cpu`) on the same packed weight; error vs the fp32 reference dequant-matmul",
        ),
    ]
    if "dtype_rows" in d.data:
        out += ["", f"**By activation dtype**, same run: {d.opt('dtype_rows_note', 'M = 1')}.", "", _dtype_table(d)]
    return "\n".join(out)


def _decode_rows(d: Doc) -> tuple[dict, list[str]]:
    runs = d.get("runs")
    refs = [k for k in runs if d.opt("engine", k.split("_")[0], runs[k]) == "transformers"]
    if not refs:
        raise ReportError(f"bench/results/{d.rel}: no transformers run in 'runs'")
    return runs, refs


def decode_cpu(r: Results) -> str:
    """Whole-model batch-1 decode, our runtime vs transformers on the same weights, same run."""
    d = r.load("cpu/decode_cpu_mid.json")
    runs, refs = _decode_rows(d)
    cfg = d.get("config")
    rows = []
    for label, run in runs.items():
        o = lambda k, default="–", run=run: d.opt(k, default, run)
        tok_s = d.get(f"runs.{label}.decode_tok_s")
        spread = f" ({o('decode_tok_s_min'):.1f}–{o('decode_tok_s_max'):.1f})" if "decode_tok_s_min" in run else ""
        engine = o("engine", "transformers" if label.startswith("transformers") else "qwen-audio-edge")
        dtypes = o("activation_dtype") + (f" / {run['w4_matmul_dtype']}" if run.get("w4_matmul_dtype") else "")
        fused = {True: "yes", False: "no"}.get(run.get("fused"), "–")
        ratios = [times(tok_s / d.get(f"runs.{ref}.decode_tok_s")) if engine != "transformers" else "–" for ref in refs]
        rows.append([f"`{label}`", engine, o("weights"), dtypes, o("lm_head"), fused, f"{tok_s:.1f}{spread}", *ratios])
    header = [
        "run",
        "engine",
        "weights",
        "activations / W4 matmul dtype",
        "lm_head",
        "q/k/v, gate/up fused",
        "tok/s median (min–max)",
        *[f"× `{ref}`" for ref in refs],
    ]
    out = [table(header, rows, drop_empty=True), ""]
    checks = d.opt("checks", {})
    if checks:
        out += [
            table(
                ["check before timing", "compared", "greedy tokens agreeing"],
                [
                    [
                        f"`{name}`",
                        d.get("compared", c),
                        f"{d.get('common_prefix', c)} of {d.get('tokens_compared', c)}"
                        + (" (required equal)" if c.get("required") else ""),
                    ]
                    for name, c in checks.items()
                ],
            ),
            "",
        ]
    model = (
        f"random Qwen2 decoder, hidden {d.get('hidden_size', cfg)}, {d.get('num_hidden_layers', cfg)} layers, "
        f"intermediate {d.get('intermediate_size', cfg)}, vocab {d.get('vocab_size', cfg)}"
    )
    out.append(
        f"Model: {model}. {d.get('prompt_tokens')}-token prompt, {d.get('new_tokens')} new tokens, greedy. "
        + d.source(
            "python bench/decode.py --preset cpu-mid --out bench/results/cpu/decode_cpu_mid.json",
            " and ".join(f"`{ref}`" for ref in refs) + " (`generate()`, same process; our W4 "
            f"weights: {d.get('w4_weights')})",
        )
    )
    return "\n".join(out)


def _stream_chunked_rule(d: Doc) -> str | None:
    """The chunked setting a stream result measured, or None when it predates the block-causal rule (the
    first rule had no look-ahead, so a file without `lookahead_seconds` measured the superseded rule)."""
    ahead = d.opt("lookahead_seconds")
    return None if ahead is None else f"{secs(d.get('chunk_seconds'))} blocks + {secs(ahead)} look-ahead"


def _ptt_command(ptt: Doc) -> str:
    """The push-to-talk run's command, for files that do not record theirs."""
    return (
        f"python bench/stream.py --preset mid --ptt-only --chunk-seconds {ptt.get('chunk_seconds'):g} "
        f"--lookahead-seconds {ptt.get('lookahead_seconds'):g} --out bench/results/cpu/stream_mid_ptt"
    )


# Stream result keys that bench/stream.py renamed: the current name first, then the older files' name.
STREAM_KEYS = {
    "exact_spec": ("endpoint_decision_to_first_token_ms_exact_spec", "vad_endpoint_to_first_token_ms_spec"),
    "exact_nospec": ("endpoint_decision_to_first_token_ms_exact_nospec", "vad_endpoint_to_first_token_ms_nospec"),
    "chunked_spec": ("endpoint_decision_to_first_token_ms_chunked_spec", "vad_chunked_endpoint_to_first_token_ms_spec"),
    "lag": ("lag_s_max", "lag_s"),
}


def _pick(d: Doc, obj: dict, what: str):
    """The value under the first of STREAM_KEYS[what] present in obj (an error names the current key)."""
    for key in STREAM_KEYS[what]:
        if key in obj:
            return obj[key]
    return d.get(STREAM_KEYS[what][0], obj)


def _with_spread(d: Doc, obj: dict, key: str) -> str:
    """A median with its min–max where the file records the spread (`<key>_spread`)."""
    spread = obj.get(f"{key}_spread")
    text = ms(d.get(key, obj))
    if spread and len(spread.get("samples", [])) > 1:
        text += f" ({ms(spread['min'])}–{ms(spread['max'])})"
    return text


def _realtime_table(d: Doc, rule: str | None) -> str:
    rows = []
    for row in d.get("realtime_rows"):
        for mode in [m for m in ("exact", "chunked", "exact-nospec") if m in row and (rule or m != "chunked")]:
            m = row[mode]
            label = {"chunked": f"chunked ({rule})", "exact-nospec": "exact, no speculation"}.get(mode, mode)
            rows.append(
                [
                    secs(d.get("seconds", row)),
                    label,
                    _with_spread(d, m, "end_of_speech_to_first_token_ms"),
                    ms(d.get("vad_decision_wait_ms", m)),
                    ms(d.get("beyond_vad_wait_ms", m)),
                    ms(m.get("endpoint_decision_to_first_token_ms")),
                    f"{_pick(d, m, 'lag'):.2f}",
                ]
            )
    return table(
        [
            "utterance",
            "mode",
            "end of speech → first token ms (min–max)",
            "of which the VAD's own wait ms",
            "compute beyond the wait ms",
            "of which endpoint decision → first token ms",
            "lag behind real time s",
        ],
        rows,
        drop_empty=True,
    )


def _component_table(d: Doc, rule: str | None) -> str:
    rows = []
    for row in d.get("rows"):
        g = functools.partial(d.get, obj=row)
        run, hf = g("offline_run_ttft_ms"), g("transformers_offline_ttft_ms")
        same = {True: "yes", False: "**no**"}.get(row.get("first_token_equal"), "–")
        rows.append(
            [
                secs(g("seconds")),
                ms(_pick(d, row, "exact_spec")),
                ms(_pick(d, row, "exact_nospec")),
                ms(_pick(d, row, "chunked_spec")) if rule else "–",
                ms(g("push_to_talk_exact_ttft_ms")),
                ms(g("push_to_talk_chunked_ttft_ms")) if rule else "–",
                ms(run),
                ms(hf),
                times(run / hf),
                same,
            ]
        )
    return table(
        [
            "utterance",
            "endpoint decision → first token ms, exact",
            "same, no speculation",
            "same, chunked",
            "push-to-talk end() → first token ms, exact stream",
            "same, chunked stream",
            "offline `run` TTFT ms",
            "transformers offline TTFT ms",
            "`run` ÷ transformers",
            "same first token",
        ],
        rows,
        drop_empty=True,
    )


def stream_latency(r: Results) -> str:
    """What a user waits for after speaking, and its components; offline comparisons, slower rows included."""
    full, ptt = r.load("cpu/stream_mid.json"), r.load("cpu/stream_mid_ptt.json")
    rule = _stream_chunked_rule(full)
    repeats = full.opt("repeats")
    model = full.opt("model", "a random checkpoint (export settings not recorded)")
    out = [
        f"Model: {model}; `bench/stream.py --preset {full.get('preset')}` shape; espeak-ng speech repeated to length"
        + (f"; medians of {repeats}" if repeats else "")
        + ".",
        "",
        "**End of speech → first token, audio arriving at real-time pace** (VAD on, 100 ms chunks, speculative "
        "encode + prefill in the endpointing silence): what a user waits for.",
        "",
        _realtime_table(full, rule),
        "",
    ]
    if not rule:
        out += [
            "(This file's chunked rows measured the first chunked rule, since replaced by the block-causal rule: "
            "they are not shown.)",
            "",
        ]
    out += [
        "**Components, and offline against transformers** (audio fed as fast as possible). “Endpoint decision → "
        "first token” starts after the VAD has decided, when speculation has already encoded and prefilled the "
        "utterance: a component of the wait above, not the wait. `run` ÷ transformers is our offline `run` "
        "time-to-first-token ÷ transformers' offline pipeline's: above 1× ours is **slower**.",
        "",
        _component_table(full, rule),
        "",
        full.source(
            "python bench/stream.py --preset mid --out bench/results/cpu/stream_mid",
            "transformers' offline pipeline (processor + `generate()` of one token) on the same audio, "
            "checkpoint and process; our offline `run`",
        ),
        "",
    ]
    rule = _stream_chunked_rule(ptt)
    if rule is None:
        raise ReportError(
            f"bench/results/{ptt.rel}: no 'lookahead_seconds': the push-to-talk table needs the block-causal rule"
        )
    rows = [
        [
            secs(ptt.get("seconds", row)),
            ms(ptt.get("push_to_talk_chunked_ttft_ms", row)),
            ms(ptt.get("push_to_talk_exact_ttft_ms", row)),
            ms(ptt.get("offline_run_ttft_ms", row)),
        ]
        for row in ptt.get("rows")
    ]
    flat = ptt.get("chunked_flatness_30s_over_5s")
    out += [
        f"**Push-to-talk end() → first token, chunked mode ({rule})** against the exact stream and offline `run`:",
        "",
        table(["utterance", "chunked stream ms", "exact stream ms", "offline `run` TTFT ms"], rows),
        "",
        f"Chunked, 30 s ÷ 5 s utterance: {flat:.2f} (target ≤ {FLATNESS_TARGET}: "
        f"{'met' if flat <= FLATNESS_TARGET else 'not met'}). "
        + ptt.source(_ptt_command(ptt), "the exact stream and offline `run` on the same utterances, same process"),
    ]
    return "\n".join(out)


def quantize_memory(r: Results) -> str:
    """Peak memory of a whole `export --bits 4` on a tiny and a mid-size random checkpoint."""
    d = r.load("cpu/quantize_memory.json")
    rows = []
    for name, m in d.get("models").items():
        g = functools.partial(d.get, obj=m)
        rows.append(
            [
                name,
                f"{g('hidden')} / {g('layers')} / {g('vocab')}",
                f"{g('checkpoint_params') / 1e6:.2f} M",
                f"{g('baseline_rss_mib'):,.0f}",
                f"{g('peak_rss_mib'):,.0f}",
                f"+{g('export_peak_minus_baseline_mib'):,.0f}",
                f"{g('export_s'):.1f}",
                f"{g('eval_vs_fp.top1_agreement'):.2f} / {g('eval_vs_fp.mean_kl'):.2f}",
            ]
        )
    tokens = {d.get("calibration_tokens", m) for m in d.get("models").values()}
    return "\n".join(
        [
            table(
                [
                    "checkpoint",
                    "hidden / layers / vocab",
                    "parameters",
                    "RSS after imports MiB",
                    "peak RSS MiB",
                    "export's own MiB",
                    "export s",
                    "W4 vs fp on calibration prompts: top-1 / KL",
                ],
                rows,
            ),
            "",
            f"{d.get('num_samples')} built-in calibration prompts ({', '.join(f'{t:,}' for t in sorted(tokens))} tokens), "
            "each export in its own process (peak = VmHWM after the imports). "
            + d.source(
                "python bench/quantize_memory.py --out bench/results/cpu/quantize_memory.json",
                "the same process's RSS after its imports",
            ),
        ]
    )


def compile_check(r: Results) -> str:
    """Offline compilation of every Triton kernel variant for sm_80/86/89/90: compiled, excluded, spills."""
    docs = r.glob("compile/triton-*/sm_*.json")
    rows = []
    for d in docs:
        s = d.get("summary")
        g = functools.partial(d.get, obj=s)
        target = f"sm_{d.get('target.arch')} ({d.get('target.gpus')})"
        counts = [str(g(key)) for key in ("failed", "excluded", "spills", "spills_fp32")]
        rows.append(
            [
                d.get("triton"),
                target,
                f"{g('compiled')} of {g('binaries')}",
                *counts,
                f"{g('max_shared_picked') / 1024:.0f} KiB",
                str(g("max_regs_picked")),
            ]
        )
    versions = sorted({f"triton {d.get('triton')} with torch {d.get('torch')}" for d in docs})
    return "\n".join(
        [
            table(
                [
                    "triton",
                    "target",
                    "binaries compiled",
                    "failed (tuner may pick)",
                    "left out by the tuner on this target",
                    "spills fp16/bf16",
                    "spills fp32 (correctness mode)",
                    "max shared memory picked",
                    "max registers picked",
                ],
                rows,
            ),
            "",
            "Offline compilation with Triton's own compiler on a machine without a GPU: resource usage, not timings. "
            f"Source: `bench/results/compile/triton-*/sm_*.json`, `python bench/compile_check.py --out bench/results/compile` "
            f"({'; '.join(versions)}). Baseline: none (each target's limits in `kernels/w4_triton.py` `GPU_LIMITS`).",
        ]
    )


# --- encoder fidelity on trained weights (bench/fidelity.py, bench/fidelity_onnx.py) --------------------
FIDELITY_LABELS = {
    "ref30": "transformers Whisper encoder, 30 s padded",
    "exact": "exact, valid frames (our recipe)",
    "onnx-fp32": "ONNX fp32",
    "onnx-fp16": "ONNX fp16",
    "onnx-int8": "ONNX int8",
}


def _fidelity_label(row: str) -> str:
    if row in FIDELITY_LABELS:
        return FIDELITY_LABELS[row]
    kind, spec = row.split("-", 1)
    block, _, ahead = spec.partition("+")
    if kind == "blockdiag":
        return f"chunked {block} s, first rule (block alone)"
    return f"chunked {block} s, block-causal" + (f" + {ahead} s look-ahead" if ahead else "")


def _fidelity_order(row: str) -> tuple:
    """References, precisions, the first chunked rule, then block-causal; by block, then look-ahead."""
    if row in FIDELITY_LABELS:
        return (0, list(FIDELITY_LABELS).index(row), 0.0)
    kind, spec = row.split("-", 1)
    block, _, ahead = spec.partition("+")
    return (1 if kind == "blockdiag" else 2, float(block), float(ahead or 0))


def _fidelity_table(d: Doc, names: list[str]) -> str:
    rows = d.get("rows")
    exact = d.get("rows.exact")

    def cell(row: dict, key: str, fmt: str) -> str:
        return format(row[key], fmt) if row.get(key) is not None else "–"

    def ratio(row: dict, cond: str) -> str:
        return f"{row[f'wer_{cond}'] / d.get(f'wer_{cond}', exact):.2f}" if f"wer_{cond}" in row else "–"

    lines = []
    for name in sorted(names, key=_fidelity_order):
        row = d.get((name,), rows)
        lines.append(
            [
                _fidelity_label(name),
                cell(row, "wer_clean", ".1%"),
                cell(row, "wer_noisy", ".1%"),
                f"{ratio(row, 'clean')} / {ratio(row, 'noisy')}",
                f"{cell(row, 'cosine_clean', '.4f')} / {cell(row, 'cosine_noisy', '.4f')}",
            ]
        )
    return table(
        [
            "encoder states",
            "WER clean",
            f"WER noisy ({d.get('snr_db'):g} dB)",
            "× exact (clean / noisy)",
            "cosine vs exact (clean / noisy)",
        ],
        lines,
    )


def _fidelity_set(d: Doc) -> str:
    """What the utterance set is, from the set file the result names (voices, speeds, words)."""
    path = ROOT / d.get("set")
    if not path.is_file():
        raise ReportError(f"bench/results/{d.rel}: its set file {d.get('set')} is missing")
    utts = json.loads(path.read_text())["utterances"][: d.get("utterances")]
    speeds = [u["speed"] for u in utts]
    lo, hi = d.get("seconds")
    return (
        f"{len(utts)} utterances of `{d.get('set')}` ({len({u['voice'] for u in utts})} voices, "
        f"{min(speeds)}–{max(speeds)} words per minute, {sum(len(u['text'].split()) for u in utts)} words; "
        f"{lo:.1f}–{hi:.1f} s with {d.get('pad_s'):g} s of silence each side)"
    )


def _fidelity_source(d: Doc) -> str:
    return (
        f"Source: `bench/results/{d.rel}`, `python bench/fidelity.py` (torch {d.get('torch')}; machine not recorded: "
        f"WER does not depend on it): {d.get('model')}; {_fidelity_set(d)}, clean and at {d.get('snr_db'):g} dB SNR; "
        "greedy, Whisper's English normalizer. Baseline: the exact row."
    )


def fidelity_wer(r: Results) -> str:
    """The whole WER table of docs/fidelity.md: every encoder variant measured."""
    d = r.load("cpu/fidelity_tiny_en.json")
    return _fidelity_table(d, list(d.get("rows"))) + "\n\n" + _fidelity_source(d)


def encoder_fidelity(r: Results) -> str:
    """The headline rows of the fidelity study for docs/measurements.md (the whole table is in docs/fidelity.md)."""
    d = r.load("cpu/fidelity_tiny_en.json")
    default = f"causal-{DEFAULT_CHUNKED[0]:g}+{DEFAULT_CHUNKED[1]:g}"
    names = ["ref30", "exact", "onnx-fp32", "onnx-fp16", "onnx-int8", default]
    return (
        _fidelity_table(d, names) + "\n\nThe chunked row is the default setting; every setting measured: "
        "[fidelity.md](fidelity.md). " + _fidelity_source(d)
    )


def encoder_precisions(r: Results) -> str:
    """ONNX fp32 / fp16 / int8 encoder states against our torch fp32 states, and their CPU time."""
    d = r.load("cpu/encoder_precisions_tiny_en.json")
    lengths = list(d.get("timing"))
    rows = []
    for name, p in d.get("precisions").items():
        g = functools.partial(d.get, obj=p)
        per_utt = [d.get("mean_cosine", u) for u in g("per_utterance")]
        cells = []
        for length in lengths:
            t = d.get(f"timing.{length}")
            ratio = d.get(f"median_ratios.onnx_{name}.vs_onnx_fp32", t)
            cells.append(f"{1e3 * d.get(f'onnx_{name}.median', t):.0f} ({ratio:.2f}×)")
        rows.append(
            [
                name,
                f"{g('file_mb'):g}",
                f"{g('mean_cosine'):.4f}",
                span(per_utt, "{:.3f}"),
                f"{g('min_cosine'):.4f}",
                f"{g('speech_min_cosine'):.4f}",
                f"{g('speech_max_rel_err'):.1e}",
                *cells,
            ]
        )
    torch_cells = [f"{1e3 * d.get(f'timing.{length}.torch_fp32.median'):.0f}" for length in lengths]
    rows.append(["torch fp32 (our module)", "–", "1 (reference)", "–", "–", "–", "–", *torch_cells])
    audio = [f"{d.get(f'timing.{length}.audio_seconds'):g} s audio: ms (÷ ONNX fp32)" for length in lengths]
    return "\n".join(
        [
            table(
                [
                    "precision",
                    "file MB",
                    "mean cosine",
                    "per-utterance mean cosine",
                    "min cosine",
                    "min cosine, speech frames",
                    "max error ÷ largest reference value, speech",
                    *audio,
                ],
                rows,
            ),
            "",
            f"{d.get('utterances')} utterances ({', '.join(d.get('ids'))}). int8: onnxruntime dynamic quantization; int8-static: "
            "static quantization calibrated on speech, rejected (the file's `int8` entry says what was tried). "
            "Times: median of one encode, "
            f"{d.get('threads')} threads, onnxruntime {d.get('onnxruntime')}; machine: {d.get('cpu')} (load average "
            + ", ".join(f"{d.get(f'timing.{length}.load_avg_1min'):.1f}" for length in lengths)
            + f" at the timings). Source: `bench/results/{d.rel}`, `python bench/fidelity_onnx.py` (torch {d.get('torch')}). "
            f"Baseline: {d.get('reference')}.",
        ]
    )


def chunked_default(r: Results) -> str:
    """The default chunked setting against its targets: WER vs exact, and push-to-talk latency flatness."""
    d, ptt = r.load("cpu/fidelity_tiny_en.json"), r.load("cpu/stream_mid_ptt.json")
    block, ahead = DEFAULT_CHUNKED
    row, exact = d.get(("rows", f"causal-{block:g}+{ahead:g}")), d.get("rows.exact")
    if (ptt.get("chunk_seconds"), ptt.get("lookahead_seconds")) != DEFAULT_CHUNKED:
        raise ReportError(
            f"bench/results/{ptt.rel}: measured chunk {ptt.get('chunk_seconds')} s + look-ahead "
            f"{ptt.get('lookahead_seconds')} s, not the default {block:g} + {ahead:g}"
        )
    lines = []
    for cond, target in zip(("clean", "noisy"), WER_TARGETS, strict=True):
        got, ref = d.get(f"wer_{cond}", row), d.get(f"wer_{cond}", exact)
        lines.append(
            [
                f"WER {cond}",
                f"{got:.1%} vs {ref:.1%} exact = {got / ref:.2f}×",
                f"≤ {target}×",
                "met" if got <= target * ref else "**not met**",
            ]
        )
    flat = ptt.get("chunked_flatness_30s_over_5s")
    by_len = {ptt.get("seconds", x): x for x in ptt.get("rows")}
    lat = " / ".join(ms(ptt.get("push_to_talk_chunked_ttft_ms", by_len[s])) for s in sorted(by_len))
    lines.append(
        [
            f"push-to-talk end() → first token ms, {' / '.join(f'{s:g}' for s in sorted(by_len))} s utterances",
            f"{lat}; 30 s ÷ 5 s = {flat:.2f}",
            f"30 s ÷ 5 s ≤ {FLATNESS_TARGET}",
            "met" if flat <= FLATNESS_TARGET else "**not met**",
        ]
    )
    same_total = [
        n
        for n in d.get("rows")
        if n.startswith("causal-") and "+" in n and abs(sum(map(float, n[7:].split("+"))) - block - ahead) < 1e-9
    ]
    wer = lambda n, c: d.get(("rows", n, f"wer_{c}"))
    best = min((n for n in d.get("rows") if n.startswith("causal-")), key=lambda n: wer(n, "clean"))
    lines.append(
        [
            f"every setting with block + look-ahead = {block + ahead:g} s ({len(same_total)}), WER clean",
            span([wer(n, "clean") for n in same_total], "{:.1%}"),
            "–",
            "–",
        ]
    )
    lines.append(
        [
            f"lowest clean WER measured: {_fidelity_label(best)}",
            f"{wer(best, 'clean'):.1%} / {wer(best, 'noisy'):.1%} = {wer(best, 'clean') / wer('exact', 'clean'):.2f}× / "
            f"{wer(best, 'noisy') / wer('exact', 'noisy'):.2f}×",
            "–",
            "–",
        ]
    )
    return "\n".join(
        [
            table(
                [
                    f"default chunked mode ({block:g} s blocks + {ahead:g} s look-ahead)",
                    "measured",
                    "target",
                    "verdict",
                ],
                lines,
            ),
            "",
            _fidelity_source(d) + " Latency: " + ptt.source(_ptt_command(ptt))[len("Source: ") :],
        ]
    )


def gptq_quality(r: Results) -> str:
    """GPTQ W4 on the random test fixture: per-linear error vs RTN and gptqmodel, calibration modes, end to end."""
    d = r.load("cpu/gptq_quality.json")
    rows = []
    for name, c in d.get("per_linear.configs").items():
        lin = d.get("rows", c)
        col = lambda k, lin=lin: [d.get(k, x) for x in lin]
        rows.append(
            [
                name,
                str(len(lin)),
                span(col("ours"), "{:.3f}"),
                span(col("rtn"), "{:.3f}"),
                span(col("gptqmodel"), "{:.3f}"),
                span(col("ours_over_gptqmodel"), "{:.3f}"),
                span([x / y for x, y in zip(col("rtn"), col("ours"), strict=True)], "{:.2f}"),
            ]
        )
    env = d.get("environment")
    out = [
        f"**Per linear layer**, held-out relative output error ‖XWᵀ − XŴᵀ‖ ÷ ‖XWᵀ‖ "
        f"({d.get('per_linear.calibration_prompts')} calibration prompts, {d.get('per_linear.heldout_prompts')} held-out), "
        f"ranges over the layers; gptqmodel {d.get('gptqmodel', env)} on identical inputs and settings:",
        "",
        table(["config", "linears", "ours", "round-to-nearest", "gptqmodel", "ours ÷ gptqmodel", "RTN ÷ ours"], rows),
        "",
    ]
    cal = d.get("calibration")
    rows = [
        [
            str(d.get("seed", s)),
            f"{d.get('audio.mean_layer_rel_err', s):.4f}",
            f"{d.get('text.mean_layer_rel_err', s):.4f}",
            f"{d.get('audio.mean_kl', s):.3f}",
            f"{d.get('text.mean_kl', s):.3f}",
        ]
        for s in d.get("seeds", cal)
    ]
    out += [
        f"**Audio-aware vs text-only calibration** on a fixture whose audio embeddings are "
        f"{d.get('audio_embedding_norm_over_token_norm', cal):.1f}× the norm of its token embeddings "
        f"({d.get('calibration_prompts', cal)} calibration prompts, "
        f"{d.get('heldout_audio_prompts', cal)} held-out audio prompts):",
        "",
        table(
            ["seed", "mean layer error, audio-aware", "text-only", "mean KL(fp ‖ W4), audio-aware", "text-only"], rows
        ),
        "",
    ]
    head, load, e2e = d.get("int8_head"), d.get("transformers_load"), d.get("end_to_end")
    out += [
        table(
            ["check", "measured"],
            [
                [
                    "int8 lm_head side file vs fp16 head: max logit difference ÷ largest logit magnitude; argmax equal",
                    f"{d.get('max_logit_diff_over_max_logit', head):.2%}; {'yes' if d.get('argmax_equal', head) else 'no'} "
                    f"({d.get('positions', head)} positions)",
                ],
                [
                    "transformers + optimum + gptqmodel loading our `decoder/`: max logit difference to our runtime "
                    "÷ largest logit magnitude",
                    f"{d.get('max_logit_diff_over_max_logit', load):.1e}",
                ],
                [
                    f"W4 vs fp end to end (`compare`, {len(d.get('signals', e2e))} held-out signals, {d.get('new_tokens', e2e)} "
                    "teacher-forced tokens): top-1 agreement / mean KL",
                    f"{d.get('top1_agreement', e2e):.2f} / {d.get('mean_kl', e2e):.2f}",
                ],
            ],
        ),
        "",
        f"Fixture: {d.get('fixture')}. Its weights are deliberately wide (so greedy decoding is decisive) and amplify "
        "quantization error through the layers: these figures check the machinery, not real-model quality. "
        f"Source: `bench/results/{d.rel}` ({d.get('date', env)}), `{d.get('script')}`. Machine: {env.get('machine')}; "
        f"torch {env.get('torch')}, transformers {env.get('transformers')} (quality figures: independent of machine load). "
        "Baselines: the fp weights; round-to-nearest; gptqmodel's GPTQ.",
    ]
    return "\n".join(out)


def _bench_rows(r: Results, m: str) -> list[list[str]]:
    """README rows from the side-by-side bench run (first token vs transformers, decoder vs llama.cpp) and the
    7B memory plan."""
    b, mem = r.load("cpu/bench_mid.json"), r.load("cpu/memory_7b.json")
    cpu = f"CPU, {b.get('config.threads')} threads"
    med = {(s["engine"], s["stage"], s["audio_s"]): s["median"] for s in b.get("stages") if s["new_tokens"] is None}
    lengths = sorted({k[2] for k in med if k[:2] == ("ours", "ttft")})
    hf = lambda e, x: med[("ours", "ttft", x)] / med[(e, "ttft", x)]
    ends = (lengths[0], lengths[-1])
    ttft = (
        " and ".join(f"{x:g} s {ms(med[('ours', 'ttft', x)])} ms" for x in ends)
        + ": "
        + "/".join(times(hf("transformers-fp32", x)) for x in ends)
        + " fp32's; **slower** than bf16: "
        + "/".join(times(hf("transformers-bf16", x)) for x in ends)
    )
    dec = {
        s["engine"]: s["median"]
        for s in b.get("stages")
        if (s["stage"], s["audio_s"], s["new_tokens"]) == ("decode", lengths[0], max(b.get("config.new_tokens")))
    }
    anchor = f"{m}#side-by-side-qwen-audio-edge-bench-cpu"
    rows = [
        [
            f"[First token]({anchor}), audio file → token, mid-size W4",
            ttft,
            "transformers, same weights",
            cpu,
        ],
        [
            f"[W4 decode]({anchor}), batch 1, mid-size",
            f"{dec['ours']:.0f} tok/s: {times(dec['ours'] / dec['transformers-fp32'])} fp32, {times(dec['ours'] / dec['transformers-bf16'])} bf16",
            "transformers `generate()`",
            cpu,
        ],
    ]
    llama = b.opt("llama_cpp") or {}
    if llama.get("rows"):
        tps = {(x["engine"], x["test"]): x["tokens_per_s"] for x in llama["rows"]}
        ours = lambda t: tps[("ours (W4 g128)", t)]
        theirs = lambda t: tps[("llama.cpp Q4_0", t)]
        slower = lambda t: " (**slower**)" if ours(t) < theirs(t) else ""
        rows.append(
            [
                f"[Decoder vs llama.cpp]({anchor}), tok/s",
                f"decode {ours('tg32'):.0f} vs {theirs('tg32'):.0f}{slower('tg32')}; prefill 512: {ours('pp512'):.0f} vs {theirs('pp512'):.0f}{slower('pp512')}",
                "llama.cpp Q4_0, same weights",
                cpu,
            ]
        )
    configs = {c["name"]: c["plan"]["peak_bytes"] / 2**30 for c in mem.get("configs")}
    best = min(configs, key=configs.__getitem__)
    rows.append(
        [
            f"[7B memory plan]({m}#memory-plan-of-the-7b-8-gb-card), 30 s + 1k tokens",
            f"{configs[best]:.2f} GiB ({best.removeprefix('8 GB: ')}); default {configs['default (fp16 export head)']:.2f} GiB",
            f"an 8 GB card's ≤ {mem.get('target_gib'):g} GiB",
            "computed (meta device)",
        ]
    )
    return rows


def readme_summary(r: Results) -> str:
    """A handful of headline rows for the README (kept short: the README has a size limit), each naming its
    baseline and machine; the details are in docs/measurements.md."""
    full = r.load("cpu/stream_mid.json")
    fid, gq = r.load("cpu/fidelity_tiny_en.json"), r.load("cpu/gptq_quality.json")
    cpu = lambda d: f"CPU, {d.opt('environment.torch_threads') or d.get('threads')} threads"
    rule = _stream_chunked_rule(full)
    realtime = {full.get("seconds", row): row for row in full.get("realtime_rows")}
    rt = []
    for length in sorted({min(realtime, key=lambda x: abs(x - 5)), max(realtime)}):  # a short and the longest utterance
        row = realtime[length]
        modes = [m for m in ("exact", "chunked") if m in row and (rule or m != "chunked")]
        waits = [f"{m} {ms(full.get('end_of_speech_to_first_token_ms', row[m]))} ms" for m in modes]
        rt.append(f"{length:g} s: " + ", ".join(waits))
    block, ahead = DEFAULT_CHUNKED
    wer = lambda n: fid.get(("rows", n, "wer_clean"))
    lins = [x for c in gq.get("per_linear.configs").values() for x in gq.get("rows", c)]
    m = "docs/measurements.md"
    rows = [
        [
            f"[End of speech → first token]({m}#streaming-latency), real-time audio, VAD",
            "; ".join(rt),
            "none (includes the VAD's silence wait)",
            cpu(full),
        ],
        *_bench_rows(r, m),
        [
            f"[Chunked encoder]({m}#encoder-fidelity) ({block:g} s + {ahead:g} s), Whisper tiny.en WER",
            f"{wer(f'causal-{block:g}+{ahead:g}'):.1%} vs {wer('exact'):.1%}",
            "exact encoder",
            "any (quality)",
        ],
        [
            f"[GPTQ]({m}#gptq-quality) per-linear error, random fixture",
            f"{span([gq.get('ours_over_gptqmodel', x) for x in lins])}× gptqmodel's; RTN's "
            f"{span([gq.get('rtn', x) / gq.get('ours', x) for x in lins], '{:.1f}')}× ours",
            "gptqmodel; RTN",
            "any (quality)",
        ],
    ]
    return table(["measured", "result", "baseline", "machine"], rows) + (
        "\n\nNo GPU timing exists yet: GPU kernels are tested under the Triton interpreter and "
        f"[compiled offline]({m}#compile-check)."
    )


def _bench_source(d: Doc) -> str:
    dev = d.get("device")
    cpu = f"{dev.get('gpu') or dev['cpu']}, {dev['cores_available']} cores, {d.get('config.threads')} threads"
    load = dev.get("load_average_at_start")
    commit = (d.opt("git_commit") or "not recorded")[:12]
    return (
        f"Source: `bench/results/{d.rel}` ({d.get('created_utc')[:10]}, commit {commit}), `{d.get('command')}`. "
        f"Machine: {cpu}; torch {d.get('versions.torch')}"
        + (f" (load average {load[0]:.1f} at start)." if load else ".")
    )


def _markdown_tables(d: Doc, skip: tuple[str, ...] = ()) -> str:
    """The same tables `qwen-audio-edge bench` prints (qwen_audio_edge.benchmark.report.tables), as markdown."""
    from qwen_audio_edge.benchmark.report import tables as bench_tables

    parts = []
    for title, headers, rows in bench_tables(d.data):
        if not rows or title.startswith(skip):
            continue
        parts.append(f"**{title}**\n\n" + table(headers, rows))
    return "\n\n".join(parts)


def bench_cpu(r: Results) -> str:
    """`qwen-audio-edge bench --shape mid` on the CPU: ours, transformers fp32/bf16 and llama.cpp in one run."""
    d = r.load("cpu/bench_mid.json")
    agree = d.get("agreement")
    gated = [a for a in agree if (a.get("gated_path") or "").startswith("ours, fp32 reference")]
    ok = [a for a in gated if a["identical"]]
    lead = lambda name: span(
        [a["leading_tokens_equal"]["timed path"] for a in agree if a["baseline"] == name], "{:.0f}"
    )
    verdict = (
        f"Greedy outputs, checked before timing at every length ({d.get('config.check_tokens')} tokens): transformers "
        f"fp32 vs our pipeline on its fp32 reference kernels identical at {len(ok)} of {len(gated)} lengths. The timed "
        f"path (W4 matmuls computed in bf16) shares {lead('transformers-fp32')} leading tokens with transformers fp32 "
        f"and {lead('transformers-bf16')} with bf16 on these random weights, which amplify bf16 rounding (docs/bench.md)."
    )
    return "\n\n".join([_markdown_tables(d), verdict, _bench_source(d)])


def memory_7b(r: Results) -> str:
    """The 7B's planned peak device memory per configuration, against the 8 GB card's 6 GiB target."""
    d = r.load("cpu/memory_7b.json")
    target = d.get("target_gib")
    rows = []
    for c in d.get("configs"):
        plan = d.get("plan", c)
        peak = plan["peak_bytes"] / 2**30
        host = plan.get("host_bytes", 0) / 2**30
        rows.append([c["name"], f"{peak:.2f}", f"{host:.2f}", "yes" if peak <= target else "no"])
    return (
        table(["configuration", "peak device GiB", "host GiB (pinned)", f"≤ {target:g} GiB"], rows)
        + f"\n\n{d.get('what')}. Method: {d.get('method')}. Source: `bench/results/{d.rel}`, `{d.get('command')}`."
    )


def ttft_profile(r: Results) -> str:
    """Our offline first token vs transformers (fp32, same checkpoint), by stage; thread defaults under load."""
    d = r.load("cpu/ttft_profile_mid.json")
    rows = []
    for row in d.get("ttft_rows"):
        w4, fp, hf = d.get("ours_w4", row), d.get("ours_fp32", row), d.get("transformers_fp32", row)
        rows.append(
            [
                f"{d.get('seconds', row):g} s",
                ms(w4["ttft_ms"]),
                f"{ms(w4['mel_ms'])} / {ms(w4['encoder_ms'])} / {ms(w4['prefill_ms'])}",
                ms(fp["ttft_ms"]),
                ms(hf["ttft_ms"]),
                times(d.get("w4_over_transformers", row)),
                "yes" if d.get("first_token_equal_fp32", row) else "**no**",
            ]
        )
    out = [
        table(
            [
                "audio",
                "ours W4",
                "W4 mel / encoder / prefill",
                "ours fp32",
                "transformers fp32",
                "W4 ÷ transformers",
                "fp32 first token = transformers'",
            ],
            rows,
        )
    ]
    threads = d.opt("threads_rows") or []
    if threads:
        trows = [
            [t["machine"], str(t["threads_option"]), str(t["torch_threads"]), ms(t["ttft_ms"]), ms(t["mel_ms"])]
            for t in threads
        ]
        out.append(
            "Thread settings, W4, a fresh process each (loaded: a busy loop pinned to one core):\n\n"
            + table(["machine", "--threads", "threads used", "first token ms", "mel ms"], trows)
        )
    out.append(
        d.source(
            "python bench/ttft_profile.py",
            "transformers fp32 on the same checkpoint (processor + generate of one token)",
        )
    )
    return "\n\n".join(out)


def decode_profile(r: Results) -> str:
    """One batch-1 decode step's CPU time by operator: what our decode is made of (the llama.cpp gap)."""
    d = r.load("cpu/decode_profile_mid.json")
    steps = d.get("steps")
    rows = [
        [f"`{o['op']}`", f"{o['calls'] / steps:.0f}", f"{o['self_cpu_ms'] / steps:.3f}"] for o in d.get("top_ops")[:8]
    ]
    head = (
        f"Decode {d.get('decode_tok_s_unprofiled'):.1f} tok/s unprofiled; per step {d.get('self_cpu_ms_total') / steps:.2f} ms of "
        f"operator time, {d.get('w4_share'):.0%} of it in the W4 matmuls, {d.get('aten_calls_per_step'):.0f} aten calls; "
        f"lm_head: {d.get('paths.lm_head')}."
    )
    return "\n\n".join(
        [
            head,
            table(["operator", "calls per step", "self CPU ms per step"], rows),
            f"Source: `bench/results/{d.rel}` ({d.get('date')}), `{d.get('command')}`. Machine: {d.get('machine')}; "
            f"{d.get('threads')} threads.",
        ]
    )


# name → (the file it lives in, the function that makes it)
BLOCKS: dict[str, tuple[str, Callable[[Results], str]]] = {
    "readme-summary": ("README.md", readme_summary),
    "kernels-cpu": ("docs/measurements.md", kernels_cpu),
    "decode-cpu": ("docs/measurements.md", decode_cpu),
    "stream-latency": ("docs/measurements.md", stream_latency),
    "quantize-memory": ("docs/measurements.md", quantize_memory),
    "compile-check": ("docs/measurements.md", compile_check),
    "encoder-fidelity": ("docs/measurements.md", encoder_fidelity),
    "gptq-quality": ("docs/measurements.md", gptq_quality),
    "bench-cpu": ("docs/measurements.md", bench_cpu),
    "memory-7b": ("docs/measurements.md", memory_7b),
    "ttft-profile": ("docs/measurements.md", ttft_profile),
    "decode-profile": ("docs/measurements.md", decode_profile),
    "fidelity-wer": ("docs/fidelity.md", fidelity_wer),
    "encoder-precisions": ("docs/fidelity.md", encoder_precisions),
    "chunked-default": ("docs/fidelity.md", chunked_default),
}


# --- rewriting the files -----------------------------------------------------------------------------
def blocks_in(text: str, rel: str) -> list[tuple[str, int, int]]:
    """(name, start, end) of the inside of every block in `text`; unbalanced markers are errors."""
    found = []
    for m in BEGIN.finditer(text):
        name = m.group(1)
        end = re.compile("^" + re.escape(END.format(name=name)), re.M).search(text, m.end())
        nxt = BEGIN.search(text, m.end())
        if end is None or (nxt is not None and nxt.start() < end.start()):
            raise ReportError(f"{rel}: block {name!r} has no `{END.format(name=name)}` line before the next block")
        found.append((name, m.end(), end.start()))
    if len(re.findall(r"^<!-- END GENERATED ", text, flags=re.M)) != len(found):
        raise ReportError(f"{rel}: an `<!-- END GENERATED … -->` line has no matching BEGIN")
    return found


def render(text: str, rel: str, made: dict[str, str]) -> str:
    """`text` with every block's inside replaced by its generated markdown (and the BEGIN line normalized)."""
    out, pos = [], 0
    for name, start, end in blocks_in(text, rel):
        if name not in BLOCKS:
            raise ReportError(f"{rel}: unknown generated block {name!r} (known: {', '.join(BLOCKS)})")
        if BLOCKS[name][0] != rel:
            raise ReportError(f"{rel}: block {name!r} belongs in {BLOCKS[name][0]}")
        begin = text.rfind("<!-- BEGIN GENERATED", 0, start)
        out += [text[pos:begin], HEADER.format(name=name), "\n", made[name], "\n"]
        pos = end
    return "".join(out) + text[pos:]


def doc_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def run(root: Path, results: Results, check: bool) -> list[str]:
    """Rewrite (or, with check, only compare) every block under `root`; returns the problems found.
    Every file is rendered before any is written, so an error leaves all of them as they were."""
    made = {name: fn(results).rstrip("\n") for name, (_, fn) in BLOCKS.items()}
    problems, seen, changed = [], set(), {}
    for path in doc_files(root):
        if not path.is_file():
            continue
        rel = str(path.relative_to(root))
        text = path.read_text()
        new = render(text, rel, made)
        seen |= {name for name, _, _ in blocks_in(text, rel)}
        if new != text:
            changed[path] = new
            stale = [n for n, s, e in blocks_in(text, rel) if text[s:e] != made[n] + "\n"]
            problems += [
                f"{rel}: block {n!r} is stale: run python bench/report.py" for n in stale or ["(its BEGIN line)"]
            ]
    missing = [
        f"{home}: block {name!r} is missing (every registered block must appear in its file)"
        for name, (home, _) in BLOCKS.items()
        if name not in seen
    ]
    if check:
        return problems + missing
    for path, new in changed.items():
        path.write_text(new)
        print(f"rewrote {path.relative_to(root)}")
    return missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 if any block is stale or unknown")
    ap.add_argument("--print", metavar="NAME", help="print one block's markdown and exit")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the result files' directory (default bench/results)")
    ap.add_argument(
        "--root", type=Path, default=ROOT, help="the directory holding README.md and docs/ (default: the repository)"
    )
    args = ap.parse_args(argv)
    results = Results(args.results)
    try:
        if args.print:
            if args.print not in BLOCKS:
                raise ReportError(f"unknown block {args.print!r} (known: {', '.join(BLOCKS)})")
            print(BLOCKS[args.print][1](results))
            return 0
        problems = run(args.root, results, args.check)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
