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
#   <id>/link/        link-time-only libraries: stubs with the real SONAMEs (libcuda.so.1,
#                     libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13,
#                     libnccl.so.2), each
#                     exporting every function cudarc declares for it, and libcudart.so -> the
#                     wheel's real libcudart.so.13. `CUDA_HOME/lib/stubs` points here, a folder
#                     cudarc's build script already adds to the link search path, so no RUSTFLAGS
#                     are needed. The stubs are never shipped nor loaded: a binary built this way
#                     records only the SONAMEs (NEEDED), found at run time from the driver and from
#                     a CUDA 13 library folder (e.g. PyTorch's site-packages/nvidia/cu13/lib).
# A second run finds everything in place and downloads nothing (a second or two).
#
# Options:
#   --env              print only `export NAME=value` lines on stdout (messages go to stderr)
#   --compute-cap N    CUDA_COMPUTE_CAP to export (default: $CUDA_COMPUTE_CAP, else 90 = H100/H200)
#   --print-cache      print the toolchain folder (<cache>/<id>) and exit after installing
# Environment: COCA_CUDA_CACHE (cache folder), PYTHON (the interpreter that makes the venv,
# default python3), CARGO_HOME (where cudarc's sources are, default ~/.cargo).
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
# Stub libraries: "SONAME:cudarc sys module:symbol prefix". SONAMEs are the file names the CUDA 13
# wheels ship (nvidia-cublas 13.0.x, nvidia-curand 10.4.x, nvidia-cuda-nvrtc 13.0.x) and the
# driver's libcuda.so.1; libnccl.so.2 is the SONAME of the nvidia-nccl-cu13 wheel's library (NCCL
# keeps .so.2 across 2.x), linked by the worker's `nccl` feature.
STUBS=(
  "libcuda.so.1:driver:cu"
  "libcublas.so.13:cublas:cublas"
  "libcublasLt.so.13:cublaslt:cublasLt"
  "libcurand.so.10:curand:curand"
  "libnvrtc.so.13:nvrtc:nvrtc"
  "libnccl.so.2:nccl:nccl"
)
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

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${COCA_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/coca-cuda}"
PYTHON="${PYTHON:-python3}"
for tool in sha256sum gcc; do
  command -v "$tool" >/dev/null || die "'$tool' is required (apt-get install coreutils gcc)"
done

ID="cuda13.0-$(printf '%s\n' "$LAYOUT" "${PINS[@]}" | sha256sum | cut -c1-12)"
DIR="$CACHE/$ID"
VENV="$DIR/venv"
LINK="$DIR/link"
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
[ -f "$CU13/lib/libcudart.so.13" ] || die "libcudart.so.13 missing in $CU13/lib (delete $DIR and rerun)"
[ -f "$CU13/include/cupti.h" ] || die "cupti.h missing in $CU13/include (delete $DIR and rerun)"

# ---- 2. link-time stubs from cudarc's declarations --------------------------------------------
CUDARC_VER="$(awk '/^name = "cudarc"$/ { getline; gsub(/"/, "", $3); print $3; exit }' "$REPO/Cargo.lock")"
[ -n "$CUDARC_VER" ] || die "no cudarc in $REPO/Cargo.lock (candle's cuda feature pulls it in)"
# Stubs are added one by one when missing (never the folder wiped while it is complete): the
# cache is shared between checkouts whose scripts may list fewer stubs, and one of them wiping
# another's stub would break that build's link. A new cudarc version starts the folder over.
STAMP="$LINK/.cudarc-$CUDARC_VER"
[ -f "$STAMP" ] || rm -rf "$LINK"
NEED=()
for spec in "${STUBS[@]}"; do
  IFS=: read -r soname _ _ <<<"$spec"
  [ -f "$LINK/$soname" ] || NEED+=("$spec")
done
if [ "${#NEED[@]}" -gt 0 ]; then
  CARGO_HOME_DIR="${CARGO_HOME:-$HOME/.cargo}"
  find_cudarc() { compgen -G "$CARGO_HOME_DIR/registry/src/*/cudarc-$CUDARC_VER/src" | head -n1 || true; }
  SRC="$(find_cudarc)"
  if [ -z "$SRC" ]; then
    command -v cargo >/dev/null || die "cargo is needed to fetch cudarc $CUDARC_VER's sources"
    say "fetching crate sources (cudarc $CUDARC_VER)"
    host="$(rustc -vV | sed -n 's/^host: //p')"
    cargo fetch --manifest-path "$REPO/Cargo.toml" ${host:+--target "$host"} >&2
    SRC="$(find_cudarc)"
  fi
  [ -n "$SRC" ] || die "cudarc-$CUDARC_VER sources not found under $CARGO_HOME_DIR/registry/src"
  say "generating link stubs from $SRC"
  mkdir -p "$LINK/src"
  for spec in "${NEED[@]}"; do
    IFS=: read -r soname module prefix <<<"$spec"
    sys="$SRC/$module/sys/mod.rs"
    [ -f "$sys" ] || die "$sys not found"
    c="$LINK/src/${soname%%.so*}.c"
    grep -oE "\bfn ${prefix}[A-Z][A-Za-z0-9_]*\s*\(" "$sys" | sed -E 's/^fn //; s/\s*\($//' | sort -u |
      awk '{ printf "int %s(void) { return 999; }\n", $1 }' >"$c"
    n="$(wc -l <"$c")"
    [ "$n" -gt 10 ] || die "only $n '$prefix' functions found in $sys: cudarc's layout changed?"
    gcc -shared -fPIC -nostdlib -Wl,-soname,"$soname" -o "$LINK/$soname.tmp.$$" "$c"
    mv -f "$LINK/$soname.tmp.$$" "$LINK/$soname" # a linker reading the folder never sees half a file
    ln -sf "$soname" "$LINK/${soname%%.so*}.so" # the unversioned name the linker's -l looks for
  done
  ln -sf "$CU13/lib/libcudart.so.13" "$LINK/libcudart.so"
  touch "$STAMP"
fi
# cudarc's build script searches $CUDA_HOME/lib/stubs (among others) when it exists.
if [ "$(readlink "$CU13/lib/stubs" 2>/dev/null || true)" != "$LINK" ]; then
  rm -rf "$CU13/lib/stubs"
  ln -s "$LINK" "$CU13/lib/stubs"
fi
"$CU13/bin/nvcc" --version >/dev/null 2>&1 || die "$CU13/bin/nvcc does not run"

if [ "$PRINT_CACHE" = 1 ]; then
  echo "$DIR"
  exit 0
fi

# ---- 3. the environment -----------------------------------------------------------------------
case ":$PATH:" in
  *":$CU13/bin:"*) NEW_PATH="$PATH" ;;
  *) NEW_PATH="$CU13/bin:$PATH" ;;
esac
emit() { printf 'export %s=%q\n' "$1" "$2"; }
if [ "$ENV_ONLY" = 0 ]; then
  echo "CUDA 13.0 build toolchain: $DIR"
  echo "  nvcc: $("$CU13/bin/nvcc" --version | tail -n1)"
  echo "  link stubs (never shipped): $LINK"
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
emit COCA_CUDA_LINK_DIR "$LINK"
