#!/usr/bin/env bash
# Runs a CUDA coca-worker where there is no GPU (this machine, CI): it must start, compute on the
# CPU (`verify` against the open_clip fixtures with --device auto and --device cpu; `embed` on two
# CPU workers under the coca-launch beside it), and refuse --device cuda with exit 2 and a
# message naming the missing driver and --device cpu.
# build.sh calls it after every build.
#
#   scripts/cuda/runs_without_gpu.sh target/cuda/release/coca-worker
#
# On a machine with an NVIDIA driver only the first two checks run (auto would pick the GPU).
# Without ../shared/fixtures/coca-tiny the verify checks are skipped with a message.
set -euo pipefail

die() { echo "runs_without_gpu.sh: error: $*" >&2; exit 1; }
say() { echo "runs_without_gpu.sh: $*" >&2; }

[ $# -eq 1 ] || die "usage: $0 PATH/TO/coca-worker"
WORKER="$1"
[ -x "$WORKER" ] || die "$WORKER is not an executable"
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
FIXTURES=../shared/fixtures/coca-tiny
# Colour-free, backtrace-free messages, as a user's terminal would show them.
export RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0 NO_COLOR=1

"$WORKER" --version >/dev/null 2>&1 || die "$WORKER does not start: $("$WORKER" --version 2>&1 | head -n3)"

if [ -f "$FIXTURES/config.json" ]; then
  out="$("$WORKER" verify --device cpu --reference "$FIXTURES" 2>&1)" ||
    die "verify --device cpu failed with the CUDA build: $out"
  grep -q "0 failed" <<<"$out" || die "verify --device cpu did not report its sections: $out"
else
  say "skipped the verify checks: $FIXTURES is absent"
fi

# Under the launcher beside it (CPU workers, as on a login node): the five fixture images
# embedded by two ranks.
LAUNCHER="$(dirname "$WORKER")/coca-launch"
if [ -f "$FIXTURES/config.json" ] && [ -x "$LAUNCHER" ]; then
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  out="$("$LAUNCHER" --nproc-per-node 2 --log-dir "$TMP/logs" -- embed --device cpu \
    --model "$FIXTURES" --images "$FIXTURES/images" --out "$TMP/e.npy" 2>&1)" ||
    die "embed under $LAUNCHER with 2 CPU workers failed: $out"
  grep -q "wrote 5 embeddings" <<<"$out" || die "embed under the launcher did not write 5 rows: $out"
fi

if [ -e /proc/driver/nvidia ]; then
  say "this machine has an NVIDIA driver: the checks without one are skipped"
  exit 0
fi

if [ -f "$FIXTURES/config.json" ]; then
  out="$(RUST_LOG=info "$WORKER" verify --device auto --reference "$FIXTURES" 2>&1)" ||
    die "verify --device auto failed without a GPU (it should compute on the CPU): $out"
  grep -q "computing on the CPU" <<<"$out" || die "--device auto did not say it computes on the CPU: $out"
fi

set +e
out="$("$WORKER" verify --device cuda --reference "${FIXTURES}" 2>&1)"
rc=$?
set -e
[ "$rc" = 2 ] || die "--device cuda without a driver exited $rc, not 2: $out"
grep -q "libcuda.so.1" <<<"$out" && grep -q -- "--device cpu" <<<"$out" ||
  die "--device cuda without a driver did not name libcuda.so.1 and --device cpu: $out"
[ "$(wc -l <<<"$out")" = 1 ] || die "--device cuda without a driver printed more than one line: $out"
say "starts without a GPU, computes on the CPU, refuses --device cuda naming the driver: ok"

# With stand-ins for the driver and the CUDA libraries (scripts/cuda/stand_in_libraries.c: the
# symbols the checks call, no GPU), the checks a GPU node's start makes run through cudarc's own
# loader and ours for NCCL: missing libraries, a CUDA 12 cuBLAS (cudarc's names reach
# libcublas.so.12), an old driver, no visible GPU, an index past the visible ones; each one line
# and exit 2. --device auto computes on the CPU beside a driver that sees no GPU, or whose cuInit
# fails (a warning). A GPU job under the launcher stops on a missing or old NCCL, and on GPUs the
# driver does not see.
if ! command -v cc >/dev/null; then
  say "skipped the checks with stand-in CUDA libraries: no C compiler (cc)"
  exit 0
fi
S="$(mktemp -d)"
trap 'rm -rf "${TMP:-}" "$S"' EXIT
for lib in driver:libcuda.so.1:-DSTAND_IN_DRIVER cu13:libcublas.so.13:-DSTAND_IN_CUBLAS_MAJOR=13 \
  cu12:libcublas.so.12:-DSTAND_IN_CUBLAS_MAJOR=12 curand:libcurand.so.10:-DSTAND_IN_CURAND \
  nccl:libnccl.so.2:-DSTAND_IN_NCCL; do
  IFS=: read -r dir file flag <<<"$lib"
  mkdir -p "$S/$dir"
  cc -shared -fPIC "$flag" -o "$S/$dir/$file" scripts/cuda/stand_in_libraries.c
done
# refused WHAT DEVICE LIBRARY_PATH ENV TEXT...: `selftest --device DEVICE` with those libraries
# (and ENV, space-separated NAME=VALUE) exits 2 with one line that holds every TEXT.
refused() {
  local what=$1 device=$2 path=$3 vars=$4 out rc text
  shift 4
  set +e
  # shellcheck disable=SC2086 # ENV is split into its assignments
  out="$(env $vars LD_LIBRARY_PATH="$path" "$WORKER" selftest --device "$device" 2>&1)"
  rc=$?
  set -e
  [ "$rc" = 2 ] || die "$what: --device $device exited $rc, not 2: $out"
  [ "$(wc -l <<<"$out")" = 1 ] || die "$what: --device $device printed more than one line: $out"
  for text in "$@"; do
    grep -qF -- "$text" <<<"$out" || die "$what: the message lacks \"$text\": $out"
  done
}
refused "a driver without the CUDA libraries" cuda "$S/driver" "" \
  "libcublas.so.13 (cuBLAS), libcurand.so.10 (cuRAND) could not be loaded" "LD_LIBRARY_PATH"
refused "a CUDA 12 cuBLAS" cuda "$S/driver:$S/cu12:$S/curand" "" \
  "the cuBLAS loaded ($S/cu12/libcublas.so.12) is CUDA 12's" "libcublas.so.13"
refused "a CUDA 12.8 driver" cuda "$S/driver:$S/cu13:$S/curand" "STAND_IN_CUDA_VERSION=12080" \
  "the NVIDIA driver supports CUDA 12.8" "--device cpu"
refused "no visible GPU" cuda "$S/driver:$S/cu13:$S/curand" "CUDA_VISIBLE_DEVICES=3" \
  "no GPU is visible (CUDA_VISIBLE_DEVICES=3)" "--device cpu"
refused "an index past the visible GPUs" cuda:2 "$S/driver:$S/cu13:$S/curand" \
  "STAND_IN_GPU_COUNT=2 CUDA_VISIBLE_DEVICES=4,5" \
  "--device cuda:2, but 2 GPU(s) are visible (CUDA_VISIBLE_DEVICES=4,5)"
# auto_on_cpu WHAT ENV TEXT: `selftest --device auto` beside the stand-in driver computes on the
# CPU, passes, and its log holds TEXT.
auto_on_cpu() {
  local what=$1 vars=$2 text=$3 out
  # shellcheck disable=SC2086 # ENV is split into its assignments
  out="$(env $vars RUST_LOG=info LD_LIBRARY_PATH="$S/driver" "$WORKER" selftest --device auto 2>&1)" ||
    die "$what: selftest --device auto failed: $out"
  grep -qF -- "$text" <<<"$out" && grep -q '"device":"cpu"' <<<"$out" ||
    die "$what: --device auto did not say \"$text\" and compute on the CPU: $out"
}
auto_on_cpu "a driver that sees no GPU" "" "no GPU is visible"
auto_on_cpu "a driver whose cuInit fails" "STAND_IN_INIT_ERROR=999" \
  "the NVIDIA driver did not initialise"
# A GPU job of two workers under the launcher, each given its GPU (CUDA_VISIBLE_DEVICES):
# without NCCL, or with one older than 2.19, it stops at once naming the library; with NCCL, the
# workers the launcher asked for a GPU never fall back to the CPU: they are refused, and the job
# stops with the rank and the cause. A job of one GPU worker does not ask for NCCL.
# gpu_job_refused WHAT LIBRARY_PATH ENV PATTERN: the job (CUDA_VISIBLE_DEVICES=0,1 unless ENV
# says otherwise) exits 2 and its output matches PATTERN.
gpu_job_refused() {
  local what=$1 path=$2 vars=$3 pattern=$4 out rc
  set +e
  # shellcheck disable=SC2086 # ENV is split into its assignments
  out="$(env CUDA_VISIBLE_DEVICES=0,1 $vars LD_LIBRARY_PATH="$path" "$LAUNCHER" \
    --nproc-per-node gpu --log-dir "$S/logs" -- pretrain --max_steps 1 --output_dir "$S/run" 2>&1)"
  rc=$?
  set -e
  [ "$rc" = 2 ] || die "$what: the GPU job exited $rc, not 2: $out"
  grep -q "the job failed" <<<"$out" && grep -q -- "$pattern" <<<"$out" ||
    die "$what: the GPU job did not stop saying \"$pattern\": $out"
}
if [ -x "$LAUNCHER" ]; then
  gpu_job_refused "no NCCL" "$S/driver:$S/cu13:$S/curand" "" \
    "the NCCL library could not be loaded (libnccl.so.2: "
  gpu_job_refused "NCCL 2.18" "$S/driver:$S/cu13:$S/curand:$S/nccl" "STAND_IN_NCCL_VERSION=21805" \
    "the NCCL library is 2.18.5 (version code 21805), older than the NCCL 2.19.0"
  gpu_job_refused "a driver that sees no GPU" "$S/driver:$S/cu13:$S/curand:$S/nccl" "" \
    "no GPU is visible (CUDA_VISIBLE_DEVICES=[01])"
  # One GPU worker needs no NCCL (its groups are of one): it gets as far as its device.
  gpu_job_refused "one GPU without NCCL" "$S/driver:$S/cu13:$S/curand" "CUDA_VISIBLE_DEVICES=0" \
    "no GPU is visible (CUDA_VISIBLE_DEVICES=0)"
fi
say "with stand-in CUDA libraries: each start-up refusal, --device auto on the CPU, GPU jobs stopped: ok"
