#!/usr/bin/env bash
# Regenerate every CPU timing result file under bench/results/cpu/ that README.md and docs/ cite, in
# sequence, with the exact commands, printing each step's wall time. Run it on a QUIET machine (nothing
# else on the cores: on a shared 2-core machine every timing here moves by 2-20x under load), from the
# repository root, in the project's environment:
#
#     . .venv/bin/activate && bench/measure_cpu.sh              # every step
#     bench/measure_cpu.sh decode stream_ptt                    # only the named steps
#     bench/measure_cpu.sh --list                               # the steps and their commands
#     bench/measure_cpu.sh --check [step ...]                   # each step at its smallest preset, results to a
#                                                               # temporary folder: does every script run? (~3 min)
#
# Then `python bench/report.py` rewrites the tables in README.md / docs/ from the new files. Every JSON
# records its command, machine, versions, commit and the load average at its start (`environment`).
# A step that fails is reported and the next one runs; the exit status is 1 if any step failed.
#
# Expected wall time of each step on the project's quiet 2-core x86-64 machine (torch 2.13 CPU), estimated
# from the existing result files' figures and small runs of each script (see each line):
#   kernels            ~3 min   bench/kernel_bench.py: 3 7B layer shapes x M = 1..800, 20 timed calls of ours,
#                               tinygemm and dense per row (M = 800 alone ~10 s per shape), + dtype rows
#   decode             ~2 min   bench/decode.py: cpu-mid, 4 rows of ours (~70 tok/s) + transformers fp32 (~25 tok/s)
#                               and bf16, 1 + 3 runs of 64 tokens each, + model building and RTN
#   stream             ~11 min  bench/stream.py: real-time feeds alone are 7.4 min (2+5+10+20+29.5 s of speech
#                               + 1.5 s of silence each, 2 modes x 3 repeats, played at real-time pace); then
#                               fast-feed VAD, push-to-talk, offline and transformers rows (3 repeats, 0.3-1.2 s
#                               each), fidelity; ~1 min to build and export the mid checkpoint
#   stream_ptt         ~2 min   bench/stream.py --ptt-only: offline + exact + chunked push-to-talk, 5 lengths x 3
#   stream_chunk1s     ~6 min   bench/stream.py, 1 s blocks: real-time chunked (3.7 min of audio), ptt, fidelity
#   quantize_memory    ~3 min   bench/quantize_memory.py: export --bits 4 of tiny (~8 s) and mid (~133 s)
#   encoder_precisions ~4 min   bench/fidelity_onnx.py (a guess, not checked): ONNX exports
#                               of tiny.en in 4 precisions, errors and WER on 6 utterances, 7 timed encodes each
#   bench_mid          ~15 min  qwen-audio-edge bench --shape mid: ours vs transformers fp32/bf16 at 2/5/10/30 s
#                               x 32/256 tokens, 3 repeats, cold starts, + llama.cpp (convert, llama-bench,
#                               llama-mtmd-cli); the llama.cpp build (bench/build_llama_cpp.sh, ~11 min once)
#                               is at $LLAMA_CPP (default ~/.cache/qwen-audio-edge/llama.cpp)
#   bench_7b           ~1 s     qwen-audio-edge bench --shape 7b: the 7B memory plan
#   ttft_profile       ~3 min   bench/ttft_profile.py: where our offline first token goes vs transformers, prefill
#                               tokens/s, thread defaults on an idle and a loaded machine (mid W4 export cached)
# In all about 47 minutes.

set -u
cd "$(dirname "$0")/.."
R=bench/results/cpu
LLAMA_CPP="${LLAMA_CPP:-$HOME/.cache/qwen-audio-edge/llama.cpp}"
WORK="${BENCH_WORK:-$HOME/.cache/qwen-audio-edge/bench-work}"

