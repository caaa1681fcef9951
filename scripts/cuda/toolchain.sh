#!/usr/bin/env bash
# Installs the CUDA 13.0 build toolchain for `--features cuda` from the Python registry (PyPI),
# without a GPU, a driver or a system CUDA, and prints the environment to build with.
#
#   eval "$(scripts/cuda/toolchain.sh --env)"     # install if needed, then export the variables
#   scripts/cuda/toolchain.sh                     # install if needed, print a summary and them
#
# What it makes, under $COCA_CUDA_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/coca-cuda):
#   <id>/venv/        a venv holding the pinned wheels below; nvcc lives in
#                     venv/lib/python3.*/site-packages/nvidia/cu13/bin (that cu13 folder is CUDA_HOME)
# Nothing else: the CUDA build links no CUDA library but the runtime's static archive
# (libcudart_static.a, in the runtime wheel); it opens the driver, cuBLAS, cuRAND and NCCL when a
# GPU is first asked for, from the machine it runs on.
# A second run finds everything in place and downloads nothing (a second or two).
#
# Options:
#   --env              print only `export NAME=value` lines on stdout (messages go to stderr)
#   --compute-cap N    CUDA_COMPUTE_CAP to export (default: $CUDA_COMPUTE_CAP, else 90 = H100/H200)
#   --print-cache      print the toolchain folder (<cache>/<id>) and exit after installing
# Environment: COCA_CUDA_CACHE (cache folder), PYTHON (the interpreter that makes the venv,
# default python3).
set -euo pipefail

# ---- pins: CUDA 13.0 Update 2, the newest 13.0.x of each wheel on PyPI (2026-12) ------------
PINS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  # CUPTI's headers and libcupti.so.13, for the kernel profiler (scripts/cuda/kernel_profile.c)
  nvidia-cuda-cupti==13.0.85
)
# cudarc's spelling of the toolkit version (its build script would otherwise run `nvcc --version`).
CUDARC_VERSION_CODE=13000
# Bump when what this script lays out changes, so existing caches are rebuilt.
LAYOUT=1

die() { echo "toolchain.sh: error: $*" >&2; exit 1; }
say() { echo "toolchain.sh: $*" >&2; }

ENV_ONLY=0
PRINT_CACHE=0
COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
while [ $# -gt 0 ]; do
  case "$1" in
    --env) ENV_ONLY=1 ;;
    --print-cache) PRINT_CACHE=1 ;;
    --compute-cap) [ $# -ge 2 ] || die "--compute-cap needs a value (e.g. 90)"; COMPUTE_CAP="$2"; shift ;;
    --compute-cap=*) COMPUTE_CAP="${1#*=}" ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
[[ "$COMPUTE_CAP" =~ ^[0-9]+[af]?$ ]] || die "CUDA_COMPUTE_CAP '$COMPUTE_CAP' is not a compute capability such as 90 or 80"

CACHE="${COCA_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/coca-cuda}"
PYTHON="${PYTHON:-python3}"
command -v sha256sum >/dev/null || die "'sha256sum' is required (apt-get install coreutils)"

ID="cuda13.0-$(printf '%s\n' "$LAYOUT" "${PINS[@]}" | sha256sum | cut -c1-12)"
DIR="$CACHE/$ID"
VENV="$DIR/venv"
mkdir -p "$CACHE"

# One installer at a time per cache (two builds may start together).
if command -v flock >/dev/null; then
  exec 9>"$CACHE/.lock"
  flock 9
fi

cu13_dir() { # the wheels' CUDA root inside the venv
  local purelib
  purelib="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$purelib/nvidia/cu13"
}

# ---- 1. the wheels ----------------------------------------------------------------------------
if [ ! -f "$DIR/.installed" ]; then
  command -v "$PYTHON" >/dev/null || die "'$PYTHON' not found: a Python 3 with the venv module is needed (set PYTHON=...)"
  say "installing the CUDA 13.0 toolchain into $DIR (about 0.2 GB from PyPI)"
  rm -rf "$DIR"
  mkdir -p "$DIR"
  "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)"
  # --no-deps: the pins above are the whole set; nothing else is resolved or upgraded.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: "${PINS[@]}" || die "pip could not install ${PINS[*]} (is PyPI reachable?)"
  touch "$DIR/.installed"
fi
CU13="$(cu13_dir)"
[ -x "$CU13/bin/nvcc" ] || die "nvcc missing at $CU13/bin/nvcc (delete $DIR and rerun)"
[ -f "$CU13/lib/libcudart_static.a" ] || die "libcudart_static.a missing in $CU13/lib (delete $DIR and rerun)"
[ -f "$CU13/include/cupti.h" ] || die "cupti.h missing in $CU13/include (delete $DIR and rerun)"

"$CU13/bin/nvcc" --version >/dev/null 2>&1 || die "$CU13/bin/nvcc does not run"

if [ "$PRINT_CACHE" = 1 ]; then
  echo "$DIR"
  exit 0
fi

# ---- 2. the environment -----------------------------------------------------------------------
case ":$PATH:" in
  *":$CU13/bin:"*) NEW_PATH="$PATH" ;;
  *) NEW_PATH="$CU13/bin:$PATH" ;;
esac
emit() { printf 'export %s=%q\n' "$1" "$2"; }
if [ "$ENV_ONLY" = 0 ]; then
  echo "CUDA 13.0 build toolchain: $DIR"
  echo "  nvcc: $("$CU13/bin/nvcc" --version | tail -n1)"
  echo "Build with:  eval \"\$(scripts/cuda/toolchain.sh --env)\"  or  scripts/cuda/build.sh"
  echo
fi
emit NVCC "$CU13/bin/nvcc"
emit CUDA_HOME "$CU13"
emit CUDA_ROOT "$CU13"
emit CUDA_PATH "$CU13"
emit PATH "$NEW_PATH"
emit CUDA_COMPUTE_CAP "$COMPUTE_CAP"
emit CUDARC_CUDA_VERSION "$CUDARC_VERSION_CODE"
