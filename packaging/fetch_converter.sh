#!/usr/bin/env bash
# Unpack llama.cpp's converter (convert_hf_to_gguf.py, conversion/, gguf-py/, models/)
# from the sdist of the pinned llama-cpp-python into <prefix>/share/appliance/, where
# appliance/runtime/toolchain.py looks for it. The converter must come from the same llama.cpp
# commit as the runtime, so it is taken from that exact sdist, never from a separate package.
# Usage: fetch_converter.sh [PYTHON] [SDIST.tar.gz]   (an sdist path skips the download)
set -euo pipefail
PY="${1:-python3}"
SDIST="${2:-}"
VER=$("$PY" -c 'from importlib.metadata import version; print(version("llama-cpp-python"))')
PREFIX=$("$PY" -c 'import sys; print(sys.prefix)')
DEST="$PREFIX/share/appliance/llama.cpp-$VER"
if [[ -f "$DEST/convert_hf_to_gguf.py" && -d "$DEST/gguf-py/gguf" ]]; then
    echo "llama.cpp converter $VER already in $DEST"
    exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [[ -z "$SDIST" ]]; then
    "$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VER" -d "$WORK"
    SDIST=$(ls "$WORK"/llama_cpp_python-"$VER".tar.gz)
fi
tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VER/vendor/llama.cpp"
mkdir -p "$DEST.partial"
cp "$SRC"/convert_hf_to_gguf.py "$SRC"/convert_lora_to_gguf.py "$DEST.partial/"
cp -r "$SRC"/conversion "$SRC"/gguf-py "$SRC"/models "$DEST.partial/"
cp "$SDIST" "$DEST.partial/"   # kept for building llama.cpp's native tools and for offline bundles
rm -rf "$DEST"
mv "$DEST.partial" "$DEST"
echo "llama.cpp converter $VER unpacked into $DEST"
