"""Compile every Triton kernel variant the runtime can launch, for each GPU architecture we target, on a
machine without a GPU, and report registers, spills and shared memory — so a config that cannot launch on
an RTX 3090/4090 or an A100, or that spills, is found before a (scarce) GPU session, not in it.

    python bench/compile_check.py                   # every tuner candidate × 7B shape × dtype × variant, sm_80/86/89/90
    python bench/compile_check.py --quick           # the default config of each kernel per target (CI)
    python bench/compile_check.py --arch 89         # one target (e.g. an RTX 4090)
    python bench/compile_check.py --out bench/results/compile      # also write triton-<version>/sm_<arch>.json
    python bench/compile_check.py --table bench/results/compile/triton-*   # print w4_triton.COMPILED from the results

Targets and limits: kernels/w4_triton.py GPU_LIMITS (shared memory per block, registers). What is compiled:
the W4 decode kernels (M = 1: `gemv1` and its `x_prep` launch; M = 2…8: `gemv2/4/8` by BLOCK_M) and the
prefill GEMM (M = 64, 100, 800) at the 7B decoder's linears (K×N below) with the bias the layer has: at the
default group size 128 every layer × activation dtype (fp16, bf16, fp32) × act-order on/off; the other
group sizes export offers (64, 32, per channel) at fp16 with act-order for q/k/v and down_proj (the two K);
the int8 lm_head GEMV (156032×4096) and the fused element-wise kernels in the three dtypes. A binary is
compiled once per target and reported once, with the launches it stands for (N, and M within a BLOCK_M,
reach the compiler only through Triton's integer specialization: divisibility by 16).

Exit status 1 if on any target a variant the tuner may pick there (a candidate that survives that target's
exclusion, w4_triton.fitting) fails to compile, does not fit (shared memory static + dynamic, registers ×
threads), or spills registers with fp16/bf16 activations. fp32 activations are a correctness mode: their
spills are reported, not failed. Variants the tuner leaves out on a target are compiled and reported too.
The exclusion reads w4_triton.COMPILED, generated from the full runs' results: after a candidate or
triton version changes, run the full check with each triton version (--out bench/results/compile), then
--table, and paste its output over COMPILED (tests/test_compile_targets.py checks that they agree).

Uses Triton's own compiler through its JIT binding (private API: checked with triton 3.6 and 3.9), and
cuobjdump (bundled with Triton) for the cubin's resource usage. Placeholder CPU tensors stand in for the
arguments: only their dtypes and alignment matter to the compiler. Runs with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton

from qwen_audio_edge.kernels import fused_triton as F
from qwen_audio_edge.kernels import int8_triton as I8
from qwen_audio_edge.kernels import w4_triton as W

ARCHS = tuple(W.GPU_LIMITS)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The 7B decoder's W4 linears as the runtime runs them: name, K, N, bias (Qwen2 has q/k/v biases only).
# Fused projections by default; the separate ones with --no-fuse.
LINEARS = (
    ("qkv_proj", 4096, 12288, True),
    ("o_proj", 4096, 4096, False),
    ("gate_up_proj", 4096, 22016, False),
    ("down_proj", 11008, 4096, False),
    ("q/k/v_proj --no-fuse", 4096, 4096, True),
    ("gate/up_proj --no-fuse", 4096, 11008, False),
)
GROUPS = (128, 64, 32, -1)  # export --group-size; -1: one group per column (per channel)
DECODE_MS = tuple(range(1, W.DECODE_MAX_M + 1))
PREFILL_MS = (64, 100, 800)  # Triton specializes M on divisibility by 16: 100 stands for every other length
HEAD = (156032, 4096)  # the int8 lm_head, N × K
HIDDEN, HEADS, HEAD_DIM, INTERMEDIATE = 4096, 32, 128, 11008


def compile_for(jitfn, args: tuple, kwargs: dict, arch: int):
    """triton.compile of jitfn bound to these arguments for CUDA sm_<arch> (no device needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jitfn.signature, jitfn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jitfn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(jitfn, signature, constexprs, attrs), target=target, options=options.__dict__)


