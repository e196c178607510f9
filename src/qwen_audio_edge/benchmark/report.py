"""Views of a bench result: terminal tables (rich when installed, plain text otherwise), the JSON schema
the result must satisfy, and the plot (stage breakdown + latency vs audio length, matplotlib).

All three read only the result dict, so a committed JSON can be re-rendered without re-measuring.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..runtime.errors import OptionsError

SCHEMA_ID = "qwen-audio-edge/bench/v1"
TTFT_STAGES = ("audio_decode", "mel", "encoder", "prefill", "ttft")

_NUM = {"type": ["number", "null"]}
_SAMPLE = {
    "type": "object",
    "required": ["engine", "stage", "audio_s", "new_tokens", "unit", "median", "p90", "samples"],
    "properties": {
        "engine": {"type": "string"},
        "stage": {"type": "string"},
        "audio_s": _NUM,
        "new_tokens": {"type": ["integer", "null"]},
        "unit": {"enum": ["ms", "tok/s", "x"]},
        "median": {"type": "number"},
        "p90": {"type": "number"},
        "samples": {"type": "array", "items": {"type": "number"}, "minItems": 1},
    },
}
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "qwen-audio-edge bench result",
    "type": "object",
    "required": ["schema", "created_utc", "git_commit", "versions", "device", "config", "model", "complete"],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "created_utc": {"type": "string"},
        "command": {"type": "string"},
        "git_commit": {"type": ["string", "null"]},
        "versions": {"type": "object", "required": ["python", "torch"]},
        "device": {"type": "object", "required": ["device", "cpu", "cores_available"]},
        "config": {"type": "object", "required": ["seconds", "new_tokens", "repeats", "baselines", "threads"]},
        "model": {"type": "object", "required": ["source", "artifacts_bytes", "decoder"]},
        "agreement": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["audio_s", "baseline", "tokens_compared", "identical", "near_tie_at"],
            },
        },
        "stages": {"type": "array", "items": _SAMPLE},
        "memory": {"type": "object"},
        "roofline": {"type": ["object", "null"]},
        "cold_start": {"type": "array", "items": {"type": "object", "required": ["engine"]}},
        "llama_cpp": {"type": ["object", "null"]},
        "memory_plan": {"type": ["object", "null"]},
        "notes": {"type": "array", "items": {"type": "string"}},
        "complete": {"type": "boolean"},
        "wall_s": {"type": "number"},
    },
}


def validate(result: dict) -> None:
    """Raise jsonschema's ValidationError if `result` does not follow SCHEMA."""
    import jsonschema

    jsonschema.validate(result, SCHEMA)


