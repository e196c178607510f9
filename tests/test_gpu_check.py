"""bench/gpu_check.sh, the one script a (scarce) GPU session runs: its dry run (every part's Python path on CPU
at the smallest shapes) passes and returns each part's JSON, its test selection is the GPU-relevant one, and
its time limits fit the budget. The dry run runs as on the GPU machine: without the audio/WER packages it
lacks (blocked here by a sitecustomize module), so a bench script that needs one fails here, not there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
# (rich, jsonschema, matplotlib: not known to be there; bench must run without them)
NOT_ON_GPU_MACHINE = (
    "soundfile",
    "av",
    "soxr",
    "silero_vad",
    "jiwer",
    "gptqmodel",
    "optimum",
    "rich",
    "jsonschema",
    "matplotlib",
)
BUDGET_S, QUICK_BUDGET_S = 420, 180  # default parts + setup: 7 minutes; PARTS=quick: 3


def _limits() -> dict[str, int]:
    text = SCRIPT.read_text()
    limits = {m[1]: int(m[2]) for m in re.finditer(r"^LIMIT_(\w+)=\$\{LIMIT_\1:-(\d+)\}$", text, re.M)}
    assert limits, "no LIMIT_NAME=${LIMIT_NAME:-seconds} lines in gpu_check.sh"
    return limits


def _test_functions(path: Path) -> list[str]:
    return re.findall(r"^def (test_\w+)\(", path.read_text(), re.M)


def test_part_limits_fit_the_time_budget():
    text = SCRIPT.read_text()
    limits = _limits()
    default_parts = re.search(r'^PARTS="\$\{PARTS:-([a-z ]+)\}"$', text, re.M)[1].split()
    assert default_parts == ["tests", "kernels", "decode", "stream", "bench"]
    for part in default_parts:  # each default part runs under its own limit
        assert re.search(rf'run_part {part} "\$LIMIT_{part.upper()}" part_{part}$', text, re.M), part
    setup = limits["INSTALL"] + limits["DEVICE"]
    assert setup + sum(limits[p.upper()] for p in default_parts) <= BUDGET_S, limits
    assert setup + limits["QUICK_KERNELS"] + limits["QUICK_DECODE"] <= QUICK_BUDGET_S, limits


def test_script_parses_and_refuses_unknown_arguments(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "--dry-run" in r.stdout and "PARTS" in r.stdout
    assert subprocess.run(["bash", str(SCRIPT), "--dry-rum"], capture_output=True, env=env).returncode == 2
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, env={**env, "PARTS": "kernel"})
    assert r.returncode == 2  # a typo in PARTS must not silently run nothing


@pytest.mark.slow
def test_dry_run_passes_and_returns_every_parts_json(tmp_path):
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in NOT_ON_GPU_MACHINE)
    )
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")])),
    }
    env.pop("PARTS", None)
    r = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert (out / "summary.txt").is_file() and "DRY RUN" in (out / "summary.txt").read_text()

    with tarfile.open(out / "results.tgz") as t:
        files = {m.name: t.extractfile(m).read().decode() for m in t.getmembers()}
    parts = {line.split("\t")[0]: line.split("\t") for line in files["parts.tsv"].splitlines()}
    assert list(parts) == ["install", "device", "tests", "kernels", "decode", "stream", "bench"]
    assert all(p[1] == "0" for p in parts.values()), parts
    for name, key in (
        ("gpu-tests.json", "rows"),
        ("kernels.json", "rows"),
        ("decode.json", "runs"),
        ("stream.json", "rows"),
    ):
        res = json.loads(files[name])
        assert res[key], name
        assert name == "gpu-tests.json" or res["complete"] is True, name
    # Every row the dry run's arguments ask for (gpu_check.sh part_kernels/decode/stream with DRY=1).
    kernels = json.loads(files["kernels.json"])
    assert kernels["kernel"] == "triton"  # the GPU run's path
    rows = kernels["rows"]  # --shapes qkvo_256x256 --ms 1,2,64, then the whole-layer row
    assert [r["shape"] for r in rows] == ["qkvo_256x256"] * 3 + ["layer"] and [r["m"] for r in rows[:3]] == [1, 2, 64]
    decode = json.loads(files["decode.json"])
    assert decode["w4_kernels"] == ["triton"]
    assert sorted(decode["runs"]) == [  # --int8-head: the fp16 head (graphs and eager), the int8 head, transformers
        "ours_w4_float16_head",
        "ours_w4_float16_head_eager",
        "ours_w4_int8_head",
        "transformers_float16",
    ]
    assert any("breakdown" in r for r in decode["runs"].values())
    stream = json.loads(files["stream.json"])
    assert stream["w4_kernels"] == ["triton"] and [r["seconds"] for r in stream["rows"]] == [1.0]  # --lengths 1
    bench7 = json.loads(files["bench_7b.json"])  # the 7B memory plan; then bench --shape tiny, ours only (dry run)
    assert bench7["complete"] and min(r["gib"] for r in bench7["memory_plan"]["rows"]) <= 6.0
    tiny = json.loads(files["bench_tiny.json"])
    assert tiny["complete"] and {(s["engine"], s["stage"]) for s in tiny["stages"]} >= {
        ("ours", "ttft"),
        ("ours", "decode"),
    }
    tests = json.loads(files["gpu-tests.json"])
    assert tests["failed"] == tests["error"] == 0
    # The dry run's fast subset: the selection less gpu_check.sh's DRY_SKIP patterns, every one run; test_gpu.py's
    # tests skip without CUDA, all the others pass (measured: 61 selected, 29 ran, 19 skipped, 10 passed).
    ids = [line for line in files["gpu-tests-selection.txt"].splitlines() if "::" in line]
    skip_block = re.search(r"^DRY_SKIP=\((.*?)\)$", SCRIPT.read_text(), re.M | re.S)
    assert skip_block, "no DRY_SKIP=(...) in gpu_check.sh"
    dry_skip = re.findall(r"-e (\S+)", skip_block[1])
    fast = [t for t in ids if not any(s in t for s in dry_skip)]
    assert tests["selected"] == len(ids) and sorted(r["test"] for r in tests["rows"]) == sorted(fast)
    on_gpu = {t for t in fast if t.startswith("tests/test_gpu.py::")}
    assert {r["test"] for r in tests["rows"] if r["outcome"] == "skipped"} == on_gpu
    assert tests["passed"] == len(fast) - len(on_gpu) > 0

    # the selection the GPU run uses: all of test_gpu.py (and test_kernel_selfcheck.py), the Triton tests of
    # test_kernels.py and the kernel checks next to them; not the CPU-only refusal check nor the sm_90 cross-compile
    selected = {line.split("[")[0] for line in files["gpu-tests-selection.txt"].splitlines() if "::" in line}
    tests_dir = ROOT / "tests"
    expected = {f"tests/test_gpu.py::{t}" for t in _test_functions(tests_dir / "test_gpu.py")}
    if (tests_dir / "test_kernel_selfcheck.py").exists():
        expected |= {
            f"tests/test_kernel_selfcheck.py::{t}" for t in _test_functions(tests_dir / "test_kernel_selfcheck.py")
        }
    kernel_tests = _test_functions(tests_dir / "test_kernels.py")
    expected |= {
        f"tests/test_kernels.py::{t}"
        for t in kernel_tests
        if "triton" in t and "refused" not in t and "compile_for_hopper" not in t
    }
    expected |= {
        f"tests/test_kernels.py::{t}"
        for t in (
            "test_tuner_picks_the_fastest_config_that_runs_and_remembers_it",
            "test_quantlinear_paths_agree",
            "test_w4_tuning_opt_out_reaches_the_kernel",
            "test_int8_head_gemv_matches_the_chunked_reference",
            "test_fused_elementwise_kernels_match_the_torch_ops",
        )
        if t in kernel_tests
    }
    assert not expected - selected, sorted(expected - selected)
    assert not any("refused" in t or "compile_for_hopper" in t for t in selected), sorted(selected)
    assert {t.split("::")[0] for t in selected} <= {
        "tests/test_gpu.py",
        "tests/test_kernels.py",
        "tests/test_kernel_selfcheck.py",
    }
    cases = [
        line
        for line in files["gpu-tests-selection.txt"].splitlines()
        if "test_every_triton_config_matches_reference[" in line
    ]
    assert any("-32-" in c for c in cases) and any("--1-" in c for c in cases) and any("[136-" in c for c in cases), (
        cases
    )
