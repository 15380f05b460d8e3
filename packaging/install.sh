#!/usr/bin/env bash
# Install the appliance from this offline bundle (docs/install.md). Needs no network.
#
#   sudo bash install.sh [options]            install, or upgrade an existing install
#   sudo bash install.sh --uninstall [--purge] remove the program and the units
#                                              (--purge: the data and the user too)
# Options:
#   --prefix DIR   the program (a Python venv)       default /opt/appliance   (env APPLIANCE_PREFIX)
#   --data DIR     the appliance home (data, models) default /var/lib/appliance (env APPLIANCE_DATA)
#   --python PY    the Python to build the venv from (default python3; must match the bundle's)
#   --no-user      run as the invoking user: no system user 'appliance', no chown (tests)
#   --no-systemd   do not install, enable or start the systemd units
#   --no-init      do not run 'appliance init' (the base model export takes a few minutes)
#   --no-server-build  if the bundle has no llama-server, do not build one here (~15 min)
#
# Upgrade: installing a newer bundle over an install replaces the program and the units and
# keeps the home (data, models, API key); 'appliance init' on an existing home changes nothing.
set -euo pipefail
BUNDLE=$(cd "$(dirname "$0")" && pwd)
PREFIX="${APPLIANCE_PREFIX:-/opt/appliance}"
DATA="${APPLIANCE_DATA:-/var/lib/appliance}"
PY=python3
SVC_USER=appliance
MAKE_USER=1 SYSTEMD=1 INIT=1 UNINSTALL=0 PURGE=0 SERVER_BUILD=1
UNIT_DIR="${APPLIANCE_UNIT_DIR:-/etc/systemd/system}"
UNITS=(appliance.service appliance-server.service)

die() { echo "install.sh: $*" >&2; exit 1; }
step() { printf '== %s\n' "$*" >&2; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --prefix) PREFIX="${2:?}"; shift 2 ;;
        --data) DATA="${2:?}"; shift 2 ;;
        --python) PY="${2:?}"; shift 2 ;;
        --no-user) MAKE_USER=0; shift ;;
        --no-systemd) SYSTEMD=0; shift ;;
        --no-init) INIT=0; shift ;;
        --no-server-build) SERVER_BUILD=0; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
PREFIX=$(realpath -m "$PREFIX")
DATA=$(realpath -m "$DATA")
[[ "$PREFIX" != / && "$DATA" != / && "$PREFIX" != "$DATA" ]] || die "--prefix and --data must be two distinct folders, not /"
if [[ $MAKE_USER == 1 || $SYSTEMD == 1 ]] && [[ $(id -u) != 0 ]]; then
    die "run as root (sudo), or pass --no-user --no-systemd to install for this user only"
