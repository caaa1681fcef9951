#!/usr/bin/env bash
# Builds the CUDA binaries, target/cuda/release/coca-worker and coca-launch (and the kernel
# profiler libcoca_kernel_profile.so), without a GPU:
# installs (or reuses) the toolchain of scripts/cuda/toolchain.sh, builds with the worker's `cuda`
# feature into target/cuda (beside the CPU build's target/release, never over it) and checks that
# the worker starts without any CUDA library: it links none (the CUDA runtime statically), opens
# the driver, cuBLAS, cuRAND and NCCL when a GPU is first asked for, and computes on the CPU here.
#
#   scripts/cuda/build.sh             # build and check
#   scripts/cuda/build.sh --pack      # also target/cuda/dist/{coca-worker,coca-launch}.xz: stripped,
#                                     # `xz -9`, to carry to a GPU machine (+ SHA256SUMS), and
#                                     # the kernel profiler libcoca_kernel_profile.so
#   scripts/cuda/build.sh --test      # also the worker's tests in this build, on the CPU (those
#                                     # that need a GPU skip themselves): what CI runs
#   scripts/cuda/build.sh --compute-cap 80 [-- <more cargo build arguments>]
#
# On the GPU they need an NVIDIA driver (libcuda.so.1) and the CUDA 13 libraries (libcublas.so.13,
# libcublasLt.so.13, libcurand.so.10; libnccl.so.2 for jobs of several GPUs) on the library
# path; see the README's "GPU".
set -euo pipefail

die() { echo "build.sh: error: $*" >&2; exit 1; }
say() { echo "build.sh: $*" >&2; }

PACK=0
TEST=0
TOOLCHAIN_ARGS=(--env)
CARGO_EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --pack) PACK=1 ;;
    --test) TEST=1 ;;
    --compute-cap) [ $# -ge 2 ] || die "--compute-cap needs a value (e.g. 90)"; TOOLCHAIN_ARGS+=(--compute-cap "$2"); shift ;;
    --compute-cap=*) TOOLCHAIN_ARGS+=(--compute-cap "${1#*=}") ;;
    --) shift; CARGO_EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null || die "cargo is required (rustup toolchain)"
command -v readelf >/dev/null || die "readelf is required (apt-get install binutils)"

ENV_LINES="$(scripts/cuda/toolchain.sh "${TOOLCHAIN_ARGS[@]}")" || die "the CUDA toolchain could not be installed (scripts/cuda/toolchain.sh)"
eval "$ENV_LINES"

TARGET_DIR=target/cuda
# Features of the CUDA build. The launcher has no device code and does not depend on the worker;
# it is built here only so that it sits beside the worker it starts (it runs the coca-worker in
# its own folder).
# `nccl` (= cuda + NCCL) opens libnccl.so.2 when a GPU job first needs it; the nvidia-nccl-cu13
# wheel's lib folder provides it (LD_LIBRARY_PATH).
FEATURES=(coca-worker/cuda coca-worker/nccl)
PACKAGES=(-p coca-worker -p coca-launch)

say "cargo build --release --target-dir $TARGET_DIR ${PACKAGES[*]} --features ${FEATURES[*]} (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP)"
start=$SECONDS
cargo build --release --target-dir "$TARGET_DIR" "${PACKAGES[@]}" \
  --features "$(IFS=,; echo "${FEATURES[*]}")" ${CARGO_EXTRA[@]+"${CARGO_EXTRA[@]}"}
say "built in $((SECONDS - start)) s"

BIN="$TARGET_DIR/release"
for b in coca-worker coca-launch; do
  [ -x "$BIN/$b" ] || die "$BIN/$b was not produced"
done

# The check: the worker records no CUDA library among its NEEDED entries (it would not start
# without one) and no RPATH/RUNPATH or path in its dynamic section.
DYN="$(readelf -d "$BIN/coca-worker")"
NEEDED="$(sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' <<<"$DYN")"
for lib in $NEEDED; do
  case "$lib" in
    libcuda.*|libcublas*|libcurand*|libcudart*|libnccl*|libnvrtc*)
      die "$BIN/coca-worker links $lib (NEEDED: $(echo $NEEDED)): the CUDA build must open the CUDA libraries at run time (cudarc's dynamic-loading) and link the runtime statically (worker/build.rs)" ;;
  esac
done
if grep -qE '\((RPATH|RUNPATH)\)' <<<"$DYN"; then
  die "$BIN/coca-worker has an RPATH/RUNPATH: $(grep -E 'RPATH|RUNPATH' <<<"$DYN")"
fi
if grep -q / <<<"$NEEDED"; then
  die "$BIN/coca-worker records a library by path: $(grep / <<<"$NEEDED")"
fi
say "coca-worker NEEDED: $(echo $NEEDED)"
scripts/cuda/runs_without_gpu.sh "$BIN/coca-worker" || die "the CUDA worker failed its run without a GPU (scripts/cuda/runs_without_gpu.sh)"