@dataclass
class Usage:
    """Resources of one compiled binary: registers and stack (spills) per thread from cuobjdump, shared
    memory static (cubin) + dynamic (Triton's allocation, passed at launch)."""

    regs: int | None
    stack: int | None
    shared: int
    shared_static: int
    threads: int

    @classmethod
    def of(cls, kernel) -> Usage:
        dynamic, threads = kernel.metadata.shared, kernel.metadata.num_warps * 32
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if not os.path.exists(cuobjdump):
            return cls(None, None, dynamic, 0, threads)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.cubin")
            Path(path).write_bytes(kernel.asm["cubin"])
            out = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        num = {key: int(v) for key, v in re.findall(r"\b(REG|STACK|SHARED):(\d+)", out)}
        return cls(num.get("REG"), num.get("STACK"), dynamic + num.get("SHARED", 0), num.get("SHARED", 0), threads)

    @property
    def spilled(self) -> bool:
        return bool(self.stack)  # spilled registers live in the stack frame

    def fits(self, limits: W.GpuLimits) -> bool:
        return limits.fits(self.shared, self.regs or 0, self.threads)

    def text(self) -> str:
        return f"regs={self.regs if self.regs is not None else '?'} stack(spill)={self.stack} B shared={self.shared} B"


@dataclass
class Variant:
    """One launch the runtime can make: the kernel with its arguments, the tuner config it came from and
    the candidate list the tuner picks from on a target (None: launched whenever the runtime runs it)."""

    kernel: str  # gemv1, x_prep, gemv2/4/8 (BLOCK_M), gemm, int8, rms_norm, rope_kv_cache, silu_mul
    label: str  # kernel, config, dtype and flags: what the binary depends on
    launch: str  # the runtime launch this stands for (layer, K×N, M, group)
    dtype: torch.dtype
    fn: object
    args: tuple
    kwargs: dict
    config: object = None
    candidates: Callable[[int], tuple] | None = None

    def may_pick(self, arch: int) -> bool:
        return self.candidates is None or self.config in self.candidates(arch)


