"""Per-kernel W4A16 benchmark on the real Qwen2-Audio-7B decoder layer shapes.

Rows, for each shape and M: median time, achieved GB/s = bytes of weights + scales/zeros (+ g_idx) read
÷ time, % of the device's peak, speedups vs the dense matmul in the activation dtype and vs torch's
built-in int4 op (tinygemm: `_weight_int4pack_mm` on CUDA, `_weight_int4pack_mm_for_cpu` on CPU), and
the max error of our output against the reference dequant-matmul (fp32).

Shapes (K × N): 4096×4096 (q/k/v/o), 4096×11008 (gate/up), 11008×4096 (down), the fused projections our
runtime actually runs (q+k+v 4096×12288, gate+up 4096×22016), and `layer`: one whole decoder layer's
four W4 matmuls back to back (fused qkv with bias, o, fused gate/up, down), as the decode step runs them.

GPU timing: a lone 4096×4096 GEMV takes a few µs, less than one Python launch, so calls are never timed
one by one. The calls are captured into one CUDA graph that cycles through copies of the weights
totalling more than 3× the L2 cache (so each call reads cold weights, as in a real decode step where
the layer's weights were evicted by the 31 others), replayed, timed with CUDA events, and divided by
the number of calls. The Triton configs are tuned first (kernels/w4_triton.py `Tuner`, L2 flushed).
A device-to-device copy figure is measured beside the datasheet peak.

`--preset tiny` swaps in small shapes of the same kinds (and a small layer) and `--kernel triton` takes the
Triton path on CPU too, under the Triton interpreter (TRITON_INTERPRET=1, set here): the GPU
run's code path (weight copies, tinygemm beside ours, the whole-layer row, tuned-config report) in a few
seconds, timed by wall clock instead of CUDA graphs — what `bench/gpu_check.sh --dry-run` runs so that a
slip in this script can never cost a GPU session. `--out` is rewritten (atomically) after every row, so a
run cut off by a time limit leaves valid JSON with what it measured.

On CPU (our path: kernels/w4_cpu.py) the rows at M ≥ DENSE_MIN_ROWS time its dequantize-once + dense bf16
matmul, `tinygemm_ms` the int4 op alone, so M = 256 / 320 / 800 show where the two cross; `dtype_rows` time
torch's CPU int4 and int8 ops with bf16, fp16 and fp32 activations (why the CPU paths compute in bf16).

    python bench/kernel_bench.py --device cpu --ms 1,8,64,256,320,800 --out bench/results/cpu/kernels.json
    python bench/kernel_bench.py --device cuda --peak-gbps 3350 --out $OUT/kernels.json   (see gpu_check.sh)
    python bench/kernel_bench.py --device cpu --preset tiny --kernel triton --iters 2      (the dry run)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

SHAPES = {
    "qkvo_4096x4096": (4096, 4096),
    "gate_up_4096x11008": (4096, 11008),
    "down_11008x4096": (11008, 4096),
    "qkv_fused_4096x12288": (4096, 12288),
    "gate_up_fused_4096x22016": (4096, 22016),
}
LAYER = (
    ("qkv", 4096, 12288, True),
    ("o", 4096, 4096, False),
    ("gate_up", 4096, 22016, False),
    ("down", 11008, 4096, False),
)
# --preset tiny: the same kinds of shape at a size the Triton interpreter runs in well under a second per call
# (K a multiple of the group size 128, N of 8 (GPTQ packing) and 16 (the CPU int4 op)).
TINY_SHAPES = {"qkvo_256x256": (256, 256), "gate_up_256x512": (256, 512), "down_512x256": (512, 256)}
TINY_LAYER = (("qkv", 256, 768, True), ("o", 256, 256, False), ("gate_up", 256, 1024, False), ("down", 512, 256, False))
PRESETS = {"7b": (SHAPES, LAYER), "tiny": (TINY_SHAPES, TINY_LAYER)}


def cpu_seconds(fns: list[Callable[[], None]], iters: int) -> float:
    """Median wall seconds per call on CPU (fns cycled)."""
    for f in fns[:3]:
        f()
    times = []
    for i in range(iters):
        t = time.perf_counter()
        fns[i % len(fns)]()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def graph_seconds(fns: list[Callable[[], None]], replays: int = 20) -> float:
    """Device seconds per call: every fn captured once, in order, into one CUDA graph; replayed; timed."""
    for f in fns:  # compile, tune, allocate outside the capture
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    return replay_seconds(graph, replays) / len(fns)


def replay_seconds(graph, replays: int = 20) -> float:
    """Device seconds per replay of a captured CUDA graph (median of 5 event-timed runs of `replays`)."""
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / replays)
    return statistics.median(samples)


def seconds_per_call(fns: list[Callable[[], None]], dev: torch.device, iters: int) -> float:
    """Seconds per call of fns (cycled): a CUDA graph of all of them on CUDA, the wall-clock median on CPU."""
    return graph_seconds(fns) if dev.type == "cuda" else cpu_seconds(fns, iters)


def copy_bandwidth(dev: torch.device, mib: int) -> float:
    """Device-to-device copy GB/s (read + write counted)."""
    a = torch.empty(mib << 20, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    t = cpu_seconds([lambda: b.copy_(a)], 10) if dev.type == "cpu" else graph_seconds([lambda: b.copy_(a)] * 4, 5)
    return 2 * a.numel() / t / 1e9


def _random_gptq(
    k: int, n: int, gen: torch.Generator, group: int = 128, act_order: bool = True, device: torch.device | str = "cpu"
):
    """Random GPTQ tensors made directly on `device` (the kernels' speed does not depend on the values;
    quantizing a real 7B-sized matrix on the host would take most of a GPU session's minutes): random
    nibbles and zero points, scales ~0.01, and an act-order-like permuted g_idx."""
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, generator=gen).to(device)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (k // group, n // 8), dtype=torch.int32, generator=gen).to(device)
    scales = (torch.rand(k // group, n, generator=gen) * 0.01 + 0.001).half().to(device)
    g_idx = (torch.arange(k) // group).int()
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)].contiguous()
    return qweight, qzeros, scales, g_idx.to(device)


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _tinygemm_cuda(qweight, dev, copies: int):
    """torch's CUDA int4 op on the same nibbles (its own layout, group 128, bf16 scales/zeros)."""
    from qwen_audio_edge.kernels.w4_ref import unpack_rows

    nib = unpack_rows(qweight.to(dev)).T  # [N, K] 0..15, two per byte for the converter
    packed_u8 = ((nib[:, ::2] << 4) | nib[:, 1::2]).to(torch.uint8).contiguous()
    k, n = nib.shape[1], nib.shape[0]
    tq = [torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8) for _ in range(copies)]
    tsz = [torch.ones(k // 128, n, 2, dtype=torch.bfloat16, device=dev) for _ in range(copies)]
    return lambda x, i: torch.ops.aten._weight_int4pack_mm(x, tq[i], 128, tsz[i])


def _tinygemm_cpu(qweight, copies: int):
    """torch's CPU int4 op on the same nibbles (its own layout, group 128, bf16 scales/zeros)."""
    from qwen_audio_edge.kernels.w4_ref import unpack_rows

    k, n = qweight.shape[0] * 8, qweight.shape[1]
    tq = [
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_rows(qweight).T.contiguous(), 1)
        for _ in range(copies)
    ]
    tsz = [torch.ones(k // 128, n, 2, dtype=torch.bfloat16) for _ in range(copies)]
    return lambda x, i: torch.ops.aten._weight_int4pack_mm_for_cpu(x, tq[i], 128, tsz[i])


def _tinygemm(qweight, dev: torch.device, copies: int):
    """torch's int4 op (tinygemm) for `copies` weight copies: call(x_bf16, copy index)."""
    return _tinygemm_cuda(qweight, dev, copies) if dev.type == "cuda" else _tinygemm_cpu(qweight.cpu(), copies)


def _chosen(k: int, n: int) -> list[str]:
    """The launch configs the tuner picked for this K × N (it times candidates on CUDA only: empty on CPU)."""
    from qwen_audio_edge.kernels.w4_triton import TUNER

    return [f"{key[0]} m≤{key[4]}: {cfg}" for key, cfg in TUNER.choices.items() if key[1] == k and key[2] == n]


def environment(modules: tuple[str, ...] = ("numpy", "transformers", "onnxruntime", "triton")) -> dict:
    """What a result file must say about how it was made: the exact command, the machine (CPU model, cores,
    load average when the run began: other work on the cores slows every figure), the package versions and
    the repository commit. Read by bench/report.py to label each table."""
    import shlex
    import subprocess
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in modules:
        try:
            versions[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            versions[mod] = None
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            return (
                subprocess.run(
                    ["git", *args], check=False, cwd=repo, capture_output=True, text=True, timeout=10
                ).stdout.strip()
                or None
            )
        except (OSError, subprocess.SubprocessError):
            return None

    return {
        "command": shlex.join(["python", *sys.argv]),
        "machine": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions,
        "git_commit": git("rev-parse", "HEAD"),
        # tracked files under src/ or bench/ that differ from that commit: the figures may not be its code's
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", "src", "bench")),
    }


def write_json(path: str | Path, obj: dict) -> None:
    """Write obj as JSON atomically (temporary file, then rename): a reader, or a run killed mid-write by its
    time limit, sees the previous complete file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def bench_shape(
    name: str,
    k: int,
    n: int,
    ms: list[int],
    dev: torch.device,
    act: torch.dtype,
    rotate_bytes: int,
    iters: int,
    gen: torch.Generator,
    triton_path: bool,
    strict: bool = False,
) -> Iterator[dict]:
    """One row per M (yielded as soon as it is measured). `triton_path`: ours is the Triton kernel over
    rotating weight copies (CUDA; CPU under the interpreter), else the CPU int4 path (one copy). `strict`:
    a tinygemm failure is raised instead of reported."""
    from qwen_audio_edge.kernels.w4_ref import w4_matmul_ref

    qweight, qzeros, scales, g_idx = _random_gptq(k, n, gen, device=dev)
    w4_bytes = _nbytes(qweight, qzeros, scales, g_idx)
    if not triton_path:
        from qwen_audio_edge.kernels.w4_cpu import CpuW4Weight

        ours = [CpuW4Weight.build(qweight, qzeros, scales, g_idx)]
        copies = dense_copies = 1
    else:
        from qwen_audio_edge.kernels.w4_triton import TritonW4Weight

        copies = max(2, -(-rotate_bytes // w4_bytes))
        first = TritonW4Weight.build(qweight, qzeros, scales, g_idx)
        ours = [first] + [
            TritonW4Weight.build(
                first.qweight.clone(),
                qzeros.clone(),
                scales.clone(),
                torch.arange(k, device=dev, dtype=torch.int32) // 128,
            )
            for _ in range(copies - 1)
        ]  # copies of the repacked tensors (same bytes read)
        for w in ours[1:]:
            w.perm, w._xcols = first.perm, first._xcols
        dense_copies = max(2, -(-rotate_bytes // (k * n * 2)))
    try:
        tiny = _tinygemm(qweight, dev, copies)
    except Exception as e:
        if strict:
            raise
        print(f"tinygemm setup failed on {name}: {e}", flush=True)
        tiny = None
    dense = [torch.randn(n, k, dtype=act, device=dev) for _ in range(dense_copies)]
    ref_args = (qweight.to(dev), qzeros.to(dev), scales.to(dev), g_idx.to(dev))
    for m in ms:
        x = torch.randn(m, k, dtype=act, device=dev)
        xb = x.to(torch.bfloat16)  # tinygemm takes bf16 activations
        ref = w4_matmul_ref(x.float(), *ref_args)
        err = ((ours[0].matmul(x).float() - ref).abs().max() / ref.abs().max()).item()
        t_ours = seconds_per_call([lambda w=w, x=x: w.matmul(x) for w in ours], dev, iters)
        t_dense = seconds_per_call([lambda d=d, x=x: x @ d.T for d in dense], dev, iters)
        try:
            if tiny is None:
                raise RuntimeError("no tinygemm weights")
            t_tiny = seconds_per_call([lambda i=i, xb=xb: tiny(xb, i) for i in range(copies)], dev, iters)
        except Exception as e:
            if strict:
                raise
            t_tiny = None
            print(f"tinygemm failed on {name} M={m}: {e}", flush=True)
        row = {
            "shape": name,
            "k": k,
            "n": n,
            "m": m,
            "ours_ms": 1e3 * t_ours,
            "dense_ms": 1e3 * t_dense,
            "tinygemm_ms": None if t_tiny is None else 1e3 * t_tiny,
            "w4_bytes": w4_bytes,
            "ours_gbps": w4_bytes / t_ours / 1e9,
            "speedup_vs_dense": t_dense / t_ours,
            "speedup_vs_tinygemm": None if t_tiny is None else t_tiny / t_ours,
            "max_rel_err": err,
            "weight_copies": copies,
        }
        if triton_path:
            row["configs"] = _chosen(k, n)
        print(json.dumps(row), flush=True)
        yield row


def bench_cpu_dtypes(k: int, n: int, head: tuple[int, int], iters: int, gen: torch.Generator) -> list[dict]:
    """Why the CPU paths compute in bf16 whatever the activations are: torch's CPU int4 op (one K × N W4
    weight, M = 1) and int8 op (a vocab × hidden lm_head, M = 1) timed with bf16, fp16 and fp32 inputs,
    beside the dense matmul of the same shape in each dtype. One row per (op, dtype)."""
    from qwen_audio_edge.kernels.w4_ref import unpack_rows

    qweight = _random_gptq(k, n, gen)[0]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_rows(qweight).T.contiguous(), 1)
    vocab, hidden = head
    w8 = torch.randint(-127, 128, (vocab, hidden), dtype=torch.int8, generator=gen)
    rows = []
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dt).removeprefix("torch.")
        sz = torch.ones(k // 128, n, 2, dtype=dt)
        x, xh = torch.randn(1, k, dtype=dt), torch.randn(1, hidden, dtype=dt)
        s8, dense, dense_head = (
            torch.rand(vocab, dtype=dt),
            torch.randn(n, k, dtype=dt),
            torch.randn(vocab, hidden, dtype=dt),
        )
        # each callable binds this dtype's tensors (default arguments: the loop rebinds the names)
        cases = [
            (
                f"int4pack_mm_for_cpu {k}x{n}",
                lambda x=x, sz=sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, sz),
            ),
            (f"dense matmul {k}x{n}", lambda x=x, dense=dense: x @ dense.T),
            (
                f"int8pack_mm lm_head {vocab}x{hidden}",
                lambda xh=xh, s8=s8: torch.ops.aten._weight_int8pack_mm(xh, w8, s8),
            ),
            (f"dense matmul lm_head {vocab}x{hidden}", lambda xh=xh, dense_head=dense_head: xh @ dense_head.T),
        ]
        for op, fn in cases:
            try:
                ms = 1e3 * cpu_seconds([fn], iters)
            except RuntimeError as e:  # an op without this dtype on this build: say so
                ms, err = None, f"{type(e).__name__}: {str(e).splitlines()[0]}"
            else:
                err = None
            row = {"op": op, "m": 1, "activation_dtype": name, "ms": ms, **({"error": err} if err else {})}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def bench_layer(
    layer: tuple, dev: torch.device, act: torch.dtype, rotate_bytes: int, iters: int, gen: torch.Generator
) -> dict:
    """One decoder layer's four W4 matmuls at M = 1, back to back, cold weights (the Triton path)."""
    from qwen_audio_edge.kernels.w4_triton import TritonW4Weight

    parts = []
    for name, k, n, bias in layer:
        qweight, qzeros, scales, g_idx = _random_gptq(k, n, gen, device=dev)
        parts.append((name, k, n, bias, (qweight, qzeros, scales, g_idx), _nbytes(qweight, qzeros, scales, g_idx)))
    layer_bytes = sum(p[5] for p in parts)
    copies = max(2, -(-rotate_bytes // layer_bytes))
    ours, tiny, dense = [], [], []
    for _name, k, n, bias, t, _ in parts:
        b = torch.randn(n, device=dev, dtype=act) if bias else None
        x = torch.randn(1, k, device=dev, dtype=act)
        ws = [TritonW4Weight.build(*(a.clone() for a in t)) for _ in range(copies)]  # every copy cold, scales too
        tg = _tinygemm(t[0], dev, copies)
        dn = [torch.randn(n, k, dtype=act, device=dev) for _ in range(copies)]
        ours.append((ws, x, b))
        tiny.append((tg, x.to(torch.bfloat16)))
        dense.append((dn, x, b))
    # one call = the whole layer on copy c (a CUDA graph of all copies in order on CUDA), so time per call = per layer
    calls_ours = [lambda c=c: [ws[c].matmul(x, b) for ws, x, b in ours] for c in range(copies)]
    calls_tiny = [lambda c=c: [tg(xb, c) for tg, xb in tiny] for c in range(copies)]
    calls_dense = [lambda c=c: [torch.nn.functional.linear(x, dn[c], b) for dn, x, b in dense] for c in range(copies)]
    t_ours = seconds_per_call(calls_ours, dev, iters)
    t_tiny = seconds_per_call(calls_tiny, dev, iters)
    t_dense = seconds_per_call(calls_dense, dev, iters)
    row = {
        "shape": "layer",
        "parts": [p[0] for p in parts],
        "m": 1,
        "ours_ms": 1e3 * t_ours,
        "tinygemm_ms": 1e3 * t_tiny,
        "dense_ms": 1e3 * t_dense,
        "w4_bytes": layer_bytes,
        "ours_gbps": layer_bytes / t_ours / 1e9,
        "speedup_vs_dense": t_dense / t_ours,
        "speedup_vs_tinygemm": t_tiny / t_ours,
        "weight_copies": copies,
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--preset",
        default="7b",
        choices=sorted(PRESETS),
        help="7b: the real layer shapes; tiny: small ones of the same kinds (a check of this script)",
    )
    ap.add_argument(
        "--kernel",
        default="auto",
        choices=("auto", "triton", "cpu"),
        help="ours: auto = Triton on CUDA, the CPU int4 path on CPU; triton on CPU runs the Triton "
        "kernels under the interpreter (TRITON_INTERPRET=1; slow: with --preset tiny)",
    )
    ap.add_argument("--ms", default="1,8,64")
    ap.add_argument(
        "--shapes",
        default=None,
        help="comma list of the preset's shapes (7b: "
        + ", ".join(SHAPES)
        + "; tiny: "
        + ", ".join(TINY_SHAPES)
        + "); 'all' for every one; default: the unfused ones",
    )
    ap.add_argument("--iters", type=int, default=20, help="CPU timing iterations")
    ap.add_argument("--rotate-mib", type=int, default=0, help="weight copies cycled through on GPU (default 3× L2)")
    ap.add_argument("--no-layer", action="store_true", help="skip the whole-layer row (Triton path)")
    ap.add_argument(
        "--no-dtype-rows",
        action="store_true",
        help="CPU path: skip the rows timing torch's int4/int8 ops with bf16, fp16 and fp32 activations",
    )
    ap.add_argument("--peak-gbps", type=float, default=None)
    ap.add_argument(
        "--strict",
        action="store_true",
        help="fail on the errors a real run reports and works around (tinygemm, the layer row): "
        "gpu_check.sh --dry-run uses it, so that a slip cannot hide behind them",
    )
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    dev = torch.device(a.device)
    triton_path = a.kernel == "triton" or (a.kernel == "auto" and dev.type == "cuda")
    if a.kernel == "cpu" and dev.type != "cpu":
        ap.error("--kernel cpu runs on --device cpu only")
    if triton_path and dev.type == "cpu":
        # read when the kernels are defined (kernels/w4_triton.py import, below): Triton then runs on CPU tensors
        os.environ["TRITON_INTERPRET"] = "1"
    shapes, layer = PRESETS[a.preset]
    act = torch.float16 if triton_path else torch.bfloat16  # the CPU int4 op computes in bf16
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size if dev.type == "cuda" else 0
    rotate = max(a.rotate_mib << 20, 3 * l2)
    res = {
        "device": str(dev),
        "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "preset": a.preset,
        "kernel": "triton" if triton_path else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "activation_dtype": str(act),
        "peak_gbps": a.peak_gbps,
        "l2_bytes": l2,
        "rotate_bytes": rotate,
        "timing": "CUDA graph of calls over rotating weight copies, CUDA events"
        if dev.type == "cuda"
        else "wall clock, median"
        + (" (Triton interpreter: a check of the code path, not a speed)" if triton_path else ""),
        "copy_gbps": copy_bandwidth(dev, 1024 if dev.type == "cuda" else 16 if a.preset == "tiny" else 256),
        "complete": False,
        "environment": environment(),
        "rows": [],
    }
    if triton_path:
        import triton

        res["triton"] = triton.__version__
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)
    gen = torch.Generator().manual_seed(0)
    names = list(shapes) if a.shapes == "all" else list(shapes)[:3] if a.shapes is None else a.shapes.split(",")
    unknown = [s for s in names if s not in shapes]
    if unknown:
        ap.error(f"unknown shape(s) {unknown} for --preset {a.preset}: choose from {list(shapes)}")

    def save() -> None:  # after every row: a run cut off by a time limit keeps what it measured, as valid JSON
        if a.peak_gbps:
            for row in res["rows"]:
                row["ours_pct_peak"] = 100 * row["ours_gbps"] / a.peak_gbps
        if a.out:
            write_json(a.out, res)

    save()
    for name in names:
        k, n = shapes[name]
        for row in bench_shape(
            name, k, n, [int(m) for m in a.ms.split(",")], dev, act, rotate, a.iters, gen, triton_path, a.strict
        ):
            res["rows"].append(row)
            save()
    if not triton_path and not a.no_dtype_rows:
        (k, n), head = ((4096, 4096), (32000, 1024)) if a.preset == "7b" else ((256, 256), (1024, 128))
        res["dtype_rows_note"] = (
            "M = 1, wall-clock median: torch's CPU int4/int8 ops and the dense matmul with each "
            "activation dtype (why kernels/w4_cpu.py and Int8Linear compute in bf16)"
        )
        res["dtype_rows"] = bench_cpu_dtypes(k, n, head, a.iters, gen)
        save()
    if triton_path and not a.no_layer:
        try:
            res["rows"].append(bench_layer(layer, dev, act, rotate, a.iters, gen))
        except Exception as e:
            if a.strict:
                raise
            res["layer_error"] = f"{type(e).__name__}: {e}"
            print("layer row failed:", res["layer_error"], flush=True)
    res["complete"] = True
    save()
    return 1 if "layer_error" in res else 0  # the rows are saved either way; the part is reported as failed


if __name__ == "__main__":
    sys.exit(main())
