"""What the benchmark knows about the machine: versions, git commit, memory peaks, memory bandwidth.

Per-stage host memory peaks use Linux's resettable high-water mark (writing 5 to /proc/self/clear_refs
resets VmHWM), so each stage reports its own peak, not the process's lifetime maximum; elsewhere the
lifetime peak is reported and marked so. Device peaks use torch.cuda's resettable counters.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

# Peak memory bandwidth (GB/s) of GPUs our users run, from the vendors' data sheets: the roofline's ceiling.
GPU_PEAK_GBPS = {
    "H200": 4800.0,
    "H100 SXM": 3350.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100": 1555.0,
    "L40S": 864.0,
    "L4": 300.0,
    "A10": 600.0,
    "T4": 320.0,
    "RTX 4090": 1008.0,
    "RTX 4080": 717.0,
    "RTX 4070": 504.0,
    "RTX 4060 Ti": 288.0,
    "RTX 4060": 272.0,
    "RTX 3090": 936.0,
    "RTX 3080": 760.0,
    "RTX 3060": 360.0,
    "RTX A4000": 448.0,
    "RTX A2000": 288.0,
}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("qwen-audio-edge", "numpy", "onnxruntime", "onnxruntime-gpu", "transformers", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit() -> str | None:
    """The source tree's commit (+ "-dirty" when it has uncommitted changes), when run from a checkout."""
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma") if f in have)
    except OSError:
        pass
    return []


def device_info(device: str) -> dict:
    dev = torch.device(device)
    info: dict = {
        "device": str(dev),
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "host_memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def gpu_peak_gbps(name: str) -> float | None:
    """The data-sheet bandwidth for a GPU name (the longest matching key: "H100 PCIe" before "H100")."""
    hits = [k for k in GPU_PEAK_GBPS if k.lower() in name.lower()]
    return GPU_PEAK_GBPS[max(hits, key=len)] if hits else None


def measured_bandwidth_gbps(device: str, mib: int = 512, repeats: int = 5) -> dict:
    """Achievable memory bandwidth, measured: on the CPU a read (sum over a buffer far above cache size),
    on a GPU a device-to-device copy (read + write counted). Best of `repeats`."""
    dev = torch.device(device)
    n = mib * 2**20 // 4
    x = torch.ones(n, dtype=torch.float32, device=dev)
    best = float("inf")
    if dev.type == "cuda":
        y = torch.empty_like(x)
        for _ in range(repeats + 1):
            torch.cuda.synchronize(dev)
            t = time.perf_counter()
            y.copy_(x)
            torch.cuda.synchronize(dev)
            best = min(best, time.perf_counter() - t)
        return {"kind": "device copy (read + write)", "gbps": round(2 * x.numel() * 4 / best / 1e9, 1)}
    for _ in range(repeats + 1):
        t = time.perf_counter()
        float(x.sum())
        best = min(best, time.perf_counter() - t)
    return {
        "kind": f"host read (torch.sum over {mib} MiB, {torch.get_num_threads()} threads)",
        "gbps": round(x.numel() * 4 / best / 1e9, 1),
    }


class MemoryPeak:
    """Host RSS (and device) high-water mark of one stage: `with MemoryPeak(device) as m: ...; m.peak`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.host_peak_mib: float | None = None
        self.host_start_mib: float | None = None
        self.device_peak_mib: float | None = None
        self.resettable = _reset_hwm()

    def __enter__(self) -> MemoryPeak:
        self.host_start_mib = _status_mib("VmRSS")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self.host_peak_mib = _status_mib("VmHWM")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.device_peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20

    def to_json(self) -> dict:
        return {
            "host_rss_start_mib": _round(self.host_start_mib),
            "host_rss_peak_mib": _round(self.host_peak_mib),
            "host_peak_is_per_stage": self.resettable,
            "device_peak_mib": _round(self.device_peak_mib),
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    if field == "VmHWM" and sys.platform != "win32":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return None
