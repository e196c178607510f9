"""Triton launch configs per GPU architecture (issue #11): on each target (sm_80, sm_86, sm_89, sm_90) the
tuner's candidate lists leave out what bench/compile_check.py measured not to fit (shared memory, spilled
registers), keep at least one config for every shape class, and the default configs compile for sm_80 and
sm_89 within their limits. The committed compile results are the source of w4_triton.COMPILED.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from dataclasses import astuple
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is in the dev extra")

from qwen_audio_edge.kernels import int8_triton as I8
from qwen_audio_edge.kernels import w4_triton as W

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "bench" / "results" / "compile"
ACTIVATIONS = (torch.float16, torch.bfloat16, torch.float32)
CONSUMER = (86, 89)  # 99 KB of shared memory per block
SMALL_SHARED = 99 * 1024


def _compile_check():
    spec = importlib.util.spec_from_file_location("compile_check", ROOT / "bench" / "compile_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compile_check"] = module  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _shape_classes(arch: int | None, dtype: torch.dtype) -> dict[tuple[str, str], tuple]:
    """Every candidate list the runtime asks for at the 7B's shapes, keyed (kernel, description): decode
    rows 1/2/4/8 for group sizes 128, 64, 32 and per channel (group = K), prefill M 9/64/800, the int8 head."""
    out = {}
    for group, k in ((128, 4096), (128, 11008), (64, 4096), (32, 11008), (4096, 4096), (11008, 11008)):
        for bm in (1, 2, 4, 8):
            kernel = f"gemv{bm}"  # gemv1: the one-row kernel; gemv2/4/8: the small-batch one at that BLOCK_M
            out[kernel, f"rows={bm} group={group} K={k}"] = W.gemv_candidates(bm, group, k, arch, dtype)
    for m in (9, 64, 800):
        out["gemm", f"M={m}"] = W.gemm_candidates(m, arch, dtype)
    out["int8", "lm_head"] = I8.int8_candidates(arch, dtype)
    return out


def test_limits_follow_the_cuda_table():
    """Shared memory per block (opt-in) and the register rule: 255 per thread, 64 K per block, allocated
    8 per thread (a warp's 256)."""
    assert {a: lim.shared_per_block for a, lim in W.GPU_LIMITS.items()} == {
        80: 166912,
        86: 101376,
        89: 101376,
        90: 232448,
    }
    lim = W.GPU_LIMITS[89]
    assert lim.fits(101376, 255, 256) and not lim.fits(101377)
    assert not lim.fits(0, 255, 512) and not lim.fits(0, 256, 32)
    assert W.device_arch(torch.device("cpu")) is None


@pytest.mark.parametrize("arch", sorted(W.GPU_LIMITS))
def test_every_target_keeps_a_fitting_candidate_for_every_shape_class(arch):
    """Each kept candidate fits the target by the compiled figures (no empty list, no fallback), in the
    order of the unfiltered list, which is what the tuner sees without a device (arch None)."""
    for dtype in ACTIVATIONS:
        full = _shape_classes(None, dtype)
        for (kernel, shape), cands in _shape_classes(arch, dtype).items():
            assert cands, (arch, dtype, kernel, shape)
            assert all(W.fits_target(kernel, c, dtype, arch) for c in cands), (arch, dtype, kernel, shape, cands)
            assert cands == tuple(c for c in full[kernel, shape] if c in cands)


def test_over_99_kb_excluded_on_consumer_gpus_kept_on_hopper():
    """A prefill config compiled to more than 99 KB of shared memory on sm_86/89 is not offered there, and
    is on sm_90 where it fits 227 KB: each target offers exactly the configs whose compiled figures fit it
    (spills tolerated with fp32 activations only)."""
    over = []
    for dtype in ACTIVATIONS:
        name = str(dtype).removeprefix("torch.")
        for c in W.GEMM_CANDIDATES:
            measured = W.COMPILED["gemm", astuple(c), name]
            for arch in (*CONSUMER, 90):
                shared, spill = measured[arch]
                fits = shared <= W.GPU_LIMITS[arch].shared_per_block and (not spill or dtype == torch.float32)
                assert (c in W.gemm_candidates(800, arch, dtype)) == fits, (arch, c, name, measured[arch])
            if all(measured[a][0] > SMALL_SHARED for a in CONSUMER) and c in W.gemm_candidates(800, 90, dtype):
                over.append((c, name))
    assert over, "no prefill config above 99 KB and kept on sm_90: the exclusion is not exercised"
    assert any(name != "float32" for _, name in over)  # not only the fp32 correctness mode


def test_estimate_decides_for_a_config_not_compiled():
    """A config COMPILED lacks is judged by its shared-memory estimate; a list is never emptied."""
    big = W.GemmConfig(64, 128, num_warps=8, num_stages=4)
    small = W.GEMM_CANDIDATES[1]
    assert ("gemm", astuple(big), "float16") not in W.COMPILED
    assert SMALL_SHARED < W.estimate_shared("gemm", big) <= W.GPU_LIMITS[90].shared_per_block
    assert W.fitting("gemm", (big, small), 86, torch.float16) == (small,)
    assert W.fitting("gemm", (big, small), 90, torch.float16) == (big, small)
    assert W.fitting("gemm", (big,), 89, torch.float16) == (big,)  # nothing fits: the smallest is kept


def test_unknown_arch_gets_the_smallest_limits_with_one_warning():
    W.gpu_limits.cache_clear()
    with pytest.warns(UserWarning, match="sm_120"):
        lim = W.gpu_limits(120)
    assert lim.shared_per_block == SMALL_SHARED
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        W.gpu_limits(120)
    for dtype in ACTIVATIONS:
        unknown, consumer = _shape_classes(120, dtype), [_shape_classes(a, dtype) for a in CONSUMER]
        for key, cands in unknown.items():
            assert all(c in lists[key] for lists in consumer for c in cands), key


def test_committed_compile_results_pass_and_generate_the_table():
    """bench/results/compile: a full run for every target with each triton version, 0 failures among
    the configs the tuner may pick; w4_triton.COMPILED is exactly what --table derives from them."""
    cc = _compile_check()
    paths = sorted(str(p) for p in RESULTS.glob("triton-*/sm_*.json"))
    assert paths
    for version_dir in {Path(p).parent for p in paths}:
        runs = {
            json.loads(p.read_text())["target"]["arch"]: json.loads(p.read_text())
            for p in version_dir.glob("sm_*.json")
        }
        assert sorted(runs) == sorted(W.GPU_LIMITS), version_dir
        for arch, run in runs.items():
            assert not run["quick"] and run["summary"]["failed"] == 0, (version_dir.name, arch, run["summary"])
            assert run["target"]["shared_per_block"] == W.GPU_LIMITS[arch].shared_per_block
    table: dict = {}
    exec(cc.compiled_table(paths), {}, table)
    assert table["COMPILED"] == W.COMPILED


def test_default_configs_compile_for_ampere_and_ada(tmp_path):
    """The default config of every kernel on sm_80 (A100) and sm_89 (RTX 40xx) compiles, without spills,
    within the target's shared memory. In a subprocess: the tests' TRITON_INTERPRET=1 turns kernels into
    interpreted functions."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError:
        pytest.skip("this triton's compiler internals differ from the ones bench/compile_check.py binds to")
    out = tmp_path / "compile"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = ROOT / "bench" / "compile_check.py"
    r = subprocess.run(
        [sys.executable, str(script), "--quick", "--arch", "80,89", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (version_dir,) = out.iterdir()
    for arch in (80, 89):
        run = json.loads((version_dir / f"sm_{arch}.json").read_text())
        limit = W.GPU_LIMITS[arch].shared_per_block
        kernels = {v["kernel"] for v in run["variants"]}
        assert kernels == {"gemv1", "x_prep", "gemv2", "gemv8", "gemm", "int8", "rms_norm", "rope_kv_cache", "silu_mul"}
        for v in run["variants"]:
            assert v["status"] == "OK" and v["may_pick"] and v["shared"] <= limit, (arch, v["label"], v["status"])
