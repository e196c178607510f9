#!/usr/bin/env bash
# One call on a GPU machine (torch, triton, transformers installed; no internet): GPU tests + benchmarks.
#
#   OUT=/some/dir bash bench/gpu_check.sh          (default OUT=./gpu-out; PYTHON=python3 by default)
#
# Writes $OUT/summary.txt and $OUT/results.tgz (refreshed after every part, so a cut-off run still returns
# what finished). The tarball holds device.txt, gpu-tests.txt, kernels.json/.txt, decode_7b.json/.txt,
# stream_7b.json/.txt, pip.txt; the same files stay unpacked in $OUT/raw/gpu_check/files/ (three folders
# down, so a transfer that returns only the first levels of $OUT carries just the two files above).
# Time limits per part keep the whole call under the device tool's 600 s per command. PARTS="tests kernels
# decode stream" (default) selects parts; "pybench" adds the pytest-benchmark view
# (bench/test_bench_kernels.py). Triton compiles land in ~/.triton/cache, so later parts reuse what
# earlier ones compiled; each process re-times its configs (fast once compiled). Packages the machine
# lacks can be carried as wheels in ./gpu-wheels, installed offline here.
set -u
OUT="${OUT:-./gpu-out}"
PY="${PYTHON:-python3}"
RAW="$OUT/raw/gpu_check/files"
mkdir -p "$RAW"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
pack() {
  "$PY" - "$RAW" "$OUT" <<'PYCODE'
import sys, tarfile, pathlib
raw, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
tmp = out / "results.tgz.part"
with tarfile.open(tmp, "w:gz") as t:
    for f in sorted(raw.iterdir()):
        t.add(f, arcname=f.name)
tmp.replace(out / "results.tgz")
PYCODE
}

if [ -d gpu-wheels ]; then
  "$PY" -m pip install -q --no-index --find-links gpu-wheels gpu-wheels/*.whl >"$RAW/pip.txt" 2>&1 || true
fi
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >>"$RAW/pip.txt" 2>&1 || echo "editable install failed" >>"$RAW/pip.txt"
if ! "$PY" -c "import qwen_audio_edge.kernels, qwen_audio_edge.runtime" >>"$RAW/pip.txt" 2>&1; then
  # no install possible: the package layout of pyproject.toml, by links
  SHIM=$(mktemp -d)
  mkdir -p "$SHIM/qwen_audio_edge"
  cp -r src/qwen_audio_edge/. "$SHIM/qwen_audio_edge/"
  for d in runtime export kernels; do ln -s "$PWD/$d" "$SHIM/qwen_audio_edge/$d"; done
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  echo "using the package by links from $SHIM" >>"$RAW/pip.txt"
fi

nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv >"$RAW/device.txt" 2>&1
"$PY" - >>"$RAW/device.txt" 2>&1 <<'PYCODE'
import torch, triton, transformers
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)
p = torch.cuda.get_device_properties(0)
print("device", p.name, "capability", (p.major, p.minor), "SMs", p.multi_processor_count, "L2 MiB", p.L2_cache_size / 2**20)
PYCODE
NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null)
case "$NAME" in
  *H200*) PEAK=4800 ;;
  *H100*PCIe*) PEAK=2000 ;;
  *H100*) PEAK=3350 ;;
  *A100*80GB*) PEAK=2039 ;;
  *4090*) PEAK=1008 ;;
  *) PEAK=0 ;;
esac
echo "peak GB/s used: $PEAK ($NAME)" >>"$RAW/device.txt"
PEAKARG=""
[ "$PEAK" != "0" ] && PEAKARG="--peak-gbps $PEAK"
pack

PARTS="${PARTS:-tests kernels decode stream}"
touch "$RAW/gpu-tests.txt" "$RAW/kernels.txt" "$RAW/decode.txt" "$RAW/stream.txt"
case " $PARTS " in *" tests "*)
  # the GPU tests, and the kernel tests that run on CUDA when there is one (fused kernels, int8 head)
  timeout 140 "$PY" -m pytest -q tests/test_gpu.py tests/test_kernels.py -k "gpu or cuda or fused or int8_head" \
    >"$RAW/gpu-tests.txt" 2>&1
  echo "gpu tests exit $?" >>"$RAW/gpu-tests.txt"; pack ;; esac
case " $PARTS " in *" kernels "*)
  timeout 140 "$PY" bench/kernels.py --device cuda $PEAKARG --shapes all --ms 1,2,8,64,800 --out "$RAW/kernels.json" >"$RAW/kernels.txt" 2>&1
  echo "kernels exit $?" >>"$RAW/kernels.txt"; pack ;; esac
case " $PARTS " in *" decode "*)
  timeout 150 "$PY" bench/decode.py --preset 7b --device cuda --prompt 800 --new 64 --repeats 3 --int8-head $PEAKARG \
    --out "$RAW/decode_7b.json" >"$RAW/decode.txt" 2>&1
  echo "decode exit $?" >>"$RAW/decode.txt"; pack ;; esac
case " $PARTS " in *" stream "*)
  timeout 110 "$PY" bench/stream_device.py --shape 7b --device cuda --repeats 3 --out "$RAW/stream_7b.json" >"$RAW/stream.txt" 2>&1
  echo "stream exit $?" >>"$RAW/stream.txt"; pack ;; esac
case " $PARTS " in *" pybench "*)
  timeout 90 "$PY" -m pytest -q bench/test_bench_kernels.py --benchmark-only --benchmark-json "$RAW/pybench.json" >"$RAW/pybench.txt" 2>&1
  echo "pybench exit $?" >>"$RAW/pybench.txt"; pack ;; esac
{ cat "$RAW/device.txt"; tail -3 "$RAW/gpu-tests.txt";
  "$PY" - "$RAW/kernels.json" <<'PYCODE' 2>/dev/null || grep -h 'exit' "$RAW/kernels.txt"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"copy {r['copy_gbps']:.0f} GB/s, peak {r['peak_gbps']}")
for x in r["rows"]:
    print(f"{x['shape']:<26} M={x['m']:<4} ours {x['ours_ms']*1e3:8.1f} us {x['ours_gbps']:7.0f} GB/s "
          f"{x.get('ours_pct_peak', 0):5.1f}% | tinygemm x{(x.get('speedup_vs_tinygemm') or 0):.2f} | dense x{x['speedup_vs_dense']:.2f} "
          f"| err {x.get('max_rel_err', 0):.1e}")
PYCODE
  grep -h 'exit' "$RAW/kernels.txt"; tail -25 "$RAW/decode.txt";
  grep -h '^{"seconds"\|exact_30s\|flatness\|exit' "$RAW/stream.txt"; } >"$OUT/summary.txt"
cp "$OUT/summary.txt" "$RAW/summary.txt"
pack
cat "$OUT/summary.txt"