declare -A CMD=(
  [kernels]="python bench/kernel_bench.py --device cpu --ms 1,8,64,256,320,800 --out $R/kernels.json"
  [decode]="python bench/decode.py --preset cpu-mid --no-fuse --int8-head --dense --out $R/decode_cpu_mid.json"
  [stream]="python bench/stream.py --preset mid --out $R/stream_mid"
  [stream_ptt]="python bench/stream.py --preset mid --ptt-only --out $R/stream_mid_ptt"
  [stream_chunk1s]="python bench/stream.py --preset mid --chunk-seconds 1 --parts realtime,ptt,fidelity --realtime-modes chunked --out $R/stream_mid_chunk1s"
  [quantize_memory]="python bench/quantize_memory.py --out $R/quantize_memory.json"
  [encoder_precisions]="python bench/fidelity_onnx.py"
  [bench_mid]="qwen-audio-edge bench --shape mid --threads 2 --repeats 3 --work $WORK --llama-cpp $LLAMA_CPP --json $R/bench_mid.json --plot $R/bench_mid.png"
  [bench_7b]="qwen-audio-edge bench --shape 7b --json $R/bench_7b.json"
  [ttft_profile]="python bench/ttft_profile.py --work $WORK/ttft --threads 2 --repeats 5 --out $R/ttft_profile_mid.json"
)
ORDER=(kernels decode stream stream_ptt stream_chunk1s quantize_memory encoder_precisions bench_mid bench_7b ttft_profile)

if [[ "${1:-}" == "--check" ]]; then  # the same scripts and options at their smallest sizes: correctness, not speed
  shift
  R=$(mktemp -d)
  CMD=(
    [kernels]="python bench/kernel_bench.py --device cpu --preset tiny --ms 1,8,320 --iters 3 --out $R/kernels.json"
    [decode]="python bench/decode.py --preset tiny --prompt 16 --new 8 --repeats 1 --no-fuse --int8-head --dense --out $R/decode.json"
    [stream]="python bench/stream.py --preset tiny --lengths 2 --repeats 1 --realtime-repeats 1 --out $R/stream"
    [stream_ptt]="python bench/stream.py --preset tiny --lengths 2 --repeats 1 --ptt-only --out $R/stream_ptt"
    [stream_chunk1s]="python bench/stream.py --preset tiny --lengths 2 --repeats 1 --realtime-repeats 1 --chunk-seconds 1 --parts realtime,ptt,fidelity --realtime-modes chunked --out $R/stream_chunk1s"
    [quantize_memory]="python bench/quantize_memory.py --models tiny --num-samples 4 --out $R/quantize_memory.json"
    [encoder_precisions]="python bench/fidelity_onnx.py --limit 1 --repeats 1 --no-wer --out $R/encoder_precisions.json"
    [bench_mid]="qwen-audio-edge bench --shape tiny --seconds 2 --new-tokens 4 --repeats 1 --json $R/bench_mid.json --plot $R/bench_mid.png"
    [bench_7b]="qwen-audio-edge bench --shape 7b --json $R/bench_7b.json"
    [ttft_profile]="python bench/ttft_profile.py --preset tiny --work $R/ttft --lengths 2 --repeats 1 --out $R/ttft_profile.json"
  )
  echo "check mode: results go to $R"
fi

if [[ "${1:-}" == "--list" ]]; then
  for s in "${ORDER[@]}"; do printf '%-19s %s\n' "$s" "${CMD[$s]}"; done
  exit 0
fi
steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=("${ORDER[@]}")
for s in "${steps[@]}"; do
  [[ -n "${CMD[$s]:-}" ]] || { echo "unknown step '$s'; steps: ${ORDER[*]}" >&2; exit 2; }
done

python -c "import qwen_audio_edge" 2>/dev/null || { echo "activate the project's environment first (. .venv/bin/activate)" >&2; exit 2; }
read -r l1 l5 _ < /proc/loadavg
echo "load average: $l1 (1 min), $l5 (5 min) on $(nproc) cores"
if python -c "import sys; sys.exit(0 if float('$l1') > 0.5 else 1)"; then
  echo "WARNING: the machine is not quiet (load $l1): timings measured now are contaminated" >&2
fi

failed=()
t_all=$SECONDS
for s in "${steps[@]}"; do
  echo
  echo "=== $s: ${CMD[$s]}"
  t0=$SECONDS
  if ${CMD[$s]}; then status=ok; else status="FAILED (exit $?)"; failed+=("$s"); fi
  echo "=== $s: $status in $((SECONDS - t0)) s"
done
echo
echo "all steps: $((SECONDS - t_all)) s; failed: ${failed[*]:-none}"
[[ ${#failed[@]} -eq 0 ]]
