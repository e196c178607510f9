#!/usr/bin/env bash
# One call on a scarce GPU machine (H100/H200 with torch, triton, transformers; no internet): the GPU tests
# and the benchmarks, within a fixed time budget, returning whatever finished.
#
#   OUT=/some/dir bash bench/gpu_check.sh              the GPU run (OUT default ./gpu-out, PYTHON default python3)
#   PARTS=quick OUT=/some/dir bash bench/gpu_check.sh  a ~3-minute second try: kernels + decode, reduced sizes
#   OUT=$(mktemp -d) PYTHON=.venv/bin/python bash bench/gpu_check.sh --dry-run
#        every part's Python path on CPU at the smallest shapes (Triton interpreter; no GPU, no nvidia-smi;
#        about a minute on 2 cores). CI runs it, so a slip in a bench script never costs a GPU run.
#
# Exit status: non-zero if any part failed. The GPU run keeps going after a failing part (and reports it);
# the dry run runs every part too. PARTS (default "tests kernels decode stream bench"), any of:
#   tests    tests/test_gpu.py, the Triton tests of tests/test_kernels.py (TEST_K below) and, if present,
#            tests/test_kernel_selfcheck.py, in TEST_SHARDS parallel pytest processes (Triton compiles are
#            CPU-bound: ~0.9 CPU-s per kernel variant, ~310 variants, 16 cores)
#   kernels  bench/kernel_bench.py: W4 kernels on the 7B shapes, CUDA-graph timed, vs tinygemm and dense fp16
#   decode   bench/decode.py: 7B-shape decode (CUDA graphs, eager, int8 head) vs transformers fp16
#   stream   bench/stream_device.py: 7B-shape push-to-talk latency, 2-30 s utterances
#   bench    qwen-audio-edge bench: --shape 7b (the 7B memory plan) and --shape tiny on the GPU beside
#            transformers fp16 (every stage, roofline against the data-sheet peak); JSON + PNG
#   pybench  (opt-in, outside the budget) the pytest-benchmark view, bench/test_bench_kernels.py
#   quick    kernels + decode at reduced sizes; within 3 minutes with setup even with a cold Triton cache
#   none     setup only (install + device report)
# INSTALL=links skips pip and uses the package by links (see part_install).
#
# Output: $OUT/summary.txt (one screen: per-part exit status, wall time, key figures) and $OUT/results.tgz
# (every file below), both rewritten after every part, so a run cut off anywhere returns what finished. The
# files stay unpacked in $OUT/raw/gpu_check/files/ (three folders down: a transfer that returns only the first
# two levels of $OUT carries just the two files above): summary.txt, parts.tsv (part, exit, wall s, limit s),
# device.txt, pip.txt, gpu-tests-selection.txt, gpu-tests-N.txt/.xml (one per shard), gpu-tests.json,
# kernels/decode/stream .json + .txt. Each bench script rewrites its JSON after every row ("complete": false
# until it ends), so a part stopped by its time limit still leaves valid JSON with what it measured.
#
# Time limits: every command runs under `timeout -s INT -k 10` until its part's deadline. SIGINT makes pytest
# print its tracebacks and summary (and write its junit XML) and a bench script its traceback (SIGTERM
# killed them silently); SIGKILL follows 10 s later if needed. Exit 124: stopped at the limit.
#
# GPU time estimate per part (H100/H200). No GPU has been lent yet, so these are derived, not measured:
# from the dry run's timings of each part's Python path and from counts of the Triton kernel variants each
# part compiles. Compiles dominate: ~0.9 CPU-s per variant with its launcher (bench/compile_check.py alone
# compiles one for sm_90 in ~0.25 s on the 2-core CI machine), once per machine (~/.triton/cache; later
# parts reuse what earlier ones compiled; a fresh machine starts cold). A variant is one distinct (kernel,
# constexprs, num_warps/num_stages, argument dtypes, 16-byte alignment, int == 1 / % 16 specialisation) key;
# the keys were counted by recording the interpreted launches of the tests on CPU: 227 for this selection of
# test_kernels.py, 8 for test_kernel_selfcheck.py (~13 on CUDA, with the fused kernels); test_gpu.py's ~70
# and the benchmarks' are counted from the code (tuner candidates x dtype x bias x K-dependent
# specialisation). Each Python process starts in ~7 s (torch, transformers, CUDA context).
#   setup    ~10 s: pip editable install ~5 s (links: <1 s); nvidia-smi + one torch/CUDA start ~6 s
#   tests    ~85 s: ~310 variants = ~280 CPU-s over 6 parallel shards (16 cores), ~55 s per shard + start 8 s
#            + the tests' own work (7B-shape RTN on the CPU, fixture exports, the 156k x 4096 int8 head)
#            ~25 s, unevenly spread; the serial run of ~115 variants overran its 140 s
#   kernels  ~30 s: ~20 variants the tests did not compile (the tuner's non-default decode configs without
#            bias, 2-row GEMV, K = 11008 split-K specialisations) ~18 s + start 7 s + tuning, graph
#            captures and replays of 5 shapes x 5 M and the layer row ~5 s (cold cache: ~40 variants, ~50 s)
#   decode   ~45 s: ~12 new variants (prefill GEMM with bias, the 4096-wide fused element-wise kernels)
#            ~11 s + start 7 s + fp16 7B build and W4 repack ~10 s + 3 timed configurations x 4 runs of
#            800 + 64 tokens with graph captures ~7 s + transformers fp16 4 x (800 + 64 tokens) ~10 s
#   stream   ~55 s: start 7 s + fixture export ~6 s + 7B decoder and encoder build ~12 s + ~15 new variants
#            (prefill buckets, 2-8-row GEMV) ~14 s + 2 warm-ups and 5 lengths x 3 repeats x 3 modes ~15 s
#   total    ~225 s expected. The limits below are the most each part may take: 420 s in all.
#   quick    ~110 s with a cold cache: setup 10 + kernels (2 shapes, M 1 and 64, the layer: ~31 variants)
#            ~40 + decode (prompt 256, 32 tokens: ~47 variants) ~60
# The dry run's wall times per part (2-core CI machine, ~1 minute in all) are in its summary.txt.
set -u

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -u$/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

