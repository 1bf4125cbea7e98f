#!/usr/bin/env bash
# Build (or reuse) the llama.cpp tools the GGUF tests and bench/gguf.py run: llama-quantize, llama-imatrix,
# llama-perplexity, llama-tokenize and llama-simple, CPU only, from the llama.cpp that the llama-cpp-python
# sdist vendors. Prints the bin directory on stdout; everything else goes to stderr.
#
#   scripts/llama_cpp.sh            # cache dir: $COMPRESS_LLAMA_CPP_DIR, else $XDG_CACHE_HOME/compress/llama.cpp-<version>
#   COMPRESS_LLAMA_CPP_SDIST=/tmp/lcp/llama_cpp_python-0.3.36.tar.gz scripts/llama_cpp.sh   # no download
#
# The cache sits outside the clone and is keyed by the version, so CI builds it once. GGML_NATIVE=OFF keeps the
# binaries portable between CI machines (no -march=native). A build counts as finished only when the stamp file
# exists, written last; an interrupted build is resumed by CMake, never mistaken for a finished one. flock
# keeps two processes from building the same cache at once (the second waits, then reuses).
set -euo pipefail
VERSION="${COMPRESS_LLAMA_CPP_PY_VERSION:-0.3.36}"
CACHE="${COMPRESS_LLAMA_CPP_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/compress/llama.cpp-$VERSION}"
TARGETS=(llama-quantize llama-imatrix llama-perplexity llama-tokenize llama-simple)
STAMP="$CACHE/build-complete"
JOBS="${COMPRESS_LLAMA_CPP_JOBS:-2}"

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if [ -f "$STAMP" ]; then
  echo "$CACHE/build/bin"
  exit 0
fi
start=$(date +%s)
echo "llama.cpp $VERSION: building in $CACHE (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
SDIST="${COMPRESS_LLAMA_CPP_SDIST:-}"
if [ -z "$SDIST" ]; then
  SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
  if [ ! -f "$SDIST" ]; then
    # pip download writes into a temp dir first, so a partial download never passes for the sdist.
    tmp=$(mktemp -d "$CACHE/dl.XXXX")
    "${PYTHON:-python3}" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp" >&2
    mv "$tmp"/llama_cpp_python-"$VERSION".tar.gz "$SDIST"
    rm -rf "$tmp"
  fi
fi
SRC="$CACHE/src"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  rm -rf "$SRC" "$CACHE/src.tmp"
  mkdir -p "$CACHE/src.tmp"
  tar xzf "$SDIST" -C "$CACHE/src.tmp" --strip-components=3 "llama_cpp_python-$VERSION/vendor/llama.cpp"
  mv "$CACHE/src.tmp" "$SRC"
fi
cmake -S "$SRC" -B "$CACHE/build" -G "Unix Makefiles" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON >&2
cmake --build "$CACHE/build" --config Release -j "$JOBS" --target "${TARGETS[@]}" >&2
for t in "${TARGETS[@]}"; do
  [ -x "$CACHE/build/bin/$t" ] || { echo "llama.cpp build finished without $t" >&2; exit 1; }
done
echo "version=$VERSION seconds=$(( $(date +%s) - start )) load_after='$(cut -d' ' -f1-3 /proc/loadavg)'" > "$STAMP"
echo "llama.cpp $VERSION built in $(( $(date +%s) - start )) s" >&2
echo "$CACHE/build/bin"
