"""Which CPU W4 path runs a matmul of M rows: torch's int4 op, or dequantize once + a dense matmul — per machine.

Why measured and not fixed: both costs depend on the CPU. The int4 op costs ∝ M·K·N (it dequantizes in
its inner loop); the dense path costs K·N once (decoding the packed weight) plus a dense matmul ∝ M·K·N
at a lower rate, so it wins from some M on — at ~100 rows on an AVX-512-bf16 CPU, never at small M. And
the dense matmul's dtype matters more than anything: on a CPU with native bf16 (AVX-512-bf16, AMX) a
bf16 matmul is ~2.3× faster than fp32, while on an AVX2-only CPU torch has no fast bf16 kernel and the
same matmul is ~100× slower than fp32 (measured here with ONEDNN_MAX_CPU_ISA=AVX2: 28 s vs 0.4 s at
750 × 1024 × 3072). So once per process, on first need, a probe layer (K = N = 512, 128 rows) is timed
on each candidate: bf16 (only where oneDNN reports native bf16) and fp32. Its costs give the crossover
M* = decode / (op per row − dense per row), clamped to [MIN_ROWS_FLOOR, DENSE_MIN_ROWS]; the dtype is the
one whose dense path is cheaper at 512 rows. The probe runs on one thread (the pool's own count is restored
after it): all three costs scale alike with threads, and on a busy machine a pool's timings are the
scheduler's (a parallel region waits for its slowest thread: 2-thread probes measured 1 ms or 128 ms for the
same decode under load), while one thread's minimum over a few runs is stable. The probe also checks the dense result against the op
(a self-check: a mismatch warns once and keeps the op for every M). `describe()` is what `run --json`
reports under paths.self_check. `set_prefill_plan` fixes a plan (tests, benchmarks).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

PROBE_K = PROBE_N = 512  # small: each timed run fits in a scheduler slice on a busy machine
PROBE_ROWS = 128
PROBE_REPEATS = 15  # the minimum of these (the least disturbed by other work on the machine)
COMPARE_ROWS = 512  # the dtype whose dense path is cheaper at this many rows wins
MIN_ROWS_FLOOR = 32  # below this a dense matmul's own efficiency drops: the linear cost model is too rough
AGREE_TOL = 1e-2  # dense vs op on the probe, max |Δ| ÷ max |op| (two bf16 roundings of the output: ≤ 2⁻⁷)


@dataclass(frozen=True)
class ProbeCost:
    """Milliseconds on the probe layer: decode the weight to the dtype, the dense matmul and the op at PROBE_ROWS."""

    decode_ms: float
    dense_ms: float
    op_ms: float

    def dense_at(self, rows: int) -> float:
        return self.decode_ms + self.dense_ms * rows / PROBE_ROWS

    def crossover(self) -> int | None:
        """Rows from which the dense path is cheaper than the op (None: never)."""
        gain = (self.op_ms - self.dense_ms) / PROBE_ROWS
        return math.ceil(self.decode_ms / gain) if gain > 0 else None


@dataclass(frozen=True)
class PrefillPlan:
    """From `min_rows` rows on (None: never) a W4 matmul runs dequantize + dense matmul in `dtype`."""

    min_rows: int | None
    dtype: torch.dtype
    how: str  # why: the probe's figures, or what disabled the dense path

    def describe(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        path = f"dense {dt} from {self.min_rows} rows, int4 op below" if self.min_rows else "int4 op for every M"
        return f"{path} ({self.how})"


def choose(costs: dict[torch.dtype, ProbeCost], ceiling: int) -> PrefillPlan:
    """The plan the probe costs imply (pure: tests feed it costs)."""
    if not costs:
        return PrefillPlan(None, torch.bfloat16, "no dense dtype to probe")
    dtype = min(costs, key=lambda d: costs[d].dense_at(COMPARE_ROWS))
    c = costs[dtype]
    figures = ", ".join(
        f"{str(d).removeprefix('torch.')}: decode {v.decode_ms:.2f} ms, dense {v.dense_ms:.2f} ms, op {v.op_ms:.2f} ms"
        for d, v in costs.items()
    )
    how = f"probe {PROBE_K}x{PROBE_N} at {PROBE_ROWS} rows: {figures}"
    rows = c.crossover()
    if rows is None:
        return PrefillPlan(None, dtype, how + "; the op is faster per row")
    return PrefillPlan(min(max(rows, MIN_ROWS_FLOOR), ceiling), dtype, how)


def native_bf16() -> bool:
    """Does oneDNN run bf16 matmuls natively here (AVX-512-bf16 / AMX)? Without it torch's bf16 CPU matmul is slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _min_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Each function's fastest of `repeats` runs, in ms, the runs interleaved (a burst of other work then
    slows one run of each, not all runs of one)."""
    for fn in fns.values():
        fn()  # warm-up (first-call allocation, oneDNN primitive creation)
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: 1000 * v for name, v in best.items()}


def measure(dtypes: tuple[torch.dtype, ...], repeats: int = PROBE_REPEATS) -> tuple[dict[torch.dtype, ProbeCost], str]:
    """Time the probe layer per dtype; also check each dtype's dense result against the op.

    Returns (costs of the dtypes that agree with the op, the problems found, '' if none).
    """
    from .w4_cpu import CpuW4Weight, packed_layout

    layout = packed_layout()
    assert layout is not None, "measure() runs only where the packed layout is readable"
    gen = torch.Generator().manual_seed(0)
    k, n, g = PROBE_K, PROBE_N, 128
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
    s = torch.rand(k // g, n, generator=gen) * 0.02 + 0.01
    sz = torch.stack([s, torch.randn(k // g, n, generator=gen) * 0.01], -1).to(torch.bfloat16)
    w = CpuW4Weight(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz, g, None, k, n)
    x = torch.randn(PROBE_ROWS, k, generator=gen)
    op = w.int4_matmul(x).float()
    fns: dict[str, Callable[[], object]] = {"op": lambda: w.int4_matmul(x)}
    ok, problems = [], []
    for dtype in dtypes:
        dense = w.dense_matmul(x, dtype).float()
        err = float((dense - op).abs().max() / op.abs().max())
        if not err <= AGREE_TOL:
            problems.append(f"dense {dtype} disagrees with the int4 op (max error {err:.3g} of max |op|)")
            continue
        ok.append(dtype)
        fns[f"decode {dtype}"] = functools.partial(w.dequantize_t, layout, dtype)
        fns[f"dense {dtype}"] = functools.partial(torch.mm, x.to(dtype), w.dequantize_t(layout, dtype))
    ms = _min_ms(fns, repeats)
    costs = {d: ProbeCost(ms[f"decode {d}"], ms[f"dense {d}"], ms["op"]) for d in ok}
    return costs, "; ".join(problems)


_PLAN: PrefillPlan | None = None  # a plan is made once per process, so its warning is too


def prefill_plan() -> PrefillPlan:
    """This process's plan: probed on first call (a few tens of ms), then kept."""
    global _PLAN
    if _PLAN is None:
        from .w4_cpu import DENSE_MIN_ROWS, packed_layout

        if packed_layout() is None:  # packed_layout() has warned once already
            _PLAN = PrefillPlan(None, torch.bfloat16, "torch's packed int4 layout is not readable on this CPU")
            return _PLAN
        dtypes = (torch.bfloat16, torch.float32) if native_bf16() else (torch.float32,)
        threads = torch.get_num_threads()
        try:  # timed on one thread: see the module docstring
            torch.set_num_threads(1)
            with torch.inference_mode():
                costs, problems = measure(dtypes)
        finally:
            torch.set_num_threads(threads)
        plan = choose(costs, DENSE_MIN_ROWS)
        if problems:
            plan = PrefillPlan(plan.min_rows, plan.dtype, f"{plan.how}; {problems}")
            warnings.warn(
                f"CPU W4: the large-M prefill path failed its self-check ({problems}); "
                f"using {plan.describe().split(' (')[0]} instead",
                RuntimeWarning,
                stacklevel=2,
            )
        _PLAN = plan
    return _PLAN


def set_prefill_plan(plan: PrefillPlan | None) -> None:
    """Fix the plan (None: probe again on next use) — for tests and benchmarks that compare paths."""
    global _PLAN
    _PLAN = plan
