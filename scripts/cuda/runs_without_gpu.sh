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