fi
# systemd is PID 1 on a normal boot; in a container or a chroot it is not, and then the
# units are copied but not enabled.
systemd_running() { [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; }
info() { grep -m1 "^$1=" "$BUNDLE/BUNDLE_INFO" | cut -d= -f2-; }

stop_units() {
    [[ $SYSTEMD == 1 ]] && systemd_running || return 0
    systemctl stop "${UNITS[@]}" 2>/dev/null || true
}

# A venv holds absolute paths, so only a folder that looks like our install is removed.
remove_program() {
    [[ -e "$PREFIX" ]] || return 0
    [[ -f "$PREFIX/pyvenv.cfg" ]] || die "$PREFIX is not an appliance install (no pyvenv.cfg); not touching it"
    rm -rf "$PREFIX"
}

uninstall() {
    if [[ $SYSTEMD == 1 ]]; then
        if systemd_running; then systemctl disable --now "${UNITS[@]}" 2>/dev/null || true; fi
        for unit in "${UNITS[@]}"; do rm -f "$UNIT_DIR/$unit"; done
        if systemd_running; then systemctl daemon-reload; fi
    fi
    remove_program
    echo "removed the program ($PREFIX) and the units"
    if [[ $PURGE == 1 ]]; then
        if [[ -d "$DATA" ]]; then
            [[ -f "$DATA/config.toml" || -z "$(ls -A "$DATA")" ]] || die "$DATA is not an appliance home; not purging it"
            rm -rf "$DATA"
        fi
        if [[ $MAKE_USER == 1 ]] && getent passwd "$SVC_USER" >/dev/null; then userdel "$SVC_USER"; fi
        echo "purged the data ($DATA)"
    else
        echo "kept the data in $DATA (models, documents, API key); 'install.sh --uninstall --purge' removes it"
    fi
}

if [[ $UNINSTALL == 1 ]]; then uninstall; exit 0; fi

START=$SECONDS
umask 022   # the program is world-readable; the home is made private below
step "verifying the bundle against MANIFEST.sha256"
command -v "$PY" >/dev/null 2>&1 || die "$PY not found; install Python $(info python) (python3, python3-venv)"
"$PY" "$BUNDLE/verify_manifest.py" verify "$BUNDLE" || die "refusing to install a bundle that does not match its manifest"
WANT_PY=$(info python)
HAVE_PY=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[[ "$HAVE_PY" == "$WANT_PY" ]] || die "this bundle is for Python $WANT_PY, $PY is $HAVE_PY; pass --python python$WANT_PY"
[[ "$(uname -m)" == "$(info machine)" ]] || die "this bundle is for $(info machine), this machine is $(uname -m)"
"$PY" -c 'import venv, ensurepip' 2>/dev/null || die "$PY lacks venv/ensurepip; install the python3-venv package"

LLAMA_VER=$(info llama_cpp_python)
APP_VER=$(info appliance)
SHARE="$PREFIX/share/appliance/llama.cpp-$LLAMA_VER"
OFFLINE_PIP_ARGS=(--no-index --find-links "$BUNDLE/wheels" --disable-pip-version-check --no-input)
# Only the bundle: no pip.conf of this machine may add an index, links or constraints.
while read -r var; do unset "$var"; done < <(env | sed -n 's/^\(PIP_[A-Z_]*\)=.*/\1/p')
export PIP_CONFIG_FILE=/dev/null

has_gpu_toolchain() {
    command -v nvcc >/dev/null 2>&1 && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

install_llama_cpp() {
    local pip=("$PREFIX/bin/python" -m pip)
    # A bundled wheel pip accepts for this machine (tags) wins; else the bundled sdist.
    if "${pip[@]}" install -q "${OFFLINE_PIP_ARGS[@]}" --only-binary llama-cpp-python "llama-cpp-python==$LLAMA_VER" 2>/dev/null; then
        return 0
    fi
    local args="-DGGML_NATIVE=OFF ${APPLIANCE_CMAKE_ARGS:-}"
    if has_gpu_toolchain; then args="-DGGML_CUDA=on $args"; fi
    step "building llama-cpp-python $LLAMA_VER from the bundled sdist (CMAKE_ARGS=$args; minutes)"
    CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" "${pip[@]}" install -q "${OFFLINE_PIP_ARGS[@]}" "$BUNDLE/llama.cpp/llama_cpp_python-$LLAMA_VER.tar.gz" \
        || die "building llama-cpp-python failed; it needs a C/C++ compiler (build-essential) and the bundle's cmake"
}

install_llama_server() {
    mkdir -p "$SHARE/bin"
    if [[ -x "$BUNDLE/llama.cpp/bin/llama-server" ]]; then
        install -m 0755 "$BUNDLE/llama.cpp/bin/llama-server" "$SHARE/bin/llama-server"
    elif [[ $SERVER_BUILD == 1 && -f "$BUNDLE/llama.cpp/build_llama_server.sh" ]] && command -v cmake >/dev/null && command -v c++ >/dev/null; then
        step "building the native llama-server from the bundled sdist (minutes)"
        APPLIANCE_LLAMA_PORTABLE=1 bash "$BUNDLE/llama.cpp/build_llama_server.sh" "$PREFIX/bin/python"
    else
        echo "install.sh: WARNING: no llama-server in the bundle, and none built here;" \
             "the endpoint will not start until it is built (docs/install.md)" >&2
    fi
}

install_program() {
    step "installing the program into $PREFIX (pip --no-index, from the bundle only)"
    "$PY" -m venv "$PREFIX"
    install_llama_cpp
    "$PREFIX/bin/python" -m pip install -q "${OFFLINE_PIP_ARGS[@]}" "appliance==$APP_VER"
    # llama.cpp's converter, from the same sdist as the runtime (appliance/runtime/toolchain.py).
    mkdir -p "$SHARE"
    cp -r "$BUNDLE/llama.cpp/converter/." "$SHARE/"
    cp "$BUNDLE/llama.cpp/llama_cpp_python-$LLAMA_VER.tar.gz" "$SHARE/"
    install_llama_server
    if [[ -d "$BUNDLE/base" ]]; then
        mkdir -p "$PREFIX/share/appliance/base"
        cp -r "$BUNDLE/base/." "$PREFIX/share/appliance/base/"
    fi
    mkdir -p "$PREFIX/share/doc/appliance"
    cp "$BUNDLE/docs/install.md" "$BUNDLE/BUNDLE_INFO" "$PREFIX/share/doc/appliance/"
    "$PREFIX/bin/appliance" --version >/dev/null || die "the installed appliance does not start"
}

# Upgrade: the old program is moved aside and comes back if the new one fails to install.
replace_program() {
    local previous=""
    if [[ -e "$PREFIX" ]]; then
        [[ -f "$PREFIX/pyvenv.cfg" ]] || die "$PREFIX exists and is not an appliance install; choose another --prefix"
        previous="$PREFIX.previous"
        rm -rf "$previous"
        mv "$PREFIX" "$previous"
    fi
    # A subshell with its own errexit: any failing step ends it, and the rollback runs.
    local rc=0
    set +e
    (set -e; install_program)
    rc=$?
    set -e
    if [[ $rc != 0 ]]; then
        rm -rf "$PREFIX"
        if [[ -n "$previous" ]]; then
            mv "$previous" "$PREFIX"
            echo "install.sh: the previous program is back in place (start its units again if they ran)" >&2
        fi
        die "installation failed; nothing in $DATA was changed"
    fi
    [[ -n "$previous" ]] && rm -rf "$previous"
    return 0
}

make_user_and_home() {
    if [[ $MAKE_USER == 1 ]]; then
        if ! getent passwd "$SVC_USER" >/dev/null; then
            step "creating the system user $SVC_USER"
            useradd --system --user-group --home-dir "$DATA" --no-create-home \
                --shell /usr/sbin/nologin --comment "private fine-tuning appliance" "$SVC_USER"
        fi
    fi
    mkdir -p "$DATA"
    [[ $MAKE_USER == 1 ]] && chown "$SVC_USER:$SVC_USER" "$DATA"
    chmod 0700 "$DATA"
}

run_as_service_user() {
    if [[ $MAKE_USER == 1 ]]; then
        (cd / && runuser -u "$SVC_USER" -- env HOME="$DATA" "$@")
    else
        "$@"
    fi
}

install_units() {
    step "installing the systemd units into $UNIT_DIR"
    mkdir -p "$UNIT_DIR"
    for unit in "${UNITS[@]}"; do
        # The units name /opt/appliance and /var/lib/appliance; other folders are
        # substituted, so the sandbox (ReadWritePaths=) follows the home.
        sed -e "s#/opt/appliance#$PREFIX#g" -e "s#/var/lib/appliance#$DATA#g" \
            "$BUNDLE/systemd/$unit" >"$UNIT_DIR/$unit.partial"
        chmod 0644 "$UNIT_DIR/$unit.partial"
        mv "$UNIT_DIR/$unit.partial" "$UNIT_DIR/$unit"
    done
    if systemd_running; then
        systemctl daemon-reload
        systemctl enable "${UNITS[@]}"
        if systemctl restart "${UNITS[@]}"; then
            echo "units enabled and started; logs: journalctl -u appliance -u appliance-server"
        else
            echo "install.sh: WARNING: the units are installed and enabled but did not start;" \
                 "see: systemctl status appliance appliance-server; journalctl -u appliance -u appliance-server" >&2
        fi
    else
        echo "systemd is not running here (a container?): units copied into $UNIT_DIR, not enabled" >&2
    fi
}

stop_units
replace_program
echo "program installed in $((SECONDS - START)) s" >&2
make_user_and_home
if [[ $INIT == 1 ]]; then
    step "appliance init (a new home imports and exports the base model: minutes; an existing home is kept)"
    run_as_service_user "$PREFIX/bin/appliance" init --home "$DATA"
fi
[[ $SYSTEMD == 1 ]] && install_units
echo "appliance $APP_VER installed in $PREFIX in $((SECONDS - START)) s; home: $DATA; API key: $DATA/api_key"
