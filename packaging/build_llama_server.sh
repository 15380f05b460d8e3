#!/usr/bin/env bash
# Build llama.cpp's native llama-server from the pinned llama-cpp-python sdist (the same
# llama.cpp commit as the runtime and the converter) into
#   <prefix>/share/appliance/llama.cpp-<ver>/bin/llama-server
# where appliance/runtime/llama_server.py looks for it. appliance/serving/pool.py runs it as a private
# backend behind its own front (see that module for why: native speed with 4 clients).
#
# The built binary is cached in ${XDG_CACHE_HOME:-~/.cache}/appliance/llama-server/<key>/,
# key = sha256 of (sdist sha256 + cmake flags), so a fresh clone's setup copies it in
# seconds after the first build (~15 minutes on 2 cores).
# Usage: build_llama_server.sh [PYTHON]
# Env: APPLIANCE_LLAMA_PORTABLE=1  -> -DGGML_NATIVE=OFF (a binary that runs on other CPUs)
#      APPLIANCE_BUILD_JOBS=N      -> parallel compile jobs (default 2)
#      APPLIANCE_LLAMA_CUDA=0|1    -> force CUDA off/on (default: on when nvcc and a GPU exist)
set -euo pipefail
PY="${1:-python3}"
VER=$("$PY" -c 'from importlib.metadata import version; print(version("llama-cpp-python"))')
PREFIX=$("$PY" -c 'import sys; print(sys.prefix)')
SHARE="$PREFIX/share/appliance/llama.cpp-$VER"
SDIST="$SHARE/llama_cpp_python-$VER.tar.gz"
DEST="$SHARE/bin/llama-server"
JOBS="${APPLIANCE_BUILD_JOBS:-2}"

if [[ ! -f "$SDIST" ]]; then
    echo "build_llama_server.sh: $SDIST missing; run packaging/fetch_converter.sh first" >&2
    exit 1
fi

have_cuda() {
    case "${APPLIANCE_LLAMA_CUDA:-auto}" in
        1|on) return 0 ;;
        0|off) return 1 ;;
    esac
    command -v nvcc >/dev/null 2>&1 && nvcc --version >/dev/null 2>&1 \
        && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

# No network at build time: no prebuilt web UI download, no curl/openssl (the backend is
# reached over loopback only, behind the appliance's front).
FLAGS=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON
       -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
       -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
       -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF)
if [[ "${APPLIANCE_LLAMA_PORTABLE:-0}" == 1 ]]; then FLAGS+=(-DGGML_NATIVE=OFF); fi
if have_cuda; then FLAGS+=(-DGGML_CUDA=ON); fi

SDIST_SHA=$(sha256sum "$SDIST" | cut -d' ' -f1)
KEY=$(printf '%s %s' "$SDIST_SHA" "${FLAGS[*]}" | sha256sum | cut -c1-16)
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/appliance/llama-server/$KEY"

install_from_cache() {
    mkdir -p "$(dirname "$DEST")"
    cp "$CACHE/llama-server" "$DEST.partial"
    chmod 755 "$DEST.partial"
    mv -f "$DEST.partial" "$DEST"     # atomic: a running appliance never sees half a binary
    printf '%s\n' "$KEY" > "$SHARE/bin/llama-server.key"
}

if [[ -x "$DEST" && -f "$SHARE/bin/llama-server.key" && "$(cat "$SHARE/bin/llama-server.key")" == "$KEY" ]]; then
    echo "llama-server $VER already in $DEST"
    exit 0
fi
if [[ -x "$CACHE/llama-server" ]]; then
    install_from_cache
    echo "llama-server $VER installed from cache $CACHE"
    exit 0
fi

# Source and build tree live in the cache folder so an interrupted build resumes.
mkdir -p "$CACHE"
SRC="$CACHE/src/llama_cpp_python-$VER/vendor/llama.cpp"
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    rm -rf "$CACHE/src"
    mkdir -p "$CACHE/src"
    tar -xzf "$SDIST" -C "$CACHE/src"
fi
echo "building llama-server $VER (${FLAGS[*]}) with $JOBS jobs" >&2
cmake -S "$SRC" -B "$CACHE/build" "${FLAGS[@]}" >"$CACHE/cmake.log" 2>&1 \
    || { tail -20 "$CACHE/cmake.log" >&2; echo "cmake configure failed; log: $CACHE/cmake.log" >&2; exit 1; }
cmake --build "$CACHE/build" --target llama-server -j "$JOBS" >"$CACHE/build.log" 2>&1 \
    || { tail -20 "$CACHE/build.log" >&2; echo "llama-server build failed; log: $CACHE/build.log" >&2; exit 1; }
"$CACHE/build/bin/llama-server" --version >/dev/null 2>&1 \
    || { echo "built llama-server does not run: $CACHE/build/bin/llama-server" >&2; exit 1; }
cp "$CACHE/build/bin/llama-server" "$CACHE/llama-server.partial"
mv -f "$CACHE/llama-server.partial" "$CACHE/llama-server"
rm -rf "$CACHE/src" "$CACHE/build"
install_from_cache
echo "llama-server $VER built into $DEST (cached in $CACHE)"
