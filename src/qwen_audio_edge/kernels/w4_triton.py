"""Triton W4A16 kernels over the GPTQ layout: a split-K GEMV for decode (M ≤ 8) and a tiled tensor-core
GEMM for prefill (M > 8), each one launch per linear (bias and output cast fused in).

Why it is built this way (batch-1 decode is bound by the bytes of weights read):
- Layout, repacked once at load (`TritonW4Weight.build`): with act-order the K rows are sorted by group,
  so group g owns rows g·GS … (g+1)·GS−1 and scales/zeros are read once per tile, not per row. The
  activations are gathered through the same permutation inside the kernel (no weight gather and no
  extra launch per call). The artifact on disk keeps the standard GPTQ format.
- Each packed int32 is loaded once and unpacked with shifts (`for j in static_range(8)`), never loaded
  once per nibble. A nibble becomes fp32 without an int→float conversion instruction (a quarter-rate
  unit on Hopper): q | 0x4B000000 read as fp32 is 2²³ + q exactly, and subtracting 2²³ + zero gives the
  exact integer q − zero.
- Decode, one row (`_w4_gemv1_kernel`): per nibble one LOP3, one FADD, one FFMA (see its docstring),
  the scale once per tile, tile loads software-pipelined; optionally a small launch first gathers and
  pre-scales the activations (`_x_prep_kernel`, config `x_prep`), which the tuner weighs against the
  in-kernel gather. 2–8 rows (`_w4_gemv_kernel`): CUDA-core FMAs into a [M, K-rows, N] accumulator.
  Split-K spreads a 4096-wide layer over more SMs. The split partial sums are reduced deterministically inside the same launch:
  each program writes its partial to a workspace, takes a ticket from a per-column-block counter, and
  the last one sums the partials in split order, adds the bias, stores in the output dtype and resets
  the counter (so no memset and no second kernel, which in a CUDA-graph decode step would cost a graph
  node per linear; and the result does not depend on which program finished first).
- Prefill (M > 8): the 8 nibble positions of a 128-row tile are stacked j-major into one [128, N]
  operand, matching the order `prefill_columns` gave the activations, so each tile is one MMA
  (fp32 accumulation); grouped program order for L2 reuse.
- Tile shapes, split and warps are chosen per problem by `Tuner` on the device (timed with L2 flushed
  between runs) from small candidate lists; every candidate is tested on CPU under TRITON_INTERPRET=1,
  and bench/compile_check.py compiles every variant for sm_80, sm_86, sm_89 and sm_90 without a GPU. On
  each GPU the lists leave out what was compiled not to fit it (GPU_LIMITS, COMPILED: shared memory per
  block — 99 KB on RTX 30xx/40xx — and registers, i.e. spills), so the untuned default always launches.

Shapes/dtypes: x [..., K] fp16/bf16/fp32 on the weights' device → y [..., N] in x's dtype.
qweight int32 [K/8, N], qzeros int32 [G, N/8], scales fp16 [G, N]; K % GS == 0, GS % 8 == 0, N % 8 == 0.
Tested on CPU under TRITON_INTERPRET=1 (small shapes) against kernels/w4_ref.py; timed on GPUs by
bench/kernel_bench.py (bench/gpu_check.sh).
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import warnings
from collections.abc import Callable
from dataclasses import astuple, dataclass, field, replace
from typing import TypeVar

import torch
import triton
import triton.language as tl

from .w4_ref import check_shapes, pack_rows, unpack_rows

DECODE_MAX_M = 8
SPLIT_MAX = 8  # the workspace holds SPLIT_MAX × N fp32 partial sums (split-K is used for M = 1 only)
MAGIC = 0x4B000000  # fp32 bits of 2^23: OR-ing a small integer q into the mantissa gives 2^23 + q
GEMM_BLOCK_K = 128  # the prefill activation layout is built for this tile depth (see prefill_columns)
COUNTER_BLOCK = 16  # smallest BLOCK_N: one ticket counter per 16 output columns covers every config
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
C = TypeVar("C")  # a launch config type that Tuner.choose picks among (GemvConfig, GemmConfig, Int8GemvConfig)


@dataclass(frozen=True)
class GemvConfig:
    """Decode kernel launch shape: BLOCK_N output columns × BLOCK_K input rows per tile, SPLIT_K programs along K."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    x_prep: bool = False  # one row: gather/scale the activations in a small launch first (see _x_prep_kernel)


@dataclass(frozen=True)
class GemmConfig:
    """Prefill kernel launch shape. BLOCK_K is fixed at 128 (the activation layout is built for it): each
    MMA takes the 16 packed rows' nibble j, and tl.dot needs ≥ 16 along K."""

    block_m: int
    block_n: int
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8


# Candidates the tuner times (the first one is the untuned default). Small on purpose: each compiles once
# per dtype/bias/act-order variant (Triton's disk cache keeps them), and tuning happens once per shape.
# One row (decode proper), `_w4_gemv1_kernel`: BLOCK_K is fitted to the group size (tiles never straddle
# groups). With and without the activation prep launch, and split-K for the 4096-wide layers.
# Compiled for sm_90 with triton 3.6 (no GPU run): the x_prep configs with 16 packed ints per thread take
# 10.6 SASS instructions per weight byte in the loop, the in-kernel gather 15–18 (perm loads per nibble).
ROW_CANDIDATES: tuple[GemvConfig, ...] = (
    GemvConfig(64, 128, 4, 2, 3, x_prep=True),
    GemvConfig(128, 128, 1, 4, 3, x_prep=True),
    GemvConfig(64, 128, 1, 2, 3, x_prep=True),
    GemvConfig(64, 128, 2, 2, 3, x_prep=True),
    GemvConfig(64, 128, 1, 4, 3),
    GemvConfig(128, 128, 4, 4, 3, x_prep=True),
    GemvConfig(64, 128, 8, 2, 4, x_prep=True),
    GemvConfig(32, 128, 8, 2, 4, x_prep=True),
    GemvConfig(64, 128, 4, 4, 4),
    GemvConfig(128, 128, 2, 4, 3),
)
# Two to eight rows, `_w4_gemv_kernel` (any group layout; no split-K). BLOCK_K = 256 spilled registers
# with triton 3.6 at 2 and 8 rows (bench/compile_check.py), so tiles stay at ≤ 128 rows.
GEMV_CANDIDATES: tuple[GemvConfig, ...] = (
    GemvConfig(64, 128, 1, 4, 3),
    GemvConfig(32, 128, 1, 4, 4),
    GemvConfig(128, 128, 1, 8, 3),
    GemvConfig(32, 64, 1, 2, 3),
)
GEMM_CANDIDATES: tuple[GemmConfig, ...] = (
    GemmConfig(64, 64, num_warps=4, num_stages=3),
    GemmConfig(16, 64, num_warps=4, num_stages=3),
    GemmConfig(32, 128, num_warps=4, num_stages=3),
    GemmConfig(64, 128, num_warps=8, num_stages=3),
    GemmConfig(128, 128, num_warps=8, num_stages=2),
)


