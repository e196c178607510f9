#!/usr/bin/env bash
# One call on a GPU machine (torch, triton, transformers installed; no internet): GPU tests + benchmarks.
# Writes everything under $OUT (default ./gpu-out): device.txt, gpu-tests.txt, kernels.json,
# decode_7b.json, stream_7b.json, summary.txt. Time limits per part keep the whole call under the device
# tool's 600 s per command; PARTS="tests kernels decode stream" (default all) selects parts. Packages the project needs but the machine lacks can be carried as wheels
# in ./gpu-wheels (pip download --only-binary=:all: --python-version 3.12 -d gpu-wheels pytest soundfile
# soxr onnx onnxscript jiwer), installed offline here.
set -u
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ -d gpu-wheels ]; then
  python -m pip install -q --no-index --find-links gpu-wheels gpu-wheels/*.whl >"$OUT/pip.txt" 2>&1 || true
fi
python -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/pip.txt" 2>&1 || echo "editable install failed" >>"$OUT/pip.txt"

nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv >"$OUT/device.txt" 2>&1
python - >>"$OUT/device.txt" 2>&1 <<'PY'
import torch, triton, transformers
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
PY
NAME=$(python -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null)
case "$NAME" in
  *H200*) PEAK=4800 ;;
  *H100*PCIe*) PEAK=2000 ;;
  *H100*) PEAK=3350 ;;
  *A100*80GB*) PEAK=2039 ;;
  *4090*) PEAK=1008 ;;
  *) PEAK=0 ;;
esac
echo "peak GB/s used: $PEAK ($NAME)" >>"$OUT/device.txt"
PEAKARG=""
[ "$PEAK" != "0" ] && PEAKARG="--peak-gbps $PEAK"

PARTS="${PARTS:-tests kernels decode stream}"
touch "$OUT/gpu-tests.txt" "$OUT/kernels.txt" "$OUT/decode.txt" "$OUT/stream.txt"
case " $PARTS " in *" tests "*)
  timeout 110 python -m pytest -q -m gpu tests/test_gpu.py tests/test_kernels.py >"$OUT/gpu-tests.txt" 2>&1
  echo "gpu tests exit $?" >>"$OUT/gpu-tests.txt" ;; esac
case " $PARTS " in *" kernels "*)
  timeout 130 python bench/kernels.py --device cuda $PEAKARG --ms 1,2,4,8,64,800 --out "$OUT/kernels.json" >"$OUT/kernels.txt" 2>&1
  echo "kernels exit $?" >>"$OUT/kernels.txt" ;; esac
case " $PARTS " in *" decode "*)
  timeout 170 python bench/decode.py --preset 7b --device cuda --prompt 800 --new 64 --repeats 3 --int8-head $PEAKARG \
    --out "$OUT/decode_7b.json" >"$OUT/decode.txt" 2>&1
  echo "decode exit $?" >>"$OUT/decode.txt" ;; esac
case " $PARTS " in *" stream "*)
  timeout 140 python bench/stream_device.py --shape 7b --device cuda --repeats 3 --out "$OUT/stream_7b.json" >"$OUT/stream.txt" 2>&1
  echo "stream exit $?" >>"$OUT/stream.txt" ;; esac
{ cat "$OUT/device.txt"; tail -3 "$OUT/gpu-tests.txt"; grep -h '"shape"' "$OUT/kernels.txt" | head -40; tail -25 "$OUT/decode.txt";
  grep -h '^{"seconds"\|exact_30s\|flatness\|exit' "$OUT/stream.txt"; } >"$OUT/summary.txt"
cat "$OUT/summary.txt"