def _e(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _w4_args(k: int, n: int, gs: int) -> tuple:
    """Packed weight, scales, zeros of a K×N layer with group size gs (placeholders)."""
    return _e(k // 8, n, dtype=torch.int32), _e(k // gs, n), _e(k // gs, n // 8, dtype=torch.int32)


def gemv1_variants(layer, gs: int, c: W.GemvConfig, dt, perm: bool, cands) -> Iterator[Variant]:
    """`_w4_gemv1_kernel` (+ `_x_prep_kernel`) as TritonW4Weight._gemv launches them for one row."""
    name, k, n, bias = layer
    qw, s, z = _w4_args(k, n, gs)
    tiles = triton.cdiv(k, c.block_k)
    per = triton.cdiv(tiles, c.split_k)
    split = triton.cdiv(tiles, per)
    x2, out = _e(1, k, dtype=dt), _e(1, n, dtype=dt)
    x = _e(tiles * c.block_k, dtype=torch.float32) if c.x_prep else x2
    perm_arg = _e(k, dtype=torch.int32) if perm else x2  # as the runtime passes them (unused pointers too)
    ws = _e(W.SPLIT_MAX, n, dtype=torch.float32) if split > 1 else out
    args = (
        x,
        perm_arg,
        qw,
        s,
        z,
        _e(n, dtype=dt) if bias else out,
        out,
        ws,
        _e(triton.cdiv(n, W.COUNTER_BLOCK), dtype=torch.int32),
        n,
        k,
        per,
        W.MAGIC,
    )
    kw = dict(
        GS=gs,
        HAS_PERM=perm and not c.x_prep,
        X_PREP=c.x_prep,
        HAS_BIAS=bias,
        BLOCK_N=c.block_n,
        BLOCK_K=c.block_k,
        SPLIT_K=split,
        NUM_STAGES=c.num_stages,
        num_warps=c.num_warps,
    )
    launch = f"{name} {k}x{n} m=1 group={gs}"
    flags = f"perm={kw['HAS_PERM']} bias={bias} GS={gs} split={split}"
    yield Variant("gemv1", f"gemv1 {c} {_name(dt)} {flags}", launch, dt, W._w4_gemv1_kernel, args, kw, c, cands)
    if c.x_prep:
        prep_args = (x2, perm_arg, x, k, tiles * c.block_k)
        yield Variant(
            "x_prep",
            f"x_prep bk={c.block_k} {_name(dt)} perm={perm}",
            launch,
            dt,
            W._x_prep_kernel,
            prep_args,
            dict(HAS_PERM=perm, BLOCK_K=c.block_k, BLOCK=1024),
            c,
            cands,
        )


def gemv_variant(layer, gs: int, m: int, c: W.GemvConfig, dt, perm: bool, cands) -> Variant:
    """`_w4_gemv_kernel` for 2–8 rows (no split-K)."""
    name, k, n, bias = layer
    bm = triton.next_power_of_2(m)
    qw, s, z = _w4_args(k, n, gs)
    x, out = _e(m, k, dtype=dt), _e(m, n, dtype=dt)
    args = (
        x,
        _e(k, dtype=torch.int32) if perm else x,
        qw,
        s,
        z,
        _e(n, dtype=dt) if bias else out,
        out,
        out,
        _e(triton.cdiv(n, W.COUNTER_BLOCK), dtype=torch.int32),
        m,
        n,
        k,
        gs,
        k,
        n,
        triton.cdiv(k, c.block_k),
    )
    kw = dict(
        HAS_PERM=perm,
        HAS_BIAS=bias,
        TILE_IN_GROUP=gs % c.block_k == 0,
        BLOCK_M=bm,
        BLOCK_N=c.block_n,
        BLOCK_K=c.block_k,
        SPLIT_K=1,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )
    flags = f"perm={perm} bias={bias} in_group={kw['TILE_IN_GROUP']}"
    rows = f"{bm // 2 + 1}-{bm}" if bm > 2 else "2"  # the M that share this BLOCK_M
    return Variant(
        f"gemv{bm}",
        f"gemv m={rows} {c} {_name(dt)} {flags}",
        f"{name} {k}x{n} m={m} group={gs}",
        dt,
        W._w4_gemv_kernel,
        args,
        kw,
        c,
        cands,
    )


def gemm_variant(layer, gs: int, m: int, c: W.GemmConfig, dt, cands) -> Variant:
    """`_w4_gemm_kernel` on prefill_columns' activations (act-order is in the gather, not the kernel)."""
    name, k, n, bias = layer
    kp = triton.cdiv(k, W.GEMM_BLOCK_K) * W.GEMM_BLOCK_K
    qw, s, z = _w4_args(k, n, gs)
    out = _e(m, n, dtype=dt)
    args = (_e(m, kp, dtype=dt), qw, s, z, _e(n, dtype=dt) if bias else out, out, m, n, k, gs, kp, n)
    kw = dict(
        HAS_BIAS=bias,
        TILE_IN_GROUP=gs % c.block_k == 0,
        IEEE=dt == torch.float32,
        EMULATE_BF16=False,
        BLOCK_M=c.block_m,
        BLOCK_N=c.block_n,
        BLOCK_K=c.block_k,
        GROUP_M=c.group_m,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )
    flags = f"bias={bias} in_group={kw['TILE_IN_GROUP']}"
    return Variant(
        "gemm",
        f"gemm {c} {_name(dt)} {flags}",
        f"{name} {k}x{n} m={m} group={gs}",
        dt,
        W._w4_gemm_kernel,
        args,
        kw,
        c,
        cands,
    )


def w4_settings(quick: bool) -> Iterator[tuple[tuple, int, torch.dtype, tuple[bool, ...]]]:
    """(layer, group size, activation dtype, act-order values) to compile. Full: every layer × dtype ×
    act-order at the default group size 128; the other group sizes (they change BLOCK_K of the one-row
    GEMV and the scale loads of the others) at fp16 with act-order, for the two K (q/k/v with its bias,
    down_proj). Quick: q/k/v with act-order and o_proj without, fp16, group 128."""
    if quick:
        yield LINEARS[0], 128, torch.float16, (True,)
        yield LINEARS[1], 128, torch.float16, (False,)
        return
    for layer in LINEARS:
        for dt in DTYPES:
            yield layer, 128, dt, (True, False)
    for g in GROUPS[1:]:
        for layer in (LINEARS[0], LINEARS[3]):
            yield layer, g, torch.float16, (True,)


def w4_variants(arch: int, quick: bool) -> Iterator[Variant]:
    """Every W4 launch of the 7B decoder (w4_settings); quick: the default config on this target only."""
    for layer, g, dt, perms in w4_settings(quick):
        k = layer[1]
        gs = k if g == -1 else g
        for m in (1, 2, 8) if quick else DECODE_MS:
            bm = triton.next_power_of_2(m)

            def cands(a, bm=bm, gs=gs, k=k, dt=dt):
                return W.gemv_candidates(bm, gs, k, a, dt)

            for c in cands(arch)[:1] if quick else cands(None):
                for perm in perms:
                    if bm == 1:
                        yield from gemv1_variants(layer, gs, c, dt, perm, cands)
                    else:
                        yield gemv_variant(layer, gs, m, c, dt, perm, cands)
        for m in PREFILL_MS:

            def cands(a, m=m, dt=dt):
                return W.gemm_candidates(m, a, dt)

            for c in cands(arch)[:1] if quick else cands(None):
                yield gemm_variant(layer, gs, m, c, dt, cands)


def int8_variants(arch: int, quick: bool) -> Iterator[Variant]:
    n, k = HEAD
    for dt in (torch.float16,) if quick else DTYPES:

        def cands(a, dt=dt):
            return I8.int8_candidates(a, dt)

        for c in cands(arch)[:1] if quick else cands(None):
            args = (
                _e(1, k, dtype=dt),
                _e(n, k, dtype=torch.int8),
                _e(n, dtype=torch.float32),
                _e(1, n, dtype=dt),
                n,
                k,
            )
            yield Variant(
                "int8",
                f"int8 {c} {_name(dt)}",
                f"lm_head {k}x{n} m=1",
                dt,
                I8._int8_gemv_kernel,
                args,
                dict(BLOCK_N=c.block_n, BLOCK_K=c.block_k, num_warps=c.num_warps, num_stages=c.num_stages),
                c,
                cands,
            )


def fused_variants(quick: bool) -> Iterator[Variant]:
    """The fused element-wise kernels as fused_triton's wrappers launch them at the 7B's sizes (decode and
    prefill rows share a binary: the row count is the grid)."""
    for dt in (torch.float16,) if quick else DTYPES:
        x = _e(1, HIDDEN, dtype=dt)
        for delta in (True, False):
            yield Variant(
                "rms_norm",
                f"rms_norm {_name(dt)} delta={delta}",
                f"hidden {HIDDEN}",
                dt,
                F._rms_norm_kernel,
                (x, x, _e(HIDDEN, dtype=dt), x, x, HIDDEN, 1e-6),
                dict(HAS_DELTA=delta, BLOCK=triton.next_power_of_2(HIDDEN), num_warps=8),
            )
        width = 3 * HEADS * HEAD_DIM
        qkv = _e(1, width, dtype=dt)
        # decode step: position in a device tensor (CUDA graphs); prefill: a Python int, which Triton
        # specializes (1, a multiple of 16, other), as it does the cache length (--max-context)
        for from_ptr, start in ((True, 0), (False, 0), (False, 1), (False, 7)):
            for max_ctx in (4096, 3000):
                cache = _e(1, HEADS, max_ctx, HEAD_DIM, dtype=dt)
                pos = _e(1, dtype=torch.int64) if from_ptr else qkv
                yield Variant(
                    "rope_kv_cache",
                    f"rope_kv_cache {_name(dt)} pos_from_ptr={from_ptr}",
                    f"qkv {width} start={'tensor' if from_ptr else start} max_context={max_ctx}",
                    dt,
                    F._rope_cache_kernel,
                    (
                        qkv,
                        _e(1, HEAD_DIM, dtype=dt),
                        _e(1, HEAD_DIM, dtype=dt),
                        cache,
                        cache,
                        pos,
                        start,
                        width,
                        HEADS,
                        HEADS,
                        max_ctx,
                    ),
                    dict(POS_FROM_PTR=from_ptr, HALF=HEAD_DIM // 2, BLOCK_H=16),
                )
        yield Variant(
            "silu_mul",
            f"silu_mul {_name(dt)}",
            f"gate_up {2 * INTERMEDIATE}",
            dt,
            F._silu_mul_kernel,
            (_e(1, 2 * INTERMEDIATE, dtype=dt), _e(1, INTERMEDIATE, dtype=dt), INTERMEDIATE),
            dict(BLOCK=1024),
        )


def variants(arch: int, quick: bool) -> Iterator[Variant]:
    yield from w4_variants(arch, quick)
    yield from int8_variants(arch, quick)
    yield from fused_variants(quick)


@dataclass
class Row:
    """One compiled binary on one target and every launch it stands for."""

    kernel: str
    label: str
    dtype: str
    config: dict | None
    usage: Usage | None = None
    error: str | None = None
    may_pick: bool = False
    launches: list = field(default_factory=list)

    def status(self, limits: W.GpuLimits) -> str:
        if self.error:
            return "FAIL"
        if not self.usage.fits(limits):
            return "NOFIT"
        return "SPILL" if self.usage.spilled else "OK"

    def fatal(self, limits: W.GpuLimits) -> bool:
        """A launch the tuner may make on this target that cannot run, or spills outside the fp32 mode (the
        rule w4_triton.fits_target applies to the compiled figures)."""
        st = self.status(limits)
        return self.may_pick and (st in ("FAIL", "NOFIT") or (st == "SPILL" and self.dtype != "float32"))


def _compile_share(arch: int, quick: bool, jobs: int, share: int) -> list[Row]:
    """Compile this process's share of the binaries (every jobs-th label) for sm_<arch>. Each process
    builds the variants itself: their placeholder tensors are not worth pickling (the int8 head's is 0.6 GB)."""
    labels = list(dict.fromkeys(v.label for v in variants(arch, quick)))
    mine = set(labels[share::jobs])
    rows: dict[tuple, Row] = {}
    for v in variants(arch, quick):
        if v.label not in mine:
            continue
        try:
            kernel = compile_for(v.fn, v.args, v.kwargs, arch)  # a repeat is a ~1 ms hit in Triton's cache
            key, err = (v.label, kernel.metadata.hash), None
        except Exception as e:
            kernel, key = None, (v.label, None)
            err = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:400]}"
        row = rows.get(key)
        if row is None:
            config = dataclasses.asdict(v.config) if v.config is not None else None
            row = rows[key] = Row(v.kernel, v.label, _name(v.dtype), config, Usage.of(kernel) if kernel else None, err)
        row.may_pick |= v.may_pick(arch)
        row.launches.append(v.launch)
    order = {label: i for i, label in enumerate(labels)}
    return sorted(rows.values(), key=lambda r: order[r.label])


def check_target(arch: int, quick: bool, jobs: int = 1) -> tuple[list[Row], float]:
    """Every binary for sm_<arch>, compiled by `jobs` processes, in the order variants() yields them."""
    t0 = time.perf_counter()
    if jobs == 1:
        rows = _compile_share(arch, quick, 1, 0)
    else:
        with ProcessPoolExecutor(jobs) as pool:
            parts = list(pool.map(_compile_share, [arch] * jobs, [quick] * jobs, [jobs] * jobs, range(jobs)))
        labels = list(dict.fromkeys(v.label for v in variants(arch, quick)))
        order = {label: i for i, label in enumerate(labels)}
        rows = sorted((r for part in parts for r in part), key=lambda r: order[r.label])
    return rows, time.perf_counter() - t0


def summarize(rows: list[Row], limits: W.GpuLimits) -> dict:
    compiled = [r for r in rows if not r.error]
    picked = [r for r in rows if r.may_pick]
    return {
        "binaries": len(rows),
        "compiled": len(compiled),
        "failed": sum(r.fatal(limits) for r in rows),
        "compile_errors": sum(bool(r.error) for r in picked),
        "no_fit": sum(r.may_pick and r.status(limits) == "NOFIT" for r in rows),
        "excluded": sum(not r.may_pick for r in rows),
        # excluded binaries within the target's shared memory and registers: left out for a spill (here or
        # in another launch or triton version of the same config), or for a limit another launch exceeds
        "excluded_but_fit": sum(not r.may_pick and not r.error and r.usage.fits(limits) for r in rows),
        "spills": sum(r.may_pick and r.status(limits) == "SPILL" and r.dtype != "float32" for r in rows),
        "spills_fp32": sum(r.may_pick and r.status(limits) == "SPILL" and r.dtype == "float32" for r in rows),
        "max_shared_picked": max((r.usage.shared for r in picked if r.usage), default=0),
        "max_regs_picked": max((r.usage.regs or 0 for r in picked if r.usage), default=0),
        "shared_above_estimate": sum(_above_estimate(r) for r in compiled),
    }


def _above_estimate(row: Row) -> bool:
    """Compiled shared memory above w4_triton.estimate_shared (the estimate is meant as an upper bound)."""
    if row.config is None or row.kernel == "x_prep":
        return False
    cls = {"int8": I8.Int8GemvConfig, "gemm": W.GemmConfig}.get(row.kernel, W.GemvConfig)
    return row.usage.shared > W.estimate_shared(row.kernel, cls(**row.config), getattr(torch, row.dtype))


def _launches(row: Row) -> str:
    return (
        ", ".join(dict.fromkeys(row.launches))
        if len(row.launches) <= 3
        else (f"{row.launches[0]} … {len(row.launches)} launches")
    )


def triton_cache_dir() -> Path:
    home = Path(os.environ.get("TRITON_HOME", Path.home()))
    return Path(os.environ.get("TRITON_CACHE_DIR", home / ".triton" / "cache"))


def report(arch: int, rows: list[Row], seconds: float, quick: bool, cold: bool) -> dict:
    limits = W.GPU_LIMITS[arch]
    print(
        f"== sm_{arch} ({limits.gpus}): {limits.shared_per_block} B shared memory per block, "
        f"{limits.regs_per_block} registers per block",
        flush=True,
    )
    for r in rows:
        st = r.status(limits)
        detail = r.error if r.error else r.usage.text()
        tail = "" if r.may_pick else "  [excluded on this target]"
        print(f"{st:<5} {r.label}  {detail}  ({_launches(r)}){tail}", flush=True)
    summary = summarize(rows, limits)
    return {
        "target": dataclasses.asdict(limits),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "quick": quick,
        "seconds": round(seconds, 1),  # wall time of this target's compiles (cold: Triton's cache was empty)
        "cold_cache": cold,
        "summary": summary,
        "variants": [
            {
                "kernel": r.kernel,
                "label": r.label,
                "dtype": r.dtype,
                "config": r.config,
                "status": r.status(limits),
                "may_pick": r.may_pick,
                "fatal": r.fatal(limits),
                "error": r.error,
                **(dataclasses.asdict(r.usage) if r.usage else {}),
                "launches": r.launches,
            }
            for r in rows
        ],
    }


def print_table(results: dict[int, dict]) -> None:
    head = (
        f"{'target':<8}{'binaries':>9}{'failed':>7}{'no fit':>7}{'excluded':>9}{'spills':>7}{'fp32 spills':>12}"
        f"{'max shared':>11}{'max regs':>9}{'seconds':>8}"
    )
    print(head)
    for arch, res in results.items():
        s = res["summary"]
        print(
            f"sm_{arch:<5}{s['binaries']:>9}{s['failed']:>7}{s['no_fit']:>7}{s['excluded']:>9}{s['spills']:>7}"
            f"{s['spills_fp32']:>12}{s['max_shared_picked']:>11}{s['max_regs_picked']:>9}{res['seconds']:>8}"
        )


def compiled_table(paths: list[str]) -> str:
    """w4_triton.COMPILED from full-run result files: per tuner kernel, config and activation dtype, per
    target, the largest shared memory and spill over every launch and every file (triton version)."""
    table: dict[tuple, dict[int, tuple[int, int]]] = defaultdict(dict)
    for path in paths:
        res = json.loads(Path(path).read_text())
        if res["quick"]:
            continue
        arch = res["target"]["arch"]
        for v in res["variants"]:
            if v["config"] is None or v["kernel"] == "x_prep" or v.get("shared") is None:
                continue
            key = (v["kernel"], tuple(v["config"].values()), v["dtype"])
            shared, spill = table[key].get(arch, (0, 0))
            table[key][arch] = (max(shared, v["shared"]), max(spill, v["stack"] or 0))
    lines = ["COMPILED: dict[tuple[str, tuple, str], dict[int, tuple[int, int]]] = {"]
    for key in sorted(table, key=lambda k: (k[0], k[2], k[1])):
        lines.append(f"    {key!r}: {dict(sorted(table[key].items()))},")
    return "\n".join(lines + ["}"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the default config of each kernel per target, fp16")
    ap.add_argument(
        "--arch",
        default=",".join(map(str, ARCHS)),
        help="compute capabilities × 10, comma-separated (default: %(default)s)",
    )
    ap.add_argument("--jobs", type=int, default=1, help="compiler processes per target (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="write <OUT>/triton-<version>/sm_<arch>.json")
    ap.add_argument(
        "--table", nargs="+", metavar="DIR", help="print w4_triton.COMPILED from result dirs; compiles nothing"
    )
    a = ap.parse_args(argv)
    if a.table:
        print(compiled_table(sorted(p for d in a.table for p in glob.glob(os.path.join(d, "sm_*.json")))))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("TRITON_INTERPRET is set: the kernels would be interpreted functions, not compilable ones")
    archs = [int(x) for x in a.arch.split(",")]
    unknown = [x for x in archs if x not in W.GPU_LIMITS]
    if unknown:
        ap.error(f"no limits for sm_{unknown[0]}: targets are {', '.join(map(str, ARCHS))} (w4_triton.GPU_LIMITS)")
    cold = not any(triton_cache_dir().glob("*"))
    t0 = time.perf_counter()
    done = [check_target(arch, a.quick, a.jobs) for arch in archs]
    results = {arch: report(arch, rows, secs, a.quick, cold) for arch, (rows, secs) in zip(archs, done, strict=True)}
    print_table(results)
    total = {
        k: sum(r["summary"][k] for r in results.values())
        for k in ("compile_errors", "no_fit", "spills", "failed", "excluded", "spills_fp32", "shared_above_estimate")
    }
    print(
        f"{total['compile_errors']} failed to compile, {total['no_fit']} do not fit, {total['spills']} spill "
        f"(fp16/bf16) among the variants the tuner may pick; {total['excluded']} excluded by target, "
        f"{total['spills_fp32']} fp32 spills (correctness mode), {total['shared_above_estimate']} above the "
        f"shared-memory estimate; {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    if a.out:
        d = a.out / f"triton-{triton.__version__}"
        d.mkdir(parents=True, exist_ok=True)
        for arch, res in results.items():
            (d / f"sm_{arch}.json").write_text(json.dumps(res, indent=1) + "\n")
    return 1 if total["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