# The kernel profiler for the GPU machine (scripts/cuda/kernel_profile.c): a CUPTI injection
# library that needs libcupti.so.13 at run time (PyTorch's environment has it), by SONAME only.
PROFILER="$BIN/libcoca_kernel_profile.so"
gcc -O2 -Wall -Wextra -Werror -std=c11 -D_DEFAULT_SOURCE -shared -fPIC -fvisibility=hidden \
  -I"$CUDA_HOME/include" -o "$PROFILER" scripts/cuda/kernel_profile.c \
  -L"$CUDA_HOME/lib" -l:libcupti.so.13 -lpthread || die "the kernel profiler did not build"
PROFILER_DYN="$(readelf -d "$PROFILER")"
grep -q 'NEEDED.*\[libcupti.so.13\]' <<<"$PROFILER_DYN" || die "$PROFILER does not link libcupti.so.13"
if grep -qE '\((RPATH|RUNPATH)\)' <<<"$PROFILER_DYN"; then
  die "$PROFILER has an RPATH/RUNPATH"
fi
# Its records, windows and summary, without a GPU: a stand-in libcupti.so.13 hands it known
# records (scripts/cuda/kernel_profile_check.c), and the summary must count exactly those.
PROFILE_CHECK="$(mktemp -d)"
trap 'rm -rf "$PROFILE_CHECK"' EXIT
# The real library's symbols carry the version node `libcupti.so.13`, and so must the stand-in's.
echo 'libcupti.so.13 { global: *; };' >"$PROFILE_CHECK/versions.map"
gcc -O2 -Wall -Wextra -Werror -std=c11 -D_DEFAULT_SOURCE -DSTAND_IN_CUPTI -shared -fPIC \
  -Wl,-soname,libcupti.so.13 -Wl,--version-script,"$PROFILE_CHECK/versions.map" \
  -I"$CUDA_HOME/include" -o "$PROFILE_CHECK/libcupti.so.13" scripts/cuda/kernel_profile_check.c \
  && gcc -O2 -Wall -Wextra -Werror -std=c11 -D_DEFAULT_SOURCE -I"$CUDA_HOME/include" \
    -o "$PROFILE_CHECK/run" scripts/cuda/kernel_profile_check.c -ldl \
  || die "the kernel profiler's check did not build"
LD_LIBRARY_PATH="$PROFILE_CHECK" COCA_KERNEL_PROFILE="$PROFILE_CHECK/run.tsv" \
  "$PROFILE_CHECK/run" "$PWD/$PROFILER" 2>/dev/null || die "the kernel profiler failed its check run"
python3 scripts/cuda/kernel_profile_summary.py --json-only "$PROFILE_CHECK/run.tsv" | python3 -c '
import json, sys
step = json.load(sys.stdin)["windows"]["step"]
got = (step["windows"], step["wall_ms"] * 1e6, step["gpu_busy_ms"] * 1e6, step["kernels"],
       {k: round(v * 1e6) for k, v in step["by_kind_ms"].items()})
want = (1, 10, 6, 2, {"matmul": 4, "fused_ops": 1, "memcpy": 1, "memset": 1})
assert (got[0], round(got[1]), round(got[2]), got[3], got[4]) == want, f"{got} != {want}"
' || die "the kernel profiler's records or summary are wrong (scripts/cuda/kernel_profile_check.c)"
say "kernel profiler: $PROFILER (checked against a stand-in CUPTI)"

if [ "$TEST" = 1 ]; then
  say "cargo test --release --target-dir $TARGET_DIR -p coca-worker --features ${FEATURES[*]}"
  start=$SECONDS
  cargo test --release --target-dir "$TARGET_DIR" -p coca-worker \
    --features "$(IFS=,; echo "${FEATURES[*]}")" || die "the worker's tests failed in the CUDA build"
  say "the worker's tests passed in the CUDA build in $((SECONDS - start)) s"
fi

if [ "$PACK" = 1 ]; then
  command -v xz >/dev/null || die "xz is required for --pack (apt-get install xz-utils)"
  command -v strip >/dev/null || die "strip is required for --pack (apt-get install binutils)"
  DIST="$TARGET_DIR/dist"
  mkdir -p "$DIST"
  for b in coca-worker coca-launch; do
    strip -o "$DIST/$b" "$BIN/$b"
    xz -9 -f -T1 "$DIST/$b" # replaces $DIST/$b by $DIST/$b.xz
  done
  cp "$PROFILER" "$DIST/"
  (cd "$DIST" && sha256sum coca-worker.xz coca-launch.xz libcoca_kernel_profile.so >SHA256SUMS)
  say "packed: $(cd "$DIST" && ls -l coca-worker.xz coca-launch.xz | awk '{ printf "%s %.1f MB  ", $NF, $5 / 1e6 }')"
  say "on the GPU machine: xz -d coca-worker.xz coca-launch.xz && chmod +x coca-worker coca-launch"
fi
echo "$BIN/coca-worker"
echo "$BIN/coca-launch"
