#!/usr/bin/env bash
# Build llama.cpp offline, as the llama.cpp peer of `qwen-audio-edge bench --llama-cpp DIR` (issue #13).
#
# Why from llama-cpp-python's sdist: it is on PyPI (reachable where GitHub is not) and vendors a pinned
# llama.cpp with everything the benchmark needs: convert_hf_to_gguf.py (text model + `--mmproj` for the
# Qwen2-Audio encoder/projector), gguf-py, llama-bench, llama-mtmd-cli and llama-quantize.
#
# Usage: bench/build_llama_cpp.sh [DIR]        (default DIR: ~/.cache/qwen-audio-edge/llama.cpp)
# Prints DIR on its last line: pass it as `--llama-cpp DIR` or QAE_LLAMA_CPP=DIR (live test).
# Idempotent: the download, the extraction, the cmake configure and the build are each skipped when done.
# Needs: pip (PIP env var; default: the repo's .venv python -m pip, else python3 -m pip), cmake >= 3.14 and a
# C++17 compiler (Debian: cmake, g++). CPU build, GGML_NATIVE on (tuned for this machine: rebuild on another
# CPU), no curl/openssl, no server, only the 3 tools and what they link.
# Measured: 0.3.36 took 1207 s (20 min: extract + configure + build, -j2, g++ 12, a shared 2-core x86-64
# machine at load ~6) plus ~70 s for the download (pip builds the sdist's metadata); a second run: 3-7 s.
# The converter also needs torch, transformers, numpy, pyyaml, tqdm, requests (all in our venv); gguf comes
# from the vendored gguf-py (DIR/gguf-py on PYTHONPATH), not from PyPI.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DIR="${1:-$HOME/.cache/qwen-audio-edge/llama.cpp}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PIP:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PIP="$ROOT/.venv/bin/python -m pip"; else PIP="python3 -m pip"; fi
fi
JOBS="$(nproc)"
TARGETS=(llama-bench llama-mtmd-cli llama-quantize)

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
SDIST="$DIR/llama_cpp_python-$VERSION.tar.gz"
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
BUILD="$DIR/build"
start=$(date +%s)

if [[ ! -f "$SDIST" ]]; then
    echo "== downloading llama-cpp-python==$VERSION sources" >&2
    $PIP download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$DIR" >&2
fi
if [[ ! -f "$SRC/convert_hf_to_gguf.py" ]]; then
    echo "== extracting $SDIST" >&2
    tar -xzf "$SDIST" -C "$DIR"
fi
# llama-mtmd-cli logs through an asynchronous logger that is deliberately never flushed at exit
# (common/log.cpp: "this design may cause logs to be lost", ggml-org/llama.cpp#22142): on a small model the
# end of the generated text and the llama_perf timings are often lost when stdout/stderr are pipes. One
# line flushes it before main returns (after all timed work, so it changes no figure we read).
CLI="$SRC/tools/mtmd/mtmd-cli.cpp"
if ! grep -q "qwen-audio-edge" "$CLI"; then
    echo "== patching $CLI: flush the logger at exit" >&2
    sed -i 's|^\(    \)llama_perf_context_print(ctx.lctx);$|&\n\1common_log_pause(common_log_main()); // qwen-audio-edge: flush logs at exit|' "$CLI"
    grep -q "qwen-audio-edge" "$CLI" || { echo "error: could not patch $CLI" >&2; exit 1; }
fi
if [[ ! -f "$BUILD/CMakeCache.txt" ]]; then
    echo "== configuring (Release, CPU, GGML_NATIVE=ON)" >&2
    cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF >&2
fi
# cmake's own dependency check makes a finished build a no-op (seconds), and rebuilds what a patch touched.
echo "== building ${TARGETS[*]} with -j$JOBS" >&2
cmake --build "$BUILD" --config Release -j"$JOBS" --target "${TARGETS[@]}" >&2
# Stable names for find_llama_cpp(): DIR/bin (tools), DIR/convert_hf_to_gguf.py, DIR/gguf-py, DIR/VERSION.
ln -sfn "$BUILD/bin" "$DIR/bin"
ln -sfn "$SRC/convert_hf_to_gguf.py" "$DIR/convert_hf_to_gguf.py"
ln -sfn "$SRC/gguf-py" "$DIR/gguf-py"
commit="$(git -C "$SRC" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "llama-cpp-python $VERSION (llama.cpp $commit)" >"$DIR/VERSION"
echo "== done in $(($(date +%s) - start)) s; $(cat "$DIR/VERSION")" >&2
echo "$DIR"
