"""Compile every Triton kernel variant the runtime can launch for a GPU architecture, on a machine without
a GPU, and report registers, spills and shared memory (ptxas) — so compile errors and register spills are
found before a (scarce) GPU session, not in it.

    python bench/compile_check.py              # every tuner candidate × dtype × bias/act-order, sm_90
    python bench/compile_check.py --quick      # the default config of each kernel (what CI runs)
    python bench/compile_check.py --arch 89    # another target (e.g. an RTX 4090)

Uses Triton's own compiler through its JIT binding (private API: checked with triton 3.6 and 3.9), and
cuobjdump (bundled with Triton) for the cubin's resource usage. Exit status 1 if any variant fails to
compile; spills are reported (fp32 activations spill in the prefill GEMM: a correctness mode, not fast). Placeholder CPU tensors stand in for the arguments: only their
dtypes and alignment matter to the compiler.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Iterator

import torch
import triton

from qwen_audio_edge.kernels import fused_triton as F
from qwen_audio_edge.kernels import int8_triton as I8
from qwen_audio_edge.kernels import w4_triton as W


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


def resource_report(kernel) -> tuple[str, bool]:
    """(registers / local memory (spills) / shared memory of the compiled cubin, spilled?) via cuobjdump."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    shared = f"shared={kernel.metadata.shared}"
    if not os.path.exists(cuobjdump):
        return shared, False
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        open(path, "wb").write(kernel.asm["cubin"])
        out = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    spilled = bool(stack and int(stack.group(1)))  # spilled registers live in the stack frame
    return f"regs={regs.group(1) if regs else '?'} stack(spill)={stack.group(1) if stack else '?'} B {shared}", spilled


def _e(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype)


def variants(quick: bool) -> Iterator[tuple[str, object, tuple, dict]]:
    """(label, kernel, args, kwargs) for what TritonW4Weight / int8_gemv / fused_triton launch at 7B shapes."""
    n, group = 4096, 128
    dtypes = (torch.float16,) if quick else (torch.float16, torch.bfloat16, torch.float32)
    for k in (4096,) if quick else (4096, 11008):
        cands = W.gemv_candidates(1, group, k)
        for c in cands[:1] if quick else cands:
            for dt in dtypes:
                for perm, bias in ((True, True), (False, False)):
                    tiles = triton.cdiv(k, c.block_k)
                    per = triton.cdiv(tiles, c.split_k)
                    split = triton.cdiv(tiles, per)
                    x = _e(tiles * c.block_k, dtype=torch.float32) if c.x_prep else _e(1, k, dtype=dt)
                    out = _e(1, n, dtype=dt)
                    args = (x, _e(k, dtype=torch.int32), _e(k // 8, n, dtype=torch.int32), _e(k // group, n),
                            _e(k // group, n // 8, dtype=torch.int32), _e(n) if bias else out, out,
                            _e(W.SPLIT_MAX, n, dtype=torch.float32), _e(n // 16, dtype=torch.int32), n, k, per, W.MAGIC)
                    kw = dict(GS=group, HAS_PERM=perm and not c.x_prep, X_PREP=c.x_prep, HAS_BIAS=bias,
                              BLOCK_N=c.block_n, BLOCK_K=c.block_k, SPLIT_K=split, NUM_STAGES=c.num_stages,
                              num_warps=c.num_warps)
                    yield f"gemv1 k={k} {c} {dt} perm={perm} bias={bias}", W._w4_gemv1_kernel, args, kw
                    if c.x_prep and dt == dtypes[0] and bias:
                        yield (f"x_prep k={k} bk={c.block_k}", W._x_prep_kernel,
                               (_e(1, k, dtype=dt), _e(k, dtype=torch.int32), x, k, tiles * c.block_k),
                               dict(HAS_PERM=perm, BLOCK_K=c.block_k, BLOCK=1024))
    for m in (2, 8):
        bm = triton.next_power_of_2(m)
        cands = W.gemv_candidates(bm, group, 4096)
        for c in cands[:1] if quick else cands:
            x, out = _e(m, 4096), _e(m, n)
            args = (x, _e(4096, dtype=torch.int32), _e(512, n, dtype=torch.int32), _e(32, n), _e(32, n // 8, dtype=torch.int32),
                    out, out, out, _e(n // 16, dtype=torch.int32), m, n, 4096, group, 4096, n, triton.cdiv(4096, c.block_k))
            kw = dict(HAS_PERM=True, HAS_BIAS=False, TILE_IN_GROUP=group % c.block_k == 0, BLOCK_M=bm, BLOCK_N=c.block_n,
                      BLOCK_K=c.block_k, SPLIT_K=1, num_warps=c.num_warps, num_stages=c.num_stages)
            yield f"gemv m={m} {c}", W._w4_gemv_kernel, args, kw
    for m in (64, 800):
        cands = W.gemm_candidates(m)
        for c in cands[:1] if quick else cands:
            for dt in dtypes:
                out = _e(m, n, dtype=dt)
                args = (_e(m, 4096, dtype=dt), _e(512, n, dtype=torch.int32), _e(32, n), _e(32, n // 8, dtype=torch.int32),
                        out, out, m, n, 4096, group, 4096, n)
                kw = dict(HAS_BIAS=False, TILE_IN_GROUP=True, IEEE=dt == torch.float32, EMULATE_BF16=False,
                          BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
                          num_warps=c.num_warps, num_stages=c.num_stages)
                yield f"gemm m={m} {c} {dt}", W._w4_gemm_kernel, args, kw
    for c in I8.INT8_CANDIDATES[:1] if quick else I8.INT8_CANDIDATES:
        for dt in dtypes:
            args = (_e(1, 4096, dtype=dt), _e(156032, 4096, dtype=torch.int8), _e(156032, dtype=torch.float32),
                    _e(1, 156032, dtype=dt), 156032, 4096)
            yield f"int8 {c} {dt}", I8._int8_gemv_kernel, args, dict(BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                                                                    num_warps=c.num_warps, num_stages=c.num_stages)
    for dt in dtypes:
        x = _e(1, 4096, dtype=dt)
        for delta in (True, False):
            yield (f"rms_norm {dt} delta={delta}", F._rms_norm_kernel, (x, x, _e(4096, dtype=dt), x, x, 4096, 1e-6),
                   dict(HAS_DELTA=delta, BLOCK=4096, num_warps=8))
        cache = _e(1, 32, 4096, 128, dtype=dt)
        yield (f"rope_kv_cache {dt}", F._rope_cache_kernel,
               (_e(1, 12288, dtype=dt), _e(1, 128, dtype=dt), _e(1, 128, dtype=dt), cache, cache, _e(1, dtype=torch.int64),
                0, 12288, 32, 32, 4096), dict(POS_FROM_PTR=True, HALF=64, BLOCK_H=16))
        yield f"silu_mul {dt}", F._silu_mul_kernel, (_e(1, 22016, dtype=dt), _e(1, 11008, dtype=dt), 11008), dict(BLOCK=1024)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="default configs only")
    ap.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90 = H100/H200)")
    a = ap.parse_args(argv)
    failed = spilled = 0
    for label, fn, args, kw in variants(a.quick):
        try:
            kernel = compile_for(fn, args, kw, a.arch)
        except Exception as e:  # noqa: BLE001 — report every failure, then exit non-zero
            failed += 1
            print(f"FAIL {label}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:400]}", flush=True)
            continue
        report, spill = resource_report(kernel)
        spilled += spill
        print(f"{'SPILL' if spill else 'OK   '} {label}  {report}", flush=True)
    print(f"{failed} failed to compile, {spilled} spill registers to local memory", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