# Time limits in seconds, one per part (every command of a part stops at the part's deadline). The default
# parts plus setup sum to <= 420 s, 7 minutes, so that one run fits the device tool's 10 minutes per command
# and its 15 minutes of device time per session with the machine's start; tests/test_gpu_check.py checks it.
# Each can be overridden from the environment (LIMIT_TESTS=200 ...), outside that check.
LIMIT_INSTALL=${LIMIT_INSTALL:-20}
LIMIT_DEVICE=${LIMIT_DEVICE:-15}
LIMIT_TESTS=${LIMIT_TESTS:-120}
LIMIT_KERNELS=${LIMIT_KERNELS:-55}
LIMIT_DECODE=${LIMIT_DECODE:-75}
LIMIT_STREAM=${LIMIT_STREAM:-75}
LIMIT_BENCH=${LIMIT_BENCH:-60}
# PARTS=quick: setup + these <= 180 s
LIMIT_QUICK_KERNELS=${LIMIT_QUICK_KERNELS:-55}
LIMIT_QUICK_DECODE=${LIMIT_QUICK_DECODE:-85}
# opt-in, outside the budget
LIMIT_PYBENCH=${LIMIT_PYBENCH:-90}

OUT="${OUT:-./gpu-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" || exit 2 ;; esac  # before the cd
cd "$(dirname "$0")/.." || exit 2  # the repository root: the paths below are relative to it
RAW="$OUT/raw/gpu_check/files"
rm -rf "$RAW" && mkdir -p "$RAW" || exit 2
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
MODE="GPU run"
if [ "$DRY" = 1 ]; then
  # CPU only, even on a GPU machine; Triton kernels run on CPU tensors through its interpreter
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
  MODE="DRY RUN (CPU, Triton interpreter, tiny shapes: a check of the scripts, not a speed)"