def _fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "–"
    if unit == "x":
        return f"{x:.3f}"
    return f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def tables(result: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows) of each table: one place decides what the terminal shows."""
    stages = result.get("stages", [])
    engines = list(dict.fromkeys(s["engine"] for s in stages))
    index = {(s["engine"], s["stage"], s["audio_s"], s["new_tokens"]): s for s in stages}
    lengths = sorted({s["audio_s"] for s in stages if s["audio_s"] is not None})
    baselines = [e for e in engines if e != "ours"]

    def cell(engine: str, stage: str, secs, n=None) -> str:
        s = index.get((engine, stage, secs, n))
        return f"{_fmt(s['median'], s['unit'])} [{_fmt(s['p90'], s['unit'])}]" if s else "–"

    def ratio(stage: str, secs, n=None, higher_is_better: bool = False) -> str:
        ours = index.get(("ours", stage, secs, n))
        best = [index[k]["median"] for b in baselines if (k := (b, stage, secs, n)) in index]
        if not ours or not best:
            return "–"
        ref = max(best) if higher_is_better else min(best)
        return f"{ours['median'] / ref:.2f}×" if ref else "–"

    out = []
    rows = []
    for secs in lengths:
        for stage in TTFT_STAGES:
            if any((e, stage, secs, None) in index for e in engines):
                rows.append([f"{secs:g} s", stage, *[cell(e, stage, secs) for e in engines], ratio(stage, secs)])
    out.append(
        (
            "Time to first token by stage, ms: median [p90]; ratio = ours / fastest baseline (< 1: we are faster)",
            ["audio", "stage", *engines, "ratio"],
            rows,
        )
    )
    answer_keys = sorted({(s["audio_s"], s["new_tokens"]) for s in stages if s["new_tokens"] is not None})
    rows = []
    for secs, n in answer_keys:
        rows.append(
            [
                f"{secs:g} s",
                str(n),
                "decode tok/s",
                *[cell(e, "decode", secs, n) for e in engines],
                ratio("decode", secs, n, True),
            ]
        )
        rows.append(
            [
                f"{secs:g} s",
                str(n),
                "real-time factor",
                *[cell(e, "rtf", secs, n) for e in engines],
                ratio("rtf", secs, n),
            ]
        )
    out.append(
        (
            "Answers: decode tokens/s and end-to-end real-time factor (wall / audio)",
            ["audio", "tokens", "metric", *engines, "ratio"],
            rows,
        )
    )
    encoders = sorted({s["stage"] for s in stages if s["stage"].startswith("encoder[")})
    if encoders:
        rows = [[f"{secs:g} s", *[cell("ours", e, secs) for e in encoders]] for secs in lengths]
        out.append(("Our encoders, ms: median [p90]", ["audio", *[e[8:-1] for e in encoders]], rows))
    if result.get("cold_start"):
        rows = [
            [
                c["engine"],
                _fmt(c.get("ready_ms"), "ms"),
                _fmt(c.get("first_token_ms"), "ms"),
                _fmt(c.get("peak_rss_mib"), "ms"),
                c.get("error", ""),
            ]
            for c in result["cold_start"]
        ]
        out.append(
            (
                "Cold start: process start → ready / first token (ms), peak RSS (MiB); our artifacts on disk: "
                f"{result['model'].get('artifacts_bytes', 0) / 2**20:,.1f} MiB",
                ["engine", "ready", "first token", "peak RSS", "note"],
                rows,
            )
        )
    roof = result.get("roofline")
    if roof:
        rows = [
            [
                r["engine"],
                f"{r['bytes_per_token'] / 2**20:,.1f}",
                _fmt(r["tok_s"], "tok/s"),
                f"{r['achieved_gbps']:.1f}",
                f"{r['percent_of_measured']:.0f} %",
            ]
            for r in roof["rows"]
        ]
        title = f"Roofline: decode bytes per token vs bandwidth ({roof['measured']['kind']}: {roof['measured']['gbps']} GB/s)"
        out.append((title, ["engine", "MiB/token", "tok/s", "GB/s", "of measured"], rows))
    llama = result.get("llama_cpp") or {}
    if llama.get("rows"):
        rows = [[r["engine"], r["test"], _fmt(r.get("tokens_per_s"), "tok/s")] for r in llama["rows"]]
        out.append(("llama-bench beside our decoder (same weights): tokens/s", ["engine", "test", "tok/s"], rows))
    if llama.get("end_to_end"):
        rows = [
            [
                f"{r['audio_s']:g} s",
                r["engine"],
                str(r.get("prompt_tokens")),
                _fmt(r.get("encode_ms"), "ms"),
                _fmt(r.get("ttft_ms"), "ms"),
                _fmt(r.get("ours_ttft_ms"), "ms"),
                _fmt(r.get("wall_ms"), "ms"),
            ]
            for r in llama["end_to_end"]
        ]
        out.append(
            (
                "llama-mtmd-cli end to end (a cold process each) vs our warm TTFT, ms",
                ["audio", "engine", "prompt tokens", "encode", "TTFT", "ours TTFT", "process wall"],
                rows,
            )
        )
    if agree := llama.get("text_only_agreement"):
        rows = [["yes" if agree["identical"] else "no", str(agree["common_prefix_chars"]), str(len(agree["ours"]))]]
        out.append(
            (
                "llama.cpp F16 vs ours, text-only greedy answer",
                ["identical", "common prefix (chars)", "our length"],
                rows,
            )
        )
    mem = result.get("memory_plan")
    if mem and mem.get("rows"):
        rows = [[r["name"], f"{r['gib']:.2f}"] for r in mem["rows"]]
        out.append((f"Memory plan: {mem.get('title', '')}", ["configuration", "GiB"], rows))
    return [t for t in out if t[2]]  # a table without rows (e.g. no timings in a memory-only run) is left out


def print_tables(result: dict, file=None) -> None:
    file = file or sys.stdout
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        for title, headers, rows in tables(result):
            print(f"\n{title}", file=file)
            widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
            for row in [headers, *rows]:
                print("  ".join(str(x).rjust(w) for x, w in zip(row, widths, strict=False)), file=file)
        return
    console = Console(file=file, width=max(120, Console(file=file).width))
    for title, headers, rows in tables(result):
        t = Table(title=escape(title), title_justify="left")  # "[p90]" is text, not rich markup
        for h in headers:
            t.add_column(escape(h), justify="right")
        for row in rows:
            t.add_row(*map(escape, row))
        console.print(t)


def plot(result: dict, out: Path) -> None:
    """Left: our stage breakdown of TTFT per audio length (stacked). Right: TTFT vs length, every engine."""
    try:
        import matplotlib
    except ImportError as e:
        raise OptionsError("--plot needs matplotlib: pip install matplotlib (it is in the [dev] extra)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = result["stages"]
    lengths = sorted({s["audio_s"] for s in stages if s["stage"] == "ttft"})
    med = {(s["engine"], s["stage"], s["audio_s"]): s["median"] for s in stages if s["new_tokens"] is None}
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    bottom = [0.0] * len(lengths)
    for stage in TTFT_STAGES[:-1]:
        vals = [med.get(("ours", stage, x), 0.0) for x in lengths]
        a.bar([str(x) for x in lengths], vals, bottom=bottom, label=stage)
        bottom = [u + v for u, v in zip(bottom, vals, strict=True)]
    rest = [max(0.0, med.get(("ours", "ttft", x), 0.0) - u) for x, u in zip(lengths, bottom, strict=True)]
    a.bar([str(x) for x in lengths], rest, bottom=bottom, label="first token + other")
    a.set(title="ours: time to first token by stage", xlabel="audio (s)", ylabel="ms")
    a.legend(fontsize=8)
    for engine in dict.fromkeys(s["engine"] for s in stages):
        ys = [med.get((engine, "ttft", x)) for x in lengths]
        pts = [(x, y) for x, y in zip(lengths, ys, strict=True) if y is not None]
        if pts:
            b.plot(*zip(*pts, strict=True), marker="o", label=engine)
    b.set(title="time to first token vs audio length", xlabel="audio (s)", ylabel="ms (median)")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    dev = result["device"]
    fig.suptitle(f"qwen-audio-edge bench: {result['model']['source']} on {dev.get('gpu') or dev['cpu']}", fontsize=10)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(out)