@dataclass(frozen=True)
class GpuLimits:
    """What one CUDA architecture grants a thread block, as far as a launch config can exceed it. A config
    over a limit compiles but cannot launch (Triton raises OutOfResources at load), so the candidate lists
    leave it out on that architecture: inside a CUDA-graph capture, and with `--no-w4-tune`, the first
    candidate runs untimed and must launch."""

    arch: int  # compute capability × 10 (86 = 8.6)
    gpus: str
    shared_per_block: int  # bytes of shared memory one block may use, static + dynamic (the opt-in maximum)
    regs_per_thread: int = 255
    regs_per_block: int = 65536

    def fits(self, shared: int, regs: int = 0, threads: int = 0) -> bool:
        """Whether a kernel using `shared` bytes (static + dynamic), `regs` registers per thread and
        `threads` per block can launch. Registers are allocated per warp in units of 256 (8 per thread)."""
        regs_allocated = -(-regs // 8) * 8
        return (
            shared <= self.shared_per_block
            and regs <= self.regs_per_thread
            and regs_allocated * threads <= self.regs_per_block
        )


# CUDA C++ Programming Guide, 5.1 "Compute Capabilities", Table 31 "Memory Information per Compute
# Capability" (https://docs.nvidia.com/cuda/cuda-programming-guide/05-appendices/compute-capabilities.html):
# maximum shared memory per thread block 163 KB on 8.0, 99 KB on 8.6 and 8.9, 227 KB on 9.0 (1 KB of each
# SM's 164/100/228 KB is reserved for the system); 64 K 32-bit registers per SM and per thread block, and at
# most 255 per thread, on all four. bench/compile_check.py compiles every variant for these targets.
GPU_LIMITS: dict[int, GpuLimits] = {
    lim.arch: lim
    for lim in (
        GpuLimits(80, "A100, A30", 163 * 1024),
        GpuLimits(86, "RTX 30xx, A10, A40, RTX A-series", 99 * 1024),
        GpuLimits(89, "RTX 40xx, L4, L40, RTX Ada", 99 * 1024),
        GpuLimits(90, "H100, H200", 227 * 1024),
    )
}


@functools.cache
def gpu_limits(arch: int) -> GpuLimits:
    """The limits of compute capability `arch` (× 10). An architecture nothing was compiled for gets the
    smallest limits of the table (99 KB of shared memory: right for 12.x consumer Blackwell, cautious for
    8.7 Orin's 163 KB), with one warning per architecture."""
    if arch in GPU_LIMITS:
        return GPU_LIMITS[arch]
    smallest = min(GPU_LIMITS.values(), key=lambda lim: lim.shared_per_block)
    warnings.warn(
        f"Triton kernel configs were not compiled for sm_{arch} (bench/compile_check.py covers "
        f"{', '.join(f'sm_{a}' for a in GPU_LIMITS)}): using sm_{smallest.arch}'s limits, "
        f"{smallest.shared_per_block} B of shared memory per block",
        stacklevel=2,
    )
    return replace(smallest, arch=arch, gpus="unknown")


@functools.cache
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def device_arch(device: torch.device) -> int | None:
    """Compute capability × 10 of a CUDA device (89 for an RTX 4090); None off CUDA, where no limit applies
    (the CPU interpreter runs every config)."""
    if device.type != "cuda":
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def estimate_shared(kernel: str, config, dtype: torch.dtype = torch.float16) -> int:
    """An upper bound of a config's shared memory in bytes, for a config COMPILED lacks (a new candidate
    before bench/compile_check.py has measured it). Triton keeps NUM_STAGES − 1 tiles of the loop's loads
    in flight in shared memory; the prefill GEMM also stages its dot operands there. compile_check counts
    the compiled variants above their estimate."""
    act = torch.finfo(dtype).bits // 8
    if kernel == "int8":
        return config.num_stages * config.block_n * config.block_k * (1 + act) + 1024
    if kernel.startswith("gemv"):  # gemv<BLOCK_M>
        rows = int(kernel.removeprefix("gemv"))
        per_stage = config.block_k // 8 * config.block_n * 8 + config.block_k * rows * 4
        return config.num_stages * per_stage + 1024
    if kernel == "gemm":
        per_stage = config.block_m * config.block_k * act + config.block_k // 8 * config.block_n * 4 * 2
        return config.num_stages * per_stage + config.block_k * config.block_n * 4 + 1024
    raise ValueError(f"no shared-memory estimate for kernel {kernel!r}")


def fits_target(kernel: str, config, dtype: torch.dtype, arch: int) -> bool:
    """Whether `config` of `kernel` can launch on sm_<arch> without spilling: by its compiled figures
    (COMPILED; for an architecture nothing was compiled for, the worst over those that were), else by the
    shared-memory estimate. Spills are tolerated with fp32 activations only, a correctness mode."""
    limits = gpu_limits(arch)
    measured = COMPILED.get((kernel, astuple(config), _dtype_name(dtype)))
    if not measured:
        return limits.fits(estimate_shared(kernel, config, dtype))
    shared, spill = measured.get(arch) or tuple(map(max, zip(*measured.values(), strict=True)))
    return limits.fits(shared) and (spill == 0 or dtype == torch.float32)


def fitting(kernel: str, candidates: tuple, arch: int | None, dtype: torch.dtype) -> tuple:
    """The candidates that fit sm_<arch> (fits_target), in their order; every candidate when arch is None.
    Never empty: if none fits, the one with the smallest shared-memory estimate."""
    if arch is None:
        return candidates
    kept = tuple(c for c in candidates if fits_target(kernel, c, dtype, arch))
    return kept or (min(candidates, key=lambda c: estimate_shared(kernel, c, dtype)),)


def fit_block_k(block_k: int, group: int, k: int) -> int:
    """The largest BLOCK_K ≤ block_k (a power of two ≥ 8) whose tiles lie within one group."""
    if group == k:
        return block_k
    b = block_k
    while b > 8 and group % b:
        b //= 2
    return b


@functools.cache  # asked at every call (the tuner's key lookup comes after): ~100 µs uncached
def gemv_candidates(
    block_m: int, group: int = 128, k: int = 0, arch: int | None = None, dtype: torch.dtype = torch.float16
) -> tuple[GemvConfig, ...]:
    """Decode candidates for BLOCK_M rows on sm_<arch> (every one when arch is None). One row:
    ROW_CANDIDATES with BLOCK_K fitted to the group (kernel "gemv1"). More rows (kernel "gemv<BLOCK_M>": what
    spills differs with BLOCK_M): no split-K (the workspace is SPLIT_MAX × N) and tiles small enough that
    the [BLOCK_M, BLOCK_K/8, BLOCK_N] accumulator stays in registers."""
    if block_m == 1:
        fitted = (replace(c, block_k=fit_block_k(c.block_k, group, k)) for c in ROW_CANDIDATES)
        return fitting("gemv1", tuple(dict.fromkeys(fitted)), arch, dtype)
    out = tuple(c for c in GEMV_CANDIDATES if c.split_k == 1 and block_m * (c.block_k // 8) * c.block_n <= 8192)
    return fitting(f"gemv{block_m}", out or (GemvConfig(32, 64, 1, 4, 2),), arch, dtype)


def gemm_candidates(m: int, arch: int | None = None, dtype: torch.dtype = torch.float16) -> tuple[GemmConfig, ...]:
    """Prefill candidates for M rows on sm_<arch> (every one when arch is None): no tile much taller than M."""
    return _gemm_candidates(max(16, triton.next_power_of_2(m)), arch, dtype)


@functools.cache
def _gemm_candidates(tallest: int, arch: int | None, dtype: torch.dtype) -> tuple[GemmConfig, ...]:
    return fitting("gemm", tuple(c for c in GEMM_CANDIDATES if c.block_m <= tallest), arch, dtype)


@triton.jit
def _w4_gemv1_kernel(
    x_ptr,
    perm_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    N,
    K,
    TILES_PER_SPLIT,
    MAGIC,
    GS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    X_PREP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """One activation row, tiles within one group (GS % BLOCK_K == 0 or one group): the decode kernel.

    Per nibble: one LOP3 (mask the nibble in place and set the exponent bits: 2^23 + q·16^i for nibble
    i of a half-word), one FADD (minus 2^23 + zero·16^i: exact (q − zero)·16^i) and one FFMA against the
    activation pre-scaled by 16^−i (exact: powers of two). The upper half-word costs one shift per int32;
    the scale is applied once per tile; the tile loop is software-pipelined (NUM_STAGES loads in flight).
    """
    P: tl.constexpr = BLOCK_K // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_p = tl.arange(0, P)
    z_shift = (offs_n % 8) * 4
    acc = tl.zeros((P, BLOCK_N), dtype=tl.float32)
    t0 = pid_k * TILES_PER_SPLIT
    for t in tl.range(t0, tl.minimum(t0 + TILES_PER_SPLIT, tl.cdiv(K, BLOCK_K)), num_stages=NUM_STAGES):
        rows = t * P + offs_p
        r_mask = rows < K // 8
        packed = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0)
        g = (t * BLOCK_K) // GS
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zp = tl.load(z_ptr + g * (N // 8) + offs_n // 8, mask=n_mask, other=0)
        zf = (((zp >> z_shift) & 0xF) + 1).to(tl.float32)
        hi = packed >> 16
        tile = tl.zeros((P, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(8):
            if X_PREP:  # fp32, gathered, pre-scaled and in tile order by _x_prep_kernel: contiguous loads
                x = tl.load(x_ptr + t * BLOCK_K + j * P + offs_p)
            else:
                kk = rows * 8 + j
                if HAS_PERM:
                    kk = tl.load(perm_ptr + kk, mask=r_mask, other=0)
                x = tl.load(x_ptr + kk, mask=r_mask, other=0.0).to(tl.float32) * (1.0 / (16 ** (j % 4)))
            half = packed if j < 4 else hi
            # MAGIC (0x4B000000) arrives as a kernel argument so that mask-and-or stays one LOP3 (an
            # instruction takes one immediate; two constants would split it in two)
            qf = ((half & (0xF << (4 * (j % 4)))) | MAGIC).to(tl.float32, bitcast=True)
            zc = 8388608.0 + zf * (16 ** (j % 4))
            tile += x[:, None] * (qf - zc[None, :])
        acc += tile * s[None, :]
    part = tl.sum(acc, axis=0)
    if SPLIT_K == 1:
        if HAS_BIAS:
            part += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, part, mask=n_mask)
    else:
        tl.store(ws_ptr + pid_k * N + offs_n, part, mask=n_mask)
        tl.debug_barrier()  # every thread's partial is written before the ticket (release) is taken
        ticket = tl.atomic_add(cnt_ptr + pid_n, 1)
        if ticket == SPLIT_K - 1:  # the last program of this column block reduces, in split order
            y = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for sk in tl.static_range(SPLIT_K):
                y += tl.load(ws_ptr + sk * N + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs_n, y, mask=n_mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)  # ready for the next call (and for CUDA-graph replays)


@triton.jit
def _x_prep_kernel(x_ptr, perm_ptr, out_ptr, K, KP, HAS_PERM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[t·BLOCK_K + j·P + p] = x[perm[t·BLOCK_K + 8p + j]] · 16^−(j mod 4) in fp32, zeros past K: the decode
    kernel's activations for X_PREP (one small launch instead of a gather per nibble position in the GEMV)."""
    P: tl.constexpr = BLOCK_K // 8
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r = i % BLOCK_K
    j = r // P
    kk = (i - r) + (r % P) * 8 + j
    valid = (kk < K) & (i < KP)
    if HAS_PERM:
        kk = tl.load(perm_ptr + kk, mask=valid, other=0)
    x = tl.load(x_ptr + kk, mask=valid, other=0.0).to(tl.float32)
    scale = tl.where(j % 4 == 0, 1.0, tl.where(j % 4 == 1, 1.0 / 16, tl.where(j % 4 == 2, 1.0 / 256, 1.0 / 4096)))
    tl.store(out_ptr + i, x * scale, mask=i < KP)


@triton.jit
def _w4_gemv_kernel(
    x_ptr,
    perm_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    GS,
    stride_xm,
    stride_om,
    TILES_PER_SPLIT,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    TILE_IN_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    P: tl.constexpr = BLOCK_K // 8  # packed rows per tile
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_p = tl.arange(0, P)
    z_shift = (offs_n % 8) * 4
    if BLOCK_M == 1:  # decode proper: a plain 2-D accumulator, one activation vector
        acc = tl.zeros((P, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, P, BLOCK_N), dtype=tl.float32)
    t0 = pid_k * TILES_PER_SPLIT
    for t in range(t0, tl.minimum(t0 + TILES_PER_SPLIT, tl.cdiv(K, BLOCK_K))):
        rows = t * P + offs_p
        r_mask = rows < K // 8
        w_mask = r_mask[:, None] & n_mask[None, :]
        packed = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=w_mask, other=0)
        if TILE_IN_GROUP:  # the whole tile lies in one group: one row of scales/zeros
            g = (t * BLOCK_K) // GS
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            zp = tl.load(z_ptr + g * (N // 8) + offs_n // 8, mask=n_mask, other=0)
            zb = ((zp >> z_shift) & 0xF) | 0x4B000000
            zc = (zb.to(tl.float32, bitcast=True) + 1.0)[None, :]  # 2^23 + zero
        else:
            g = (rows * 8) // GS
            s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=w_mask, other=0.0).to(tl.float32)
            zp = tl.load(z_ptr + g[:, None] * (N // 8) + (offs_n // 8)[None, :], mask=w_mask, other=0)
            zb = ((zp >> z_shift[None, :]) & 0xF) | 0x4B000000
            zc = zb.to(tl.float32, bitcast=True) + 1.0
        for j in tl.static_range(8):
            kk = rows * 8 + j
            if HAS_PERM:
                kk = tl.load(perm_ptr + kk, mask=r_mask, other=0)
            qf = (((packed >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
            w = (qf - zc) * s  # exact (q − zero), then the scale
            if BLOCK_M == 1:
                x = tl.load(x_ptr + kk, mask=r_mask, other=0.0).to(tl.float32)
                acc += x[:, None] * w
            else:
                x = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0
                ).to(tl.float32)
                acc += x[:, :, None] * w[None, :, :]
    if BLOCK_M == 1:
        part = tl.sum(acc, axis=0)[None, :]
    else:
        part = tl.sum(acc, axis=1)
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            part += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], part, mask=out_mask)
    else:
        tl.store(ws_ptr + (pid_k * BLOCK_M + offs_m[:, None]) * N + offs_n[None, :], part, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the ticket (release) is taken
        ticket = tl.atomic_add(cnt_ptr + pid_n, 1)
        if ticket == SPLIT_K - 1:  # the last program of this column block reduces, in split order
            y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for sk in tl.static_range(SPLIT_K):
                y += tl.load(
                    ws_ptr + (sk * BLOCK_M + offs_m[:, None]) * N + offs_n[None, :],
                    mask=out_mask,
                    other=0.0,
                    cache_modifier=".cg",
                )
            if HAS_BIAS:
                y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y, mask=out_mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)  # ready for the next call (and for CUDA-graph replays)


@triton.jit
def _w4_gemm_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    GS,
    stride_xm,
    stride_om,
    HAS_BIAS: tl.constexpr,
    TILE_IN_GROUP: tl.constexpr,
    IEEE: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    P: tl.constexpr = BLOCK_K // 8
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n  # GROUP_M row blocks sweep the columns together: their weight tiles stay in L2
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_p = tl.arange(0, P)
    offs_k = tl.arange(0, BLOCK_K)
    shifts = tl.arange(0, 8) * 4
    z_shift = (offs_n % 8) * 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(tl.cdiv(K, BLOCK_K)):
        rows = t * P + offs_p
        r_mask = rows < K // 8
        w_mask = r_mask[:, None] & n_mask[None, :]
        packed = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=w_mask, other=0)
        if TILE_IN_GROUP:
            g = (t * BLOCK_K) // GS
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, None, :]
            zp = tl.load(z_ptr + g * (N // 8) + offs_n // 8, mask=n_mask, other=0)
            zc = ((((zp >> z_shift) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) + 1.0)[None, None, :]
        else:
            g = (rows * 8) // GS
            s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=w_mask, other=0.0).to(tl.float32)[None, :, :]
            zp = tl.load(z_ptr + g[:, None] * (N // 8) + (offs_n // 8)[None, :], mask=w_mask, other=0)
            zc = ((((zp >> z_shift[None, :]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) + 1.0)[None, :, :]
        # the 8 nibble positions stacked j-major, [8, P, BN] → [BLOCK_K, BN]: row j·P + p is kernel row 8p + j,
        # the order in which `prefill_columns` laid out the activations, so one MMA takes the whole tile
        qf = (((packed[None, :, :] >> shifts[:, None, None]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + (t * BLOCK_K + offs_k)[None, :], mask=m_mask[:, None], other=0.0
        )
        w = tl.reshape(((qf - zc) * s).to(x.dtype), (BLOCK_K, BLOCK_N))
        if EMULATE_BF16:  # CPU interpreter: its bf16 dot is wrong; bf16 products are exact in fp32
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE or EMULATE_BF16:  # fp32 activations: full-precision products (tl.dot would otherwise use TF32)
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=m_mask[:, None] & n_mask[None, :])


def on_device(t: torch.Tensor):
    """Context that makes t's GPU the current one: Triton launches on the current device, so without it a
    model on cuda:1 would have its kernels sent to cuda:0."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def cold_l2_seconds(fn: Callable[[], None], reps: int = 10, flush_mib: int = 256) -> float:
    """Median device seconds of fn() with the L2 cache flushed before each run (a write of flush_mib,
    more than twice an H100/H200 L2). The flush keeps the device busy while fn is enqueued, so the CUDA
    events bracket the kernel, not the Python launch."""
    fn()
    torch.cuda.synchronize()
    flush = torch.empty(flush_mib << 20, dtype=torch.int8, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3


@dataclass(eq=False)  # identity semantics: one shared cache object
class Tuner:
    """Picks a launch config per problem by timing every candidate once on the device; remembers the
    choice for the process. Candidates that fail to compile (e.g. too much shared memory on a small GPU)
    are skipped. Inside a CUDA-graph capture nothing can be timed: an untuned problem then gets the
    default (first) candidate, not remembered, so the next eager call still tunes."""

    measure: Callable[[Callable[[], None]], float] = cold_l2_seconds
    choices: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)  # key → [(config, seconds or None)] for reports

    def choose(self, key: tuple, candidates: tuple[C, ...], run: Callable[[C], None]) -> C:
        if key in self.choices:
            return self.choices[key]
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return candidates[0]
        results: list[tuple[C, float | None]] = []
        last_error: Exception | None = None
        for cfg in candidates:
            try:
                results.append((cfg, self.measure(functools.partial(run, cfg))))
            except Exception as e:
                last_error = e
                results.append((cfg, None))
        timed = [(t, i) for i, (_, t) in enumerate(results) if t is not None]
        if not timed:
            raise RuntimeError(f"no Triton kernel config ran for {key[0]} {key[1:]}: {last_error}") from last_error
        best = results[min(timed)[1]][0]
        self.choices[key], self.timings[key] = best, results
        return best


TUNER = Tuner()  # process-wide, like Triton's own compile cache: tuning is per device and shape, not per layer


def permute_rows(qweight: torch.Tensor, perm: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Packed int32 [K/8, N] with its K rows reordered by perm, on qweight's device, in column chunks so
    the unpacked temporaries stay ~K × chunk × 16 bytes (a 4096 × 22016 layer would need 1.4 GB at once)."""
    out = torch.empty_like(qweight)
    for c in range(0, qweight.shape[1], chunk):
        out[:, c : c + chunk] = pack_rows(unpack_rows(qweight[:, c : c + chunk])[perm])
    return out


@dataclass
class TritonW4Weight:
    """A GPTQ W4 linear repacked for the Triton kernels (see the module docstring)."""

    qweight: torch.Tensor  # int32 [K/8, N], rows sorted by group
    qzeros: torch.Tensor
    scales: torch.Tensor
    perm: torch.Tensor | None  # int32 [K]: kernel row i reads activation column perm[i] (act-order)
    group: int
    k: int
    n: int
    counters: (
        torch.Tensor
    )  # int32 tickets for the split-K reduction, one per column block (≥ N/BLOCK_N), back to 0 after each call
    tuner: Tuner | None = TUNER  # None: the default configs, untimed
    workspace: torch.Tensor | None = None  # fp32 [SPLIT_MAX, N] for split-K partials (made at build on CUDA)
    _xcols: torch.Tensor | None = None  # the prefill gather index (see prefill_columns), built at first use

    @classmethod
    def build(
        cls,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor,
        tuner: Tuner | None = TUNER,
    ) -> TritonW4Weight | None:
        """Repack for the kernels; None if the groups are not contiguous equal blocks even after sorting."""
        k, n, g = check_shapes(qweight, qzeros, scales, g_idx)
        if k % g or n % 8 or (k // g) % 8:
            return None
        gs = k // g
        gi = g_idx.long().cpu()
        perm = None
        qw = qweight
        if not bool((gi[1:] >= gi[:-1]).all()):
            perm = torch.argsort(gi, stable=True)
            gi = gi[perm]
            qw = permute_rows(qweight, perm.to(qweight.device))
        if not torch.equal(gi, torch.arange(k) // gs):
            return None
        dev = qweight.device
        # the workspace exists before any CUDA-graph capture (an allocation inside one would come from the
        # graph's private pool); on CPU (the interpreter, tests) it is made at the first split-K call
        ws = torch.empty(SPLIT_MAX, n, device=dev, dtype=torch.float32) if dev.type == "cuda" else None
        w = cls(
            qweight=qw.contiguous(),
            qzeros=qzeros.contiguous(),
            scales=scales.contiguous(),
            perm=None if perm is None else perm.to(torch.int32).to(dev),
            group=gs,
            k=k,
            n=n,
            counters=torch.zeros(triton.cdiv(n, COUNTER_BLOCK), dtype=torch.int32, device=dev),
            tuner=tuner,
            workspace=ws,
        )
        w._xcols = w._prefill_index()  # built here, never inside a CUDA-graph capture
        return w

    def matmul(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, *, config: GemvConfig | GemmConfig | None = None
    ) -> torch.Tensor:
        """y = x @ W + bias. `config` forces a launch shape (tests sweep them); else the tuner picks."""
        if x.shape[-1] != self.k:
            raise ValueError(f"x has {x.shape[-1]} features, the W4 weight expects {self.k}")
        if x.device != self.qweight.device:
            raise ValueError(f"x is on {x.device}, the W4 weight on {self.qweight.device}")
        if x.dtype not in _DTYPES:
            raise ValueError(f"x is {x.dtype}; the W4 Triton kernels take float16, bfloat16 or float32")
        if bias is not None and (bias.shape != (self.n,) or bias.device != x.device):
            raise ValueError(f"bias must be [{self.n}] on {x.device}, got {tuple(bias.shape)} on {bias.device}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        m = x2.shape[0]
        out = torch.empty(m, self.n, device=x.device, dtype=x.dtype)
        if m == 0:
            return out.reshape(*lead, self.n)
        arch = device_arch(x.device)  # candidates that do not fit this GPU are left out
        # tuple(...) keeps both branches' candidates at this one type (an assignment of the branch's own tuple
        # type would narrow `cands` to it, and Tuner.choose would then see two unrelated tuple types)
        cands: tuple[GemvConfig | GemmConfig, ...]
        run: Callable[[GemvConfig | GemmConfig], None]  # a config of the other kind: ValueError (tests force them)
        if m <= DECODE_MAX_M:
            bm = triton.next_power_of_2(m)
            cands = tuple(gemv_candidates(bm, self.group, self.k, arch, x.dtype))
            run = lambda c: self._gemv(x2, bias, out, c, bm)
            key = (
                "gemv",
                self.k,
                self.n,
                self.group,
                bm,
                x.dtype,
                bias is not None,
                self.perm is not None,
                str(x.device),
            )
        else:
            cands = tuple(gemm_candidates(m, arch, x.dtype))
            run = lambda c: self._gemm(x2, bias, out, c)
            key = (
                "gemm",
                self.k,
                self.n,
                self.group,
                min(triton.next_power_of_2(m), 1024),
                x.dtype,
                bias is not None,
                self.perm is not None,
                str(x.device),
            )
        with on_device(x):
            if config is None:
                if self.tuner is None or x.device.type != "cuda":
                    config = cands[0]
                else:
                    config = self.tuner.choose(key, cands, run)
            run(config)
        return out.reshape(*lead, self.n)

    def _gemv(
        self, x2: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, c: GemvConfig | GemmConfig, bm: int
    ) -> None:
        if (
            not isinstance(c, GemvConfig)
            or (c.split_k > 1 and bm > 1)
            or c.split_k > SPLIT_MAX
            or c.block_n < COUNTER_BLOCK
            or (c.x_prep and bm > 1)
        ):
            raise ValueError(f"{c} is not a decode config for {x2.shape[0]} rows")
        tiles = triton.cdiv(self.k, c.block_k)
        per_split = triton.cdiv(tiles, c.split_k)
        split = triton.cdiv(tiles, per_split)  # no empty splits
        if split > 1 and self.workspace is None:
            self.workspace = torch.empty(SPLIT_MAX, self.n, device=x2.device, dtype=torch.float32)
        ws = self.workspace if split > 1 else out
        grid = (triton.cdiv(self.n, c.block_n), split)
        perm = self.perm if self.perm is not None else x2
        in_group = self.group % c.block_k == 0 or self.group == self.k
        if bm == 1 and in_group:
            x = x2
            if c.x_prep:
                kp = tiles * c.block_k
                x = torch.empty(kp, device=x2.device, dtype=torch.float32)
                _x_prep_kernel[(triton.cdiv(kp, 1024),)](
                    x2, perm, x, self.k, kp, HAS_PERM=self.perm is not None, BLOCK_K=c.block_k, BLOCK=1024
                )
            _w4_gemv1_kernel[grid](
                x,
                perm,
                self.qweight,
                self.scales,
                self.qzeros,
                bias if bias is not None else out,
                out,
                ws,
                self.counters,
                self.n,
                self.k,
                per_split,
                MAGIC,
                GS=self.group,
                HAS_PERM=self.perm is not None and not c.x_prep,
                X_PREP=c.x_prep,
                HAS_BIAS=bias is not None,
                BLOCK_N=c.block_n,
                BLOCK_K=c.block_k,
                SPLIT_K=split,
                NUM_STAGES=c.num_stages,
                num_warps=c.num_warps,
            )
            return
        if c.x_prep:
            raise ValueError(f"{c}: the activation prep needs tiles within one group (group {self.group})")
        _w4_gemv_kernel[grid](
            x2,
            self.perm if self.perm is not None else x2,
            self.qweight,
            self.scales,
            self.qzeros,
            bias if bias is not None else out,
            out,
            ws,
            self.counters,
            x2.shape[0],
            self.n,
            self.k,
            self.group,
            x2.stride(0),
            out.stride(0),
            per_split,
            HAS_PERM=self.perm is not None,
            HAS_BIAS=bias is not None,
            TILE_IN_GROUP=self.group % c.block_k == 0,
            BLOCK_M=bm,
            BLOCK_N=c.block_n,
            BLOCK_K=c.block_k,
            SPLIT_K=split,
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )

    def prefill_columns(self, x2: torch.Tensor) -> torch.Tensor:
        """x [M, K] → [M, ⌈K/128⌉·128] in the prefill kernel's tile order: tile t holds, for j = 0…7, the
        activation columns of kernel rows 128t + 8p + j (p = 0…15) side by side, act-order permutation
        included, zeros past K. One gather per prefill call buys contiguous, vectorized activation loads."""
        if self._xcols is None:
            self._xcols = self._prefill_index()
        return torch.nn.functional.pad(x2, (0, 1)).index_select(1, self._xcols)

    def _prefill_index(self) -> torch.Tensor:
        dev = self.qweight.device
        kp = triton.cdiv(self.k, GEMM_BLOCK_K) * GEMM_BLOCK_K
        src = torch.arange(kp, device=dev).view(-1, GEMM_BLOCK_K // 8, 8).transpose(1, 2).reshape(-1)  # row per slot
        base = src if self.perm is None else self.perm.long()[src.clamp(max=self.k - 1)]
        return torch.where(src < self.k, base, self.k).to(torch.int32)  # column K of the padded input is zero

    def _gemm(self, x2: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, c: GemvConfig | GemmConfig) -> None:
        if not isinstance(c, GemmConfig) or c.block_k != GEMM_BLOCK_K or c.block_m < 16 or c.block_n < 16:
            raise ValueError(f"{c} is not a prefill config (BLOCK_K = {GEMM_BLOCK_K}, BLOCK_M/N ≥ 16)")
        m = x2.shape[0]
        xt = self.prefill_columns(x2)
        grid = (triton.cdiv(m, c.block_m) * triton.cdiv(self.n, c.block_n),)
        _w4_gemm_kernel[grid](
            xt,
            self.qweight,
            self.scales,
            self.qzeros,
            bias if bias is not None else out,
            out,
            m,
            self.n,
            self.k,
            self.group,
            xt.stride(0),
            out.stride(0),
            HAS_BIAS=bias is not None,
            TILE_IN_GROUP=self.group % c.block_k == 0,
            IEEE=x2.dtype == torch.float32,
            EMULATE_BF16=x2.device.type == "cpu" and x2.dtype == torch.bfloat16,
            BLOCK_M=c.block_m,
            BLOCK_N=c.block_n,
            BLOCK_K=c.block_k,
            GROUP_M=c.group_m,
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )


# What bench/compile_check.py measured for each tuner candidate: (kernel, config fields in order, activation
# dtype) → {compute capability × 10: (shared memory bytes static + dynamic, bytes of registers spilled)},
# the largest over the 7B launches and triton versions compiled (bench/results/compile/). Generated by
# `python bench/compile_check.py --table bench/results/compile/triton-*`; fits_target reads it.
COMPILED: dict[tuple[str, tuple, str], dict[int, tuple[int, int]]] = {
    ("gemm", (16, 64, 128, 4, 3, 8), "bfloat16"): {80: (33280, 0), 86: (33280, 0), 89: (33280, 0), 90: (34304, 0)},
    ("gemm", (32, 128, 128, 4, 3, 8), "bfloat16"): {80: (66560, 16), 86: (66560, 0), 89: (66560, 0), 90: (67584, 0)},
    ("gemm", (64, 64, 128, 4, 3, 8), "bfloat16"): {80: (57856, 0), 86: (57856, 0), 89: (57856, 0), 90: (75264, 0)},
    ("gemm", (64, 128, 128, 8, 3, 8), "bfloat16"): {80: (82944, 0), 86: (82944, 0), 89: (82944, 0), 90: (100352, 0)},
    ("gemm", (128, 128, 128, 8, 2, 8), "bfloat16"): {
        80: (74240, 64),
        86: (74240, 80),
        89: (74240, 80),
        90: (108032, 0),
    },
    ("gemm", (16, 64, 128, 4, 3, 8), "float16"): {80: (45056, 0), 86: (45056, 0), 89: (45056, 0), 90: (46080, 0)},
    ("gemm", (32, 128, 128, 4, 3, 8), "float16"): {80: (90112, 16), 86: (90112, 16), 89: (90112, 16), 90: (91136, 24)},
    ("gemm", (64, 64, 128, 4, 3, 8), "float16"): {80: (69632, 0), 86: (69632, 0), 89: (69632, 0), 90: (87040, 0)},
    ("gemm", (64, 128, 128, 8, 3, 8), "float16"): {80: (106496, 0), 86: (106496, 0), 89: (106496, 0), 90: (123904, 0)},
    ("gemm", (128, 128, 128, 8, 2, 8), "float16"): {
        80: (86016, 216),
        86: (86016, 168),
        89: (86016, 168),
        90: (119808, 0),
    },
    ("gemm", (16, 64, 128, 4, 3, 8), "float32"): {
        80: (57856, 3472),
        86: (57856, 2872),
        89: (57856, 2872),
        90: (58880, 2560),
    },
    ("gemm", (32, 128, 128, 4, 3, 8), "float32"): {
        80: (115712, 10568),
        86: (115712, 8152),
        89: (115712, 8152),
        90: (116736, 9592),
    },
    ("gemm", (64, 64, 128, 4, 3, 8), "float32"): {
        80: (107008, 8704),
        86: (107008, 7048),
        89: (107008, 7048),
        90: (108032, 7928),
    },
    ("gemm", (64, 128, 128, 8, 3, 8), "float32"): {
        80: (148480, 8952),
        86: (148480, 7208),
        89: (148480, 7208),
        90: (149504, 8032),
    },
    ("gemm", (128, 128, 128, 8, 2, 8), "float32"): {
        80: (139776, 26664),
        86: (139776, 19440),
        89: (139776, 19440),
        90: (140800, 20816),
    },
    ("gemv1", (32, 128, 8, 2, 4, True), "bfloat16"): {80: (8256, 0), 86: (8256, 0), 89: (8256, 0), 90: (9280, 0)},
    ("gemv1", (64, 128, 1, 2, 3, True), "bfloat16"): {80: (9984, 0), 86: (9984, 0), 89: (9984, 0), 90: (11008, 0)},
    ("gemv1", (64, 128, 1, 4, 3, False), "bfloat16"): {80: (9984, 0), 86: (9984, 0), 89: (9984, 0), 90: (11008, 0)},
    ("gemv1", (64, 128, 2, 2, 3, True), "bfloat16"): {80: (9984, 0), 86: (9984, 0), 89: (9984, 0), 90: (11008, 0)},
    ("gemv1", (64, 128, 4, 2, 3, True), "bfloat16"): {80: (9984, 0), 86: (9984, 0), 89: (9984, 0), 90: (11008, 0)},
    ("gemv1", (64, 128, 4, 4, 4, False), "bfloat16"): {80: (14976, 0), 86: (14976, 0), 89: (14976, 0), 90: (16000, 0)},
    ("gemv1", (64, 128, 8, 2, 4, True), "bfloat16"): {80: (14848, 0), 86: (14848, 0), 89: (14848, 0), 90: (15872, 0)},
    ("gemv1", (128, 128, 1, 4, 3, True), "bfloat16"): {80: (18944, 0), 86: (18944, 0), 89: (18944, 0), 90: (19968, 0)},
    ("gemv1", (128, 128, 2, 4, 3, False), "bfloat16"): {80: (18944, 8), 86: (18944, 0), 89: (18944, 0), 90: (19968, 0)},
    ("gemv1", (128, 128, 4, 4, 3, True), "bfloat16"): {80: (18944, 0), 86: (18944, 0), 89: (18944, 0), 90: (19968, 0)},
    ("gemv1", (32, 32, 8, 2, 4, True), "float16"): {80: (2496, 0), 86: (2496, 0), 89: (2496, 0), 90: (3520, 0)},
    ("gemv1", (32, 64, 8, 2, 4, True), "float16"): {80: (4416, 0), 86: (4416, 0), 89: (4416, 0), 90: (5440, 0)},
    ("gemv1", (32, 128, 8, 2, 4, True), "float16"): {80: (8256, 0), 86: (8256, 0), 89: (8256, 0), 90: (9280, 0)},
    ("gemv1", (64, 32, 1, 2, 3, True), "float16"): {80: (3072, 0), 86: (3072, 0), 89: (3072, 0), 90: (4096, 0)},
    ("gemv1", (64, 32, 1, 4, 3, False), "float16"): {80: (3072, 0), 86: (3072, 0), 89: (3072, 0), 90: (4096, 0)},
    ("gemv1", (64, 32, 2, 2, 3, True), "float16"): {80: (3072, 0), 86: (3072, 0), 89: (3072, 0), 90: (4096, 0)},
    ("gemv1", (64, 32, 4, 2, 3, True), "float16"): {80: (3072, 0), 86: (3072, 0), 89: (3072, 0), 90: (4096, 0)},
    ("gemv1", (64, 32, 4, 4, 4, False), "float16"): {80: (4608, 0), 86: (4608, 0), 89: (4608, 0), 90: (5632, 0)},
    ("gemv1", (64, 32, 8, 2, 4, True), "float16"): {80: (4480, 0), 86: (4480, 0), 89: (4480, 0), 90: (5504, 0)},
    ("gemv1", (64, 64, 1, 2, 3, True), "float16"): {80: (5376, 0), 86: (5376, 0), 89: (5376, 0), 90: (6400, 0)},
    ("gemv1", (64, 64, 1, 4, 3, False), "float16"): {80: (5376, 0), 86: (5376, 0), 89: (5376, 0), 90: (6400, 0)},
    ("gemv1", (64, 64, 2, 2, 3, True), "float16"): {80: (5376, 0), 86: (5376, 0), 89: (5376, 0), 90: (6400, 8)},
    ("gemv1", (64, 64, 4, 2, 3, True), "float16"): {80: (5376, 0), 86: (5376, 0), 89: (5376, 0), 90: (6400, 8)},
    ("gemv1", (64, 64, 4, 4, 4, False), "float16"): {80: (8064, 0), 86: (8064, 0), 89: (8064, 0), 90: (9088, 0)},
    ("gemv1", (64, 64, 8, 2, 4, True), "float16"): {80: (7936, 0), 86: (7936, 0), 89: (7936, 0), 90: (8960, 0)},
    ("gemv1", (64, 128, 1, 2, 3, True), "float16"): {80: (9984, 0), 86: (9984, 0), 89: (9984, 0), 90: (11008, 0)},
    ("gemv1", (64, 128, 1, 4, 3, False), "float16"): {80: (9984, 0), 86: (9984, 0), 89: (9984, 0), 90: (11008, 0)},
    ("gemv1", (64, 128, 2, 2, 3, True), "float16"): {80: (9984, 0), 86: (9984, 0), 89: (9984, 0), 90: (11008, 0)},
    ("gemv1", (64, 128, 4, 2, 3, True), "float16"): {80: (9984, 0), 86: (9984, 0), 89: (9984, 0), 90: (11008, 0)},
    ("gemv1", (64, 128, 4, 4, 4, False), "float16"): {80: (14976, 0), 86: (14976, 0), 89: (14976, 0), 90: (16000, 0)},
    ("gemv1", (64, 128, 8, 2, 4, True), "float16"): {80: (14848, 0), 86: (14848, 0), 89: (14848, 0), 90: (15872, 0)},
    ("gemv1", (128, 32, 1, 4, 3, True), "float16"): {80: (5888, 0), 86: (5888, 0), 89: (5888, 0), 90: (6912, 0)},
    ("gemv1", (128, 32, 2, 4, 3, False), "float16"): {80: (5888, 0), 86: (5888, 0), 89: (5888, 0), 90: (6912, 0)},
    ("gemv1", (128, 32, 4, 4, 3, True), "float16"): {80: (5888, 0), 86: (5888, 0), 89: (5888, 0), 90: (6912, 0)},
    ("gemv1", (128, 64, 1, 4, 3, True), "float16"): {80: (10240, 0), 86: (10240, 0), 89: (10240, 0), 90: (11264, 0)},
    ("gemv1", (128, 64, 2, 4, 3, False), "float16"): {80: (10240, 0), 86: (10240, 0), 89: (10240, 0), 90: (11264, 0)},
    ("gemv1", (128, 64, 4, 4, 3, True), "float16"): {80: (10240, 0), 86: (10240, 0), 89: (10240, 0), 90: (11264, 0)},
    ("gemv1", (128, 128, 1, 4, 3, True), "float16"): {80: (18944, 0), 86: (18944, 0), 89: (18944, 0), 90: (19968, 0)},
    ("gemv1", (128, 128, 2, 4, 3, False), "float16"): {80: (18944, 8), 86: (18944, 0), 89: (18944, 0), 90: (19968, 0)},
    ("gemv1", (128, 128, 4, 4, 3, True), "float16"): {80: (18944, 0), 86: (18944, 0), 89: (18944, 0), 90: (19968, 0)},
    ("gemv1", (32, 128, 8, 2, 4, True), "float32"): {80: (8256, 0), 86: (8256, 0), 89: (8256, 0), 90: (9280, 0)},
    ("gemv1", (64, 128, 1, 2, 3, True), "float32"): {80: (9984, 0), 86: (9984, 0), 89: (9984, 0), 90: (11008, 0)},
    ("gemv1", (64, 128, 1, 4, 3, False), "float32"): {80: (11008, 0), 86: (11008, 0), 89: (11008, 0), 90: (12032, 8)},
    ("gemv1", (64, 128, 2, 2, 3, True), "float32"): {80: (9984, 0), 86: (9984, 0), 89: (9984, 0), 90: (11008, 0)},
    ("gemv1", (64, 128, 4, 2, 3, True), "float32"): {80: (9984, 0), 86: (9984, 0), 89: (9984, 0), 90: (11008, 0)},
    ("gemv1", (64, 128, 4, 4, 4, False), "float32"): {80: (16512, 0), 86: (16512, 0), 89: (16512, 0), 90: (17536, 0)},
    ("gemv1", (64, 128, 8, 2, 4, True), "float32"): {80: (14848, 0), 86: (14848, 0), 89: (14848, 0), 90: (15872, 0)},
    ("gemv1", (128, 128, 1, 4, 3, True), "float32"): {80: (18944, 0), 86: (18944, 0), 89: (18944, 0), 90: (19968, 0)},
    ("gemv1", (128, 128, 2, 4, 3, False), "float32"): {80: (19968, 0), 86: (19968, 0), 89: (19968, 0), 90: (20992, 0)},
    ("gemv1", (128, 128, 4, 4, 3, True), "float32"): {80: (18944, 0), 86: (18944, 0), 89: (18944, 0), 90: (19968, 0)},
    ("gemv2", (32, 64, 1, 2, 3, False), "bfloat16"): {80: (1024, 0), 86: (1024, 0), 89: (1024, 0), 90: (2048, 0)},
    ("gemv2", (32, 128, 1, 4, 4, False), "bfloat16"): {80: (2048, 0), 86: (2048, 0), 89: (2048, 0), 90: (3072, 0)},
    ("gemv2", (64, 128, 1, 4, 3, False), "bfloat16"): {80: (2048, 8), 86: (2048, 0), 89: (2048, 0), 90: (3072, 8)},
    ("gemv2", (128, 128, 1, 8, 3, False), "bfloat16"): {80: (4096, 8), 86: (4096, 0), 89: (4096, 0), 90: (5120, 16)},
    ("gemv2", (32, 64, 1, 2, 3, False), "float16"): {80: (1024, 0), 86: (1024, 0), 89: (1024, 0), 90: (2048, 0)},
    ("gemv2", (32, 128, 1, 4, 4, False), "float16"): {80: (2048, 0), 86: (2048, 0), 89: (2048, 0), 90: (3072, 0)},
    ("gemv2", (64, 128, 1, 4, 3, False), "float16"): {80: (4096, 56), 86: (4096, 16), 89: (4096, 16), 90: (5120, 8)},
    ("gemv2", (128, 128, 1, 8, 3, False), "float16"): {80: (8192, 112), 86: (8192, 24), 89: (8192, 24), 90: (9216, 40)},
    ("gemv2", (32, 64, 1, 2, 3, False), "float32"): {80: (1024, 0), 86: (1024, 0), 89: (1024, 0), 90: (2048, 0)},
    ("gemv2", (32, 128, 1, 4, 4, False), "float32"): {80: (2048, 0), 86: (2048, 0), 89: (2048, 0), 90: (3072, 0)},
    ("gemv2", (64, 128, 1, 4, 3, False), "float32"): {80: (2048, 8), 86: (2048, 0), 89: (2048, 0), 90: (3072, 8)},
    ("gemv2", (128, 128, 1, 8, 3, False), "float32"): {80: (4096, 8), 86: (4096, 0), 89: (4096, 0), 90: (5120, 8)},
    ("gemv4", (32, 64, 1, 2, 3, False), "bfloat16"): {80: (1024, 0), 86: (1024, 0), 89: (1024, 0), 90: (2048, 0)},
    ("gemv4", (32, 128, 1, 4, 4, False), "bfloat16"): {80: (2048, 0), 86: (2048, 0), 89: (2048, 0), 90: (3072, 0)},
    ("gemv4", (64, 128, 1, 4, 3, False), "bfloat16"): {
        80: (2048, 776),
        86: (2048, 792),
        89: (2048, 792),
        90: (3072, 776),
    },
    ("gemv4", (128, 128, 1, 8, 3, False), "bfloat16"): {
        80: (4096, 1872),
        86: (4096, 800),
        89: (4096, 800),
        90: (5120, 776),
    },
    ("gemv4", (32, 64, 1, 2, 3, False), "float16"): {80: (1024, 0), 86: (1024, 0), 89: (1024, 0), 90: (2048, 0)},
    ("gemv4", (32, 128, 1, 4, 4, False), "float16"): {80: (2048, 0), 86: (2048, 0), 89: (2048, 0), 90: (3072, 0)},
    ("gemv4", (64, 128, 1, 4, 3, False), "float16"): {
        80: (4096, 776),
        86: (4096, 792),
        89: (4096, 792),
        90: (5120, 776),
    },
    ("gemv4", (128, 128, 1, 8, 3, False), "float16"): {
        80: (8192, 1872),
        86: (8192, 800),
        89: (8192, 800),
        90: (9216, 776),
    },
    ("gemv4", (32, 64, 1, 2, 3, False), "float32"): {80: (1024, 0), 86: (1024, 0), 89: (1024, 0), 90: (2048, 0)},
    ("gemv4", (32, 128, 1, 4, 4, False), "float32"): {80: (2048, 0), 86: (2048, 0), 89: (2048, 0), 90: (3072, 0)},
    ("gemv4", (64, 128, 1, 4, 3, False), "float32"): {
        80: (2048, 3672),
        86: (2048, 632),
        89: (2048, 632),
        90: (3072, 632),
    },
    ("gemv4", (128, 128, 1, 8, 3, False), "float32"): {
        80: (4096, 3672),
        86: (4096, 632),
        89: (4096, 632),
        90: (5120, 632),
    },
    ("gemv8", (32, 64, 1, 2, 3, False), "bfloat16"): {80: (2048, 0), 86: (2048, 0), 89: (2048, 0), 90: (3072, 0)},
    ("gemv8", (32, 128, 1, 4, 4, False), "bfloat16"): {80: (4096, 32), 86: (4096, 0), 89: (4096, 0), 90: (5120, 0)},
    ("gemv8", (64, 128, 1, 4, 3, False), "bfloat16"): {80: (4096, 16), 86: (4096, 40), 89: (4096, 40), 90: (5120, 0)},
    ("gemv8", (32, 64, 1, 2, 3, False), "float16"): {80: (2048, 0), 86: (2048, 0), 89: (2048, 0), 90: (3072, 8)},
    ("gemv8", (32, 128, 1, 4, 4, False), "float16"): {80: (4096, 32), 86: (4096, 0), 89: (4096, 0), 90: (5120, 0)},
    ("gemv8", (64, 128, 1, 4, 3, False), "float16"): {80: (4096, 16), 86: (4096, 32), 89: (4096, 32), 90: (5120, 16)},
    ("gemv8", (32, 64, 1, 2, 3, False), "float32"): {80: (2048, 0), 86: (2048, 0), 89: (2048, 0), 90: (3072, 0)},
    ("gemv8", (32, 128, 1, 4, 4, False), "float32"): {80: (4096, 32), 86: (4096, 0), 89: (4096, 0), 90: (5120, 0)},
    ("gemv8", (64, 128, 1, 4, 3, False), "float32"): {80: (4096, 8), 86: (4096, 24), 89: (4096, 24), 90: (5120, 0)},
    ("int8", (16, 512, 4, 4), "bfloat16"): {80: (2048, 0), 86: (2048, 0), 89: (2048, 0), 90: (1536, 0)},
    ("int8", (32, 256, 4, 3), "bfloat16"): {80: (1024, 0), 86: (1024, 0), 89: (1024, 0), 90: (1536, 0)},
    ("int8", (64, 128, 4, 3), "bfloat16"): {80: (512, 0), 86: (512, 0), 89: (512, 0), 90: (1536, 0)},
    ("int8", (64, 256, 8, 3), "bfloat16"): {80: (1024, 0), 86: (1024, 0), 89: (1024, 0), 90: (2048, 0)},
    ("int8", (128, 128, 8, 3), "bfloat16"): {80: (256, 0), 86: (256, 0), 89: (256, 0), 90: (1280, 0)},
    ("int8", (16, 512, 4, 4), "float16"): {80: (2048, 0), 86: (2048, 0), 89: (2048, 0), 90: (1536, 0)},
    ("int8", (32, 256, 4, 3), "float16"): {80: (1024, 0), 86: (1024, 0), 89: (1024, 0), 90: (1536, 0)},
    ("int8", (64, 128, 4, 3), "float16"): {80: (512, 0), 86: (512, 0), 89: (512, 0), 90: (1536, 0)},
    ("int8", (64, 256, 8, 3), "float16"): {80: (1024, 0), 86: (1024, 0), 89: (1024, 0), 90: (2048, 0)},
    ("int8", (128, 128, 8, 3), "float16"): {80: (256, 0), 86: (256, 0), 89: (256, 0), 90: (1280, 0)},
    ("int8", (16, 512, 4, 4), "float32"): {80: (2048, 0), 86: (2048, 0), 89: (2048, 0), 90: (1536, 0)},
    ("int8", (32, 256, 4, 3), "float32"): {80: (1024, 0), 86: (1024, 0), 89: (1024, 0), 90: (1536, 0)},
    ("int8", (64, 128, 4, 3), "float32"): {80: (512, 0), 86: (512, 0), 89: (512, 0), 90: (1536, 0)},
    ("int8", (64, 256, 8, 3), "float32"): {80: (1024, 0), 86: (1024, 0), 89: (1024, 0), 90: (2048, 0)},
    ("int8", (128, 128, 8, 3), "float32"): {80: (512, 0), 86: (512, 0), 89: (512, 0), 90: (1536, 0)},
}