fi

PARTS="${PARTS:-tests kernels decode stream bench}"
QUICK=0
for p in $PARTS; do
  case "$p" in
    tests|kernels|decode|stream|bench|pybench|none) ;;
    quick) QUICK=1 ;;
    *) echo "gpu_check.sh: unknown part '$p' in PARTS (tests kernels decode stream bench pybench quick none)" >&2; exit 2 ;;
  esac
done
[ "$QUICK" = 1 ] && PARTS="$PARTS kernels decode"
has() { case " $PARTS " in *" $1 "*) return 0 ;; esac; return 1; }
# The GPU machine has 16 cores: 6 pytest processes compile Triton variants side by side (each ~2 CPU threads).
TEST_SHARDS="${TEST_SHARDS:-$([ "$DRY" = 1 ] && echo 2 || echo 6)}"
NPROC=$(nproc 2>/dev/null || echo 4)

# ---------------------------------------------------------------------------------------------- helpers
DEADLINE=0
FAILED=""
now() { date +%s.%N; }

limited() {  # limited CMD...: CMD until the current part's deadline (SIGINT there, SIGKILL 10 s later)
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -le 0 ]; then echo "gpu_check: no time left for: $*"; return 124; fi
  timeout -s INT -k 10 "$left" "$@"
}

run_part() {  # run_part NAME LIMIT FUNCTION: FUNCTION's commands share LIMIT; recorded, summarized, packed
  local name=$1 limit=$2 fn=$3 t0 rc
  echo "== $name (limit ${limit} s) $(date -u +%H:%M:%S)"
  t0=$(now)
  DEADLINE=$((SECONDS + limit))
  "$fn"
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')" "$limit" \
    >>"$RAW/parts.tsv"
  [ "$rc" -eq 0 ] || FAILED="$FAILED $name"
  summarize || case " $FAILED " in *" summary "*) ;; *) FAILED="$FAILED summary" ;; esac
  pack
  echo "   $name exit $rc"
}

pack() {  # $OUT/results.tgz from $RAW, replaced atomically
  "$PY" - "$RAW" "$OUT" <<'PYCODE'
import sys, tarfile, pathlib
raw, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
tmp = out / "results.tgz.part"
with tarfile.open(tmp, "w:gz") as t:
    for f in sorted(raw.iterdir()):
        if f.is_file() and not f.name.endswith(".tmp"):
            t.add(f, arcname=f.name)
tmp.replace(out / "results.tgz")
PYCODE
}

