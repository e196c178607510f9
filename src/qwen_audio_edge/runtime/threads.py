"""One CPU thread budget for torch and ONNX Runtime, and ONNX Runtime sessions that do not spin.

Why: the offline path runs the ONNX Runtime encoder, then torch's decoder, one after the other, in one
process. With each library left at its own default (torch: one thread per core; ONNX Runtime: one per
CPU, and its pool busy-waits after every run by default) the two pools take turns fighting over the same
cores, and on a machine whose cores are already busy every parallel region waits for its slowest thread.
A user measured mel 1087 ms / time to first token 1745 ms with 2 threads on a busy 2-core machine, and
11 ms / 116 ms with one. So both libraries get the same budget (they never run at the same time in one
turn), ONNX Runtime's spinning is off, and the default budget counts only cores that are free.

The default (`default_threads`): the cores this process may run on (its CPU affinity, capped by a cgroup
CPU quota) minus the cores other work keeps busy (sampled for 0.1 s at load, rounded), at least 1.
Over-subscribing costs far more than under-using a core (a straggler thread stalls every parallel
region; one idle core costs at most its share), so the estimate leans low. Measured in
bench/ttft_profile.py's `threads` section (bench/results/cpu/ttft_profile_mid.json); docs/threads.md.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# ONNX Runtime session config keys (onnxruntime_session_options_config_keys.h): "0" stops a pool's
# threads from busy-waiting for the next parallel region (they block instead).
BUSY_WINDOW_S = 0.1  # how long the pipeline samples the machine's busy cores at load (10 clock ticks per CPU)
ORT_NO_SPIN = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


@dataclass(frozen=True)
class ThreadBudget:
    """The intra-op threads torch and ONNX Runtime both get, and how the number was reached."""

    threads: int
    source: str  # "option" (given by the user) or "auto" (default_threads)
    cores: int  # usable cores: affinity, capped by the cgroup CPU quota
    busy: float  # cores other work kept busy when the budget was taken (busy_cores)

    def to_json(self) -> dict:
        return {"threads": self.threads, "source": self.source, "cores": self.cores, "busy": round(self.busy, 2)}


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity (taskset, cpusets), capped by a cgroup v2/v1 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by a cgroup quota (cpu.max "quota period", or v1 cfs files), None when unlimited/unknown."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def cpu_ticks(cpus: set[int], stat: Path = Path("/proc/stat")) -> tuple[int, int] | None:
    """(busy, total) clock ticks of `cpus` since boot from /proc/stat (idle and iowait count as not busy)."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(f) for f in fields[:8]]
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total) if total else None


def busy_cores(window_s: float = BUSY_WINDOW_S) -> float:
    """Cores of this process's CPUs that other work keeps busy right now.

    Sampled: /proc/stat's busy ticks over `window_s`, while this thread sleeps, less this process's own CPU
    time in that window. Not the load average: it lags by a minute, so right after a heavy job (a build, a
    benchmark in the same shell) it still reports the cores busy — measured: a default pipeline took 1 thread
    on an idle 2-core machine and ran its first token 2× slower. Where /proc/stat is absent: the load average.
    """
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        cpus = set(range(os.cpu_count() or 1))
    before, own = cpu_ticks(cpus), time.process_time()
    time.sleep(window_s)
    after, own = cpu_ticks(cpus), time.process_time() - own
    if before is None or after is None or after[1] <= before[1]:
        try:
            return float(os.getloadavg()[0])
        except (AttributeError, OSError):  # pragma: no cover - non-POSIX
            return 0.0
    share = (after[0] - before[0]) / (after[1] - before[1])  # of the CPUs' capacity over the window
    return max(0.0, share * len(cpus) - own / window_s)


def default_threads(cores: int, busy: float) -> int:
    """Free cores: `cores` minus the busy ones (rounded half up), at least 1."""
    return max(1, cores - math.floor(busy + 0.5))


def thread_budget(threads: int | None) -> ThreadBudget:
    """The budget for `threads` (an explicit count is kept as is; None: `default_threads` of this machine)."""
    cores, busy = usable_cores(), busy_cores()
    if threads is not None:
        return ThreadBudget(threads, "option", cores, busy)
    return ThreadBudget(default_threads(cores, busy), "auto", cores, busy)


def apply_torch_threads(budget: ThreadBudget) -> None:
    """torch's intra-op pool to the budget (process-wide, see RuntimeOptions.threads)."""
    if torch.get_num_threads() != budget.threads:
        torch.set_num_threads(budget.threads)


def ort_session_options(threads: int):
    """ONNX Runtime session options: `threads` intra-op threads, one inter-op, sequential, no spinning.

    inter-op 1 and sequential execution: the encoder graph is a chain, so a second pool would only add
    threads that compete with the intra-op ones.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for key, value in ORT_NO_SPIN.items():
        opts.add_session_config_entry(key, value)
    return opts