summarize() {  # $OUT/summary.txt (and a copy in $RAW) from what the parts left; gpu-tests.json from the XML
  "$PY" - "$RAW" "$OUT" "$MODE" "$DRY" <<'PYCODE'
import glob, json, math, os, sys, time
import xml.etree.ElementTree as ET

raw, out, mode, dry = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
lines, problems = [], []


def read(name):
    try:
        with open(os.path.join(raw, name)) as f:
            return f.read()
    except OSError:
        return ""


def load(name):
    text = read(name)
    return json.loads(text) if text else None


def f(x, fmt="{:.1f}"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


parts = [l.split("\t") for l in read("parts.tsv").splitlines() if l.strip()]
ran = {p[0]: p for p in parts}
lines.append(f"gpu_check {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}: {mode}")
dev = [l for l in read("device.txt").splitlines() if l.strip() and not l.startswith("name: ")]
lines += ["  " + l for l in dev[:4]]
pip = read("pip.txt").strip().splitlines()
lines.append("  " + (pip[-1] if pip else "package: -"))


def tests_section():
    """gpu-tests.json (one row per test) from the shards' junit XML; a one-line tally."""
    selected = [l for l in read("gpu-tests-selection.txt").splitlines() if "::" in l]
    rows = []
    for x in sorted(glob.glob(os.path.join(raw, "gpu-tests-[0-9]*.xml"))):
        shard = os.path.basename(x)[len("gpu-tests-"):-len(".xml")]
        for case in ET.parse(x).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = {"failure": "failed"}.get(tag, tag)
                    message = (el.get("message") or "").strip().splitlines()
                    break
            mod = case.get("classname", "").replace(".", "/")
            rows.append({"test": f"{mod}.py::{case.get('name')}", "outcome": outcome, "seconds": float(case.get("time") or 0),
                         "shard": shard, **({"message": message[0][:300] if message else ""} if outcome != "passed" else {})})
    tally = {k: sum(r["outcome"] == k for r in rows) for k in ("passed", "failed", "error", "skipped")}
    res = {"selected": len(selected), "ran": len(rows), **tally, "rows": rows,
           "note": "junit XML is written when pytest ends, also when stopped by SIGINT at the time limit"}
    tmp = os.path.join(raw, "gpu-tests.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(res, fh, indent=1)
    os.replace(tmp, os.path.join(raw, "gpu-tests.json"))
    bad = [r for r in rows if r["outcome"] in ("failed", "error")]
    text = (f"{len(selected)} selected, {len(rows)} ran{' (dry run: a fast subset)' if dry else ''}: {tally['passed']} passed, "
            f"{tally['failed']} failed, {tally['error']} errors, {tally['skipped']} skipped")
    return text, [f"    {r['outcome'].upper()} {r['test']} (gpu-tests-{r['shard']}.txt): {r.get('message', '')[:120]}" for r in bad[:8]], rows


def bench_json(name, key):
    r = load(name)
    if r is None:
        return None, "no JSON"
    n = len(r.get(key) or [])
    return r, f"{n} {key}" + ("" if r.get("complete") else " (incomplete: stopped or failed before the end)")


details, extra = {}, []
try:
    if "tests" in ran:
        details["tests"], bad, rows = tests_section()
        extra += bad
        if dry and not rows:
            problems.append("tests: no test ran")
    for part, name, key in (("kernels", "kernels.json", "rows"), ("decode", "decode.json", "runs"),
                            ("stream", "stream.json", "rows")):
        if part in ran:
            r, details[part] = bench_json(name, key)
            if dry and (r is None or not r.get(key) or not r.get("complete")):
                problems.append(f"{part}: {name} missing, empty or incomplete")
except Exception as e:  # noqa: BLE001 — the summary must still be written
    problems.append(f"summary: {type(e).__name__}: {e}")

lines.append(f"  {'part':<9}{'exit':>5}{'wall s':>9}{'limit s':>9}  result")
total = limits = 0.0
for name, rc, wall, limit in parts:
    total, limits = total + float(wall), limits + float(limit)
    note = "TIMED OUT (SIGINT at the limit) " if rc in ("124", "137") else ""
    lines.append(f"  {name:<9}{rc:>5}{float(wall):>9.1f}{float(limit):>9.0f}  {note}{details.get(name, '')}")
lines.append(f"  {'total':<9}{'':>5}{total:>9.1f}{limits:>9.0f}")
lines += extra

try:
    k = load("kernels.json")
    if k and k.get("rows"):
        peak = k.get("peak_gbps")
        lines.append(f"kernels ({k.get('name')}, {k.get('kernel')}; copy {f(k.get('copy_gbps'), '{:.0f}')} GB/s, peak "
                     f"{f(peak, '{:.0f}')}): ours µs per call by M | at M=1: GB/s, % of peak, x vs tinygemm, x vs dense | max err")
        ms = sorted({x["m"] for x in k["rows"]})
        lines.append(f"  {'shape':<26}" + "".join(f" {'M=' + str(m):>8}" for m in ms) + "  |  GB/s  %peak  x tg  x dn |  err")
        for shape in dict.fromkeys(x["shape"] for x in k["rows"]):
            by = {x["m"]: x for x in k["rows"] if x["shape"] == shape}
            one = by.get(1, next(iter(by.values())))
            lines.append(f"  {shape:<26}" + "".join(f" {f(by[m]['ours_ms'] * 1e3 if m in by else None):>8}" for m in ms)
                         + f"  | {f(one.get('ours_gbps'), '{:5.0f}')} {f(one.get('ours_pct_peak'), '{:5.1f}')} "
                         f"{f(one.get('speedup_vs_tinygemm'), '{:5.2f}')} {f(one.get('speedup_vs_dense'), '{:5.2f}')} "
                         f"| {f(max((x.get('max_rel_err') or 0) for x in by.values()), '{:.0e}')}")
        if k.get("layer_error"):
            lines.append(f"  layer row failed: {k['layer_error'][:150]}")
    d = load("decode.json")
    if d and d.get("runs"):
        lines.append(f"decode ({d.get('preset')}, prompt {d.get('prompt_tokens')}, {d.get('new_tokens')} new; w4 {d.get('w4_kernels')}, "
                     f"fused {d.get('fused_kernels')}): tok/s (% of peak bandwidth)")
        lines.append("  " + "; ".join(f"{name} {f(r.get('decode_tok_s'))}" + (f" ({f(r['pct_of_peak_bandwidth'])}%)" if "pct_of_peak_bandwidth" in r else "")
                                      for name, r in d["runs"].items()) + f"; x{f(d.get('speedup_vs_transformers'), '{:.2f}')} vs transformers")
        for name, r in d["runs"].items():
            b = r.get("breakdown")
            if b:
                lines.append(f"  {name} step: {f(b['step_graph_ms'], '{:.2f}')} ms = W4 {f(b['w4_matmuls_ms'], '{:.2f}')} + head "
                             f"{f(b['lm_head_ms'], '{:.2f}')} + rest {f(b['attention_norms_rope_other_ms'], '{:.2f}')}; host "
                             f"{f(b['host_sampling_ms'], '{:.2f}')} ms/token")
    s = load("stream.json")
    if s and s.get("rows"):
        lines.append(f"stream ({s.get('shape')}; w4 {s.get('w4_kernels')}): ms to first token after end of audio "
                     "(offline run | exact | chunked; encoder + prefill ms in brackets)")
        for r in s["rows"]:
            lines.append(f"  {r['seconds']:>5.1f} s  {f(r.get('offline_ttft_ms')):>8} | {f(r.get('exact_ttft_ms')):>8} "
                         f"[{f(r.get('exact_encoder_ms'))} + {f(r.get('exact_prefill_ms'))}] | {f(r.get('chunked_ttft_ms')):>8} "
                         f"[{f(r.get('chunked_encoder_ms'))} + {f(r.get('chunked_prefill_ms'))}]")
        if "exact_30s_push_to_talk_ms" in s:
            lines.append(f"  30 s exact push-to-talk {f(s['exact_30s_push_to_talk_ms'])} ms (target <= 60); chunked 30 s / 5 s "
                         f"{f(s.get('chunked_flatness_30s_over_5s'), '{:.2f}')}")
except Exception as e:  # noqa: BLE001
    problems.append(f"summary figures: {type(e).__name__}: {e}")

for name, rc, *_ in parts:  # the last lines of each failed part's log(s)
    if rc != "0":
        if name == "tests":  # pytest's closing tally of each shard (the failing tests are listed above)
            tails = [(os.path.basename(x), [l for l in read(os.path.basename(x)).splitlines() if l.strip()][-1:])
                     for x in sorted(glob.glob(os.path.join(raw, "gpu-tests-[0-9]*.txt")))]
            tails = tails or [("gpu-tests-selection.txt", [l for l in read("gpu-tests-selection.txt").splitlines() if l.strip()][-3:])]
        else:
            log = {"install": "pip.txt"}.get(name, f"{name}.txt")
            tails = [(log, [l for l in read(log).splitlines() if l.strip()][-3:])]
        lines += [f"  {name} {log}: {l[:140]}" for log, tail in tails for l in tail]
lines += [f"PROBLEM {p}" for p in problems]
text = "\n".join(lines) + "\n"
for path in (os.path.join(out, "summary.txt"), os.path.join(raw, "summary.txt")):
    with open(path + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)
sys.exit(1 if problems else 0)
PYCODE
}

# ------------------------------------------------------------------------------------------------ parts
part_install() {
  # Wheels the machine lacks may be carried in ./gpu-wheels: offline, each on its own (--no-deps: one unmet
  # dependency made pip drop them all). Then the package, editable and offline, with the machine's own
  # setuptools (--no-build-isolation: no index to fetch one from). If that fails (e.g. a setuptools too old
  # to build an editable wheel without `wheel`), the package layout of pyproject.toml is made by links on
  # PYTHONPATH. The dry run only asks pip whether it would install (--dry-run runs the build backend's
  # metadata step, installs nothing): it leaves the environment alone.
  local pipdry="" how=""
  [ "$DRY" = 1 ] && pipdry="--dry-run"
  {
    if compgen -G "gpu-wheels/*.whl" >/dev/null; then
      limited "$PY" -m pip install $pipdry -q --no-index --no-deps gpu-wheels/*.whl || echo "gpu-wheels: pip failed"
    fi
    if [ "${INSTALL:-auto}" = links ]; then
      how="links (INSTALL=links)"
    elif limited "$PY" -m pip install $pipdry -q --no-index --no-deps --no-build-isolation -e .; then
      if [ "$DRY" = 1 ]; then
        how="pip --dry-run: the editable install would build"
      else
        how="pip editable install"
      fi
    else
      how="links (the editable install failed: see above)"
    fi
    if ! "$PY" -c "import qwen_audio_edge.kernels, qwen_audio_edge.runtime" 2>/dev/null; then
      SHIM=$(mktemp -d)
      mkdir -p "$SHIM/qwen_audio_edge"
      cp -r src/qwen_audio_edge/. "$SHIM/qwen_audio_edge/"
      for d in runtime export kernels; do ln -s "$PWD/$d" "$SHIM/qwen_audio_edge/$d"; done
      export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
      case "$how" in links*) ;; *) how="$how; not importable, so links" ;; esac
      how="$how: package by links from $SHIM on PYTHONPATH"
    fi
    "$PY" -c "import qwen_audio_edge.kernels, qwen_audio_edge.runtime, os; print('package from', os.path.dirname(qwen_audio_edge.__file__))" \
      || { echo "package: NOT importable"; return 1; }
    echo "package: $how"
  } >>"$RAW/pip.txt" 2>&1
}

PEAKARG=()
part_device() {
  {
    if [ "$DRY" = 1 ]; then
      echo "dry run: CPU only (CUDA_VISIBLE_DEVICES=''), Triton kernels under TRITON_INTERPRET=1, no nvidia-smi"
    else
      limited nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv,noheader \
        || echo "nvidia-smi failed"
    fi
    limited env DRY="$DRY" "$PY" - <<'PYCODE'
import os, platform, sys
import torch, triton, transformers
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__,
      "transformers", transformers.__version__, "cpus", os.cpu_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "capability", (p.major, p.minor), "SMs", p.multi_processor_count, "L2 MiB", p.L2_cache_size / 2**20)
    print("name:", p.name)
else:
    print("device: no CUDA device")
sys.exit(0 if torch.cuda.is_available() or os.environ["DRY"] == "1" else 1)
PYCODE
  } >"$RAW/device.txt" 2>&1
  local rc=$? name peak
  name=$(sed -n 's/^name: //p' "$RAW/device.txt")
  case "$name" in  # datasheet peak memory bandwidth, GB/s (kernels and decode report % of it)
    *H200*) peak=4800 ;;
    *H100*PCIe*) peak=2000 ;;
    *H100*) peak=3350 ;;
    *A100*80GB*) peak=2039 ;;
    *4090*) peak=1008 ;;
    *) peak=0 ;;
  esac
  echo "peak GB/s used: $peak (${name:-no GPU})" >>"$RAW/device.txt"
  [ "$peak" != 0 ] && PEAKARG=(--peak-gbps "$peak")
  return $rc
}

# GPU-relevant tests. -k matches names from the tests/ folder down (module, function, parameters, markers).
# Whole modules: test_gpu.py and test_kernel_selfcheck.py ("selfcheck"). From test_kernels.py: every Triton
# test (new ones whose name says "triton" included), the int8 head GEMV, the fused element-wise kernels, the
# tuner, the --no-w4-tune plumbing and the QuantLinear paths; not the check that Triton on CPU weights is
# refused without the interpreter (no kernel runs) nor the sm_90 cross-compile (a GPU-less machine's check).
# `--collect-only` lists them in gpu-tests-selection.txt (tests/test_gpu_check.py checks the list).
TEST_K="test_gpu or selfcheck or ((triton or int8_head or fused_elementwise or tuner or w4_tuning or quantlinear_paths) and not refused and not compile_for_hopper)"
# The dry run skips what takes the interpreter minutes (test_gpu.py's tests skip themselves without CUDA).
DRY_SKIP=(-e test_triton_kernels_match_reference -e test_every_triton_config_matches_reference
          -e test_kernel_selfcheck.py -e split_k_is_deterministic)

part_tests() {
  local files=(tests/test_gpu.py tests/test_kernels.py) dir rc r pids=() f i ids threads selfcheck=0
  [ -f tests/test_kernel_selfcheck.py ] && files+=(tests/test_kernel_selfcheck.py)
  # a module that fails to import is reported (exit status) but does not cost the others their run
  limited "$PY" -m pytest --collect-only -q -p no:cacheprovider --continue-on-collection-errors "${files[@]}" \
    -k "$TEST_K" >"$RAW/gpu-tests-selection.txt" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] && return $rc
  # Shards: test_kernel_selfcheck.py's tests share module fixtures (a W4 export), so they stay together in
  # shard 0; the rest go round-robin over the others (parametrized cases of one test spread out).
  dir=$(mktemp -d)
  grep -q '^tests/test_kernel_selfcheck\.py::' "$RAW/gpu-tests-selection.txt" && [ "$TEST_SHARDS" -gt 1 ] && selfcheck=1
  grep -E '^tests/[^ :]+\.py::' "$RAW/gpu-tests-selection.txt" | awk -v n="$TEST_SHARDS" -v s="$selfcheck" -v dir="$dir" '
    s == 1 && /test_kernel_selfcheck\.py::/ { print > (dir "/0"); next }
    { print > (dir "/" (s + (i++ % (n - s)))) }'
  threads=$((NPROC / TEST_SHARDS)); [ "$threads" -ge 1 ] || threads=1
  for f in "$dir"/*; do
    i=$(basename "$f")
    if [ "$DRY" = 1 ]; then grep -v "${DRY_SKIP[@]}" "$f" >"$f.dry"; mv "$f.dry" "$f"; fi
    mapfile -t ids <"$f"  # node ids may hold spaces (parameters)
    [ "${#ids[@]}" -gt 0 ] || continue
    # its own --basetemp: parallel sessions never clean up each other's temporary folders
    limited env OMP_NUM_THREADS="$threads" "$PY" -m pytest -q -rfE --tb=short -p no:cacheprovider --durations=10 \
      --basetemp="$dir/tmp-$i" --junitxml="$RAW/gpu-tests-$i.xml" "${ids[@]}" >"$RAW/gpu-tests-$i.txt" 2>&1 &
    pids+=($!)
  done
  for i in "${pids[@]}"; do  # the first failure's exit status (collection's first), but 124 (stopped at the limit) wins
    wait "$i"; r=$?
    if [ "$r" -ne 0 ] && { [ "$rc" -eq 0 ] || [ "$r" -eq 124 ]; }; then rc=$r; fi
  done
  rm -rf "$dir"
  [ "${#pids[@]}" -gt 0 ] || { echo "no test selected" >>"$RAW/gpu-tests-selection.txt"; return 1; }
  return $rc
}

part_kernels() {
  local args
  if [ "$DRY" = 1 ]; then args=(--device cpu --preset tiny --kernel triton --shapes qkvo_256x256 --ms 1,2,64 --iters 2 --strict)
  elif [ "$QUICK" = 1 ]; then args=(--device cuda "${PEAKARG[@]}" --shapes qkv_fused_4096x12288,down_11008x4096 --ms 1,64)
  else args=(--device cuda "${PEAKARG[@]}" --shapes all --ms 1,2,8,64,800); fi
  limited "$PY" bench/kernel_bench.py "${args[@]}" --out "$RAW/kernels.json" >"$RAW/kernels.txt" 2>&1
}

part_decode() {
  local args
  if [ "$DRY" = 1 ]; then args=(--preset tiny --device cpu --gpu-path --prompt 12 --new 3 --repeats 1)
  elif [ "$QUICK" = 1 ]; then args=(--preset 7b --device cuda --prompt 256 --new 32 --repeats 2 "${PEAKARG[@]}")
  else args=(--preset 7b --device cuda --prompt 800 --new 64 --repeats 3 "${PEAKARG[@]}"); fi
  limited "$PY" bench/decode.py "${args[@]}" --int8-head --out "$RAW/decode.json" >"$RAW/decode.txt" 2>&1
}

part_stream() {
  local args
  if [ "$DRY" = 1 ]; then args=(--shape tiny --device cpu --gpu-path --lengths 1 --repeats 1 --warmups 1)
  else args=(--shape 7b --device cuda --repeats 3); fi
  limited "$PY" bench/stream_device.py "${args[@]}" --out "$RAW/stream.json" >"$RAW/stream.txt" 2>&1
}

part_bench() {
  limited "$PY" -m qwen_audio_edge.cli bench --shape 7b --json "$RAW/bench_7b.json" >"$RAW/bench_7b.txt" 2>&1 || return $?
  local args
  if [ "$DRY" = 1 ]; then args=(--device cpu --seconds 2 --new-tokens 4 --repeats 1 --baselines none)
  else args=(--device cuda --seconds 5,30 --new-tokens 32 --repeats 3 --check-tokens 8)
    "$PY" -c "import matplotlib" 2>/dev/null && args+=(--plot "$RAW/bench_tiny.png"); fi
  limited "$PY" -m qwen_audio_edge.cli bench --shape tiny "${args[@]}" --json "$RAW/bench_tiny.json" \
    >"$RAW/bench_tiny.txt" 2>&1
}

part_pybench() {
  if [ "$DRY" = 1 ]; then  # the 7B shapes on CPU would take minutes: collection only
    limited "$PY" -m pytest --collect-only -q -p no:cacheprovider bench/test_bench_kernels.py >"$RAW/pybench.txt" 2>&1
  else
    limited "$PY" -m pytest -q bench/test_bench_kernels.py --benchmark-only --benchmark-json "$RAW/pybench.json" \
      >"$RAW/pybench.txt" 2>&1
  fi
}

# -------------------------------------------------------------------------------------------------- run
echo "gpu_check: $MODE; parts: $PARTS; OUT=$OUT"
run_part install "$LIMIT_INSTALL" part_install
run_part device "$LIMIT_DEVICE" part_device
has tests && run_part tests "$LIMIT_TESTS" part_tests
if [ "$QUICK" = 1 ]; then
  run_part kernels "$LIMIT_QUICK_KERNELS" part_kernels
  run_part decode "$LIMIT_QUICK_DECODE" part_decode
else
  has kernels && run_part kernels "$LIMIT_KERNELS" part_kernels
  has decode && run_part decode "$LIMIT_DECODE" part_decode
fi
has stream && run_part stream "$LIMIT_STREAM" part_stream
has bench && run_part bench "$LIMIT_BENCH" part_bench
has pybench && run_part pybench "$LIMIT_PYBENCH" part_pybench
cat "$OUT/summary.txt"
if [ -n "$FAILED" ]; then
  echo "gpu_check: failed:$FAILED"
  exit 1
fi
