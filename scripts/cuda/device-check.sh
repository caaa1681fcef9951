#!/usr/bin/env bash
# The GPU checks of issues #15-#17, for a machine with one NVIDIA GPU, a driver, and PyTorch but
# no cargo and no network. Run from the repository root with target/device-kit (made here by
# scripts/cuda/device-kit.sh) beside it:
#
#   scripts/cuda/device-check.sh [--quick] [--only NAME,NAME,...]
#
# Prints one JSON line per check: {"check", "ok", "seconds", "result" (the command's JSON line,
# when it prints one), "tail" (its last output lines when it failed)}. Every check has its own
# time limit, and a failed check does not stop the others. --quick runs only the start-up,
# `verify` and the B-32 pair; --only runs only the named checks (in the script's order), for a
# device lease too short for all of them. COCA_CHECK_MAX_S caps each check's time limit, and
# COCA_CHECK_DEADLINE_S (seconds from the script's start) caps them all together: a check left
# without time is skipped with a JSON line that says so, so a call whose own limit is that
# deadline plus a margin always returns what ran. Results also go to $OUT/device-check.jsonl
# when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/../.."
KIT=${COCA_DEVICE_KIT:-target/device-kit}
QUICK=0
ONLY=
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --only) ONLY=",${2:?--only needs a comma-separated list of check names},"; shift ;;
    *) echo "device-check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
RESULTS=${OUT:+$OUT/device-check.jsonl}
# A failed check's whole output, when $OUT is set (the JSON line keeps its last lines).
FAILURES=${OUT:+$OUT/device-check-failures.log}
# Error messages without backtraces (the GPU machine's environment may ask for them).
export RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0

# PyTorch's environment carries the CUDA 13 libraries the binaries link (cuBLAS, cuRAND, ...).
PY=${PYTHON:-}
for candidate in /opt/torch/.venv/bin/python python3; do
  [ -n "$PY" ] && break
  command -v "$candidate" >/dev/null && "$candidate" -c 'import torch' 2>/dev/null && PY=$candidate
done
PY=${PY:-python3}
SITE=$("$PY" -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null || true)
if [ -n "$SITE" ] && [ -d "$SITE/nvidia" ]; then
  LIBS=$(find "$SITE/nvidia" -maxdepth 3 -type d -name lib | paste -sd:)
  export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# The binaries, unpacked once.
BIN="$WORK/bin"
mkdir -p "$BIN"
for b in coca-worker coca-launch; do
  xz -dc "$KIT/bin/$b.xz" >"$BIN/$b" && chmod +x "$BIN/$b"
done
# open_clip for the reference figures, installed from the kit's wheels into a private folder.
if ls "$KIT"/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --no-index --no-deps --target "$WORK/pylib" "$KIT"/wheels/*.whl \
    >/dev/null 2>&1 && export PYTHONPATH="$WORK/pylib${PYTHONPATH:+:$PYTHONPATH}"
fi

# report LINE: one check's JSON line, on stdout and in $RESULTS.
report() {
  echo "$1"
  [ -n "$RESULTS" ] && echo "$1" >>"$RESULTS"
  return 0
}

# check NAME SECONDS COMMAND...: runs it, prints one JSON line; returns the command's status.
check() {
  local name=$1 limit=$2
  shift 2
  if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then
    return 0
  fi
  # COCA_CHECK_MAX_S caps every check's limit (a short lease: fail fast, run the rest).
  if [ -n "${COCA_CHECK_MAX_S:-}" ] && [ "$limit" -gt "$COCA_CHECK_MAX_S" ]; then
    limit=$COCA_CHECK_MAX_S
  fi
  # COCA_CHECK_DEADLINE_S caps the whole run: what is left of it, and nothing under 10 s.
  if [ -n "${COCA_CHECK_DEADLINE_S:-}" ]; then
    local left=$((COCA_CHECK_DEADLINE_S - SECONDS))
    if [ "$left" -lt 10 ]; then
      report "{\"check\": \"$name\", \"ok\": false, \"skipped\": \"COCA_CHECK_DEADLINE_S=$COCA_CHECK_DEADLINE_S reached after $SECONDS s\"}"
      return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
  fi
  local start end rc
  start=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" >"$WORK/out" 2>"$WORK/err"
  rc=$?
  end=$(date +%s.%N)
  local line
  line=$("$PY" - "$name" "$rc" "$start" "$end" "$WORK/out" "$WORK/err" <<'PYEOF'
import json, sys
name, rc, start, end, out, err = sys.argv[1:]
rc = int(rc)
text = open(out, errors="replace").read().splitlines()
result = None
for line in reversed(text):
    line = line.strip()
    if line.startswith("{"):
        try:
            result = json.loads(line)
            break
        except ValueError:
            pass
if result is None and text:
    result = text[-1]
report = {"check": name, "ok": rc == 0, "rc": rc, "seconds": round(float(end) - float(start), 2),
          "result": result}
if rc != 0:
    tail = (text + open(err, errors="replace").read().splitlines())[-15:]
    report["tail"] = tail
    if rc in (124, 137):
        report["timed_out"] = True
print(json.dumps(report))
PYEOF
)
  report "$line"
  if [ "$rc" != 0 ] && [ -n "$FAILURES" ]; then
    { echo "=== $name (exit $rc): $*"; tail -n 300 "$WORK/out"; tail -n 300 "$WORK/err"; } >>"$FAILURES"
  fi
  return "$rc"
}

W="$BIN/coca-worker"
check gpu 30 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
check worker-starts 30 "$W" --version
# 0. Our CUDA kernels against candle's compositions, op by op, in float32, bf16 and f16: which
#    kernel is wrong, if `verify` fails.
check selftest 120 "$W" selftest --device cuda
# 1. Float32 parity with open_clip (TF32 off): forward, loss, gradients, the 6-step training
#    trajectory, zero-shot and generation, on the GPU; and (`precision`) the bf16 and fp16
#    trajectories against float32 on the GPU, within open_clip's drift.
#    If it fails: the same with every op composed from candle primitives instead of our CUDA
#    kernels (worker/kernels/fused_ops.cu); if only the first fails, the kernels are at fault.
check verify 300 "$W" verify --device cuda --reference "$KIT/fixture" \
  || check verify-portable-ops 300 env COCA_PORTABLE_OPS=1 "$W" verify --device cuda \
    --reference "$KIT/fixture"
# 2. The inference commands on the GPU, as a user runs them (images decoded on CPU threads
#    and put on the device by them): greedy captions equal the same command's on the CPU, and
#    the image embeddings are within 1e-4 of the CPU's.
inference_commands() {
  local out="$WORK/inference" images=("$KIT"/fixture/images/*) d
  mkdir -p "$out"
  for d in cpu cuda; do
    "$W" caption --device "$d" --model "$KIT/fixture" --generation_type greedy "${images[@]}" \
      >"$out/captions-$d.tsv" || return 1
    "$W" embed --device "$d" --model "$KIT/fixture" --out "$out/embed-$d.npy" \
      --images "${images[@]}" || return 1
  done
  diff "$out/captions-cpu.tsv" "$out/captions-cuda.tsv" || return 1
  "$PY" - "$out" <<'PYEOF'
import json, sys
import numpy as np
cpu, gpu = (np.load(f"{sys.argv[1]}/embed-{d}.npy") for d in ("cpu", "cuda"))
diff = float(np.abs(cpu - gpu).max())
print(json.dumps({"images": len(cpu), "embed_max_abs_diff": diff}))
sys.exit(0 if cpu.shape == gpu.shape and diff < 1e-4 else 1)
PYEOF
}
export -f inference_commands
export W KIT WORK PY
check inference-commands 120 bash -c inference_commands
# 3-5. B-32 at batch 256 beside open_clip (TF32 on for float32 matmuls in both).
check bench-b32 300 "$W" bench --device cuda --tf32 True --model coca_ViT-B-32 --batch 256 --steps 3
check torch-b32 300 "$PY" scripts/open_clip_train_bench.py --device cuda --tf32 --captions \
  --model coca_ViT-B-32 --batch 256 --steps 3
# bf16 autocast on both sides (issue #16's target: >= 1.0x open_clip, MFU >= 40 %).
check bench-b32-bf16 300 "$W" bench --device cuda --bf16 True --model coca_ViT-B-32 --batch 256 \
  --steps 3 --captions False
check torch-b32-bf16 300 "$PY" scripts/open_clip_train_bench.py --device cuda \
  --precision amp_bf16 --model coca_ViT-B-32 --batch 256 --steps 3
[ "$QUICK" = 1 ] && exit 0
# The B-32 step with candle's compositions instead of our kernels: what the kernels save in
# time and memory.
check bench-b32-portable-ops 300 env COCA_PORTABLE_OPS=1 "$W" bench --device cuda --tf32 True \
  --model coca_ViT-B-32 --batch 256 --steps 3
# One GPU worker under the launcher trains 4 steps of the demo and checkpoints.
check launch-train 300 "$BIN/coca-launch" --nproc-per-node gpu --log-dir "$WORK/log" -- \
  pretrain --max_steps 4 --save_steps 4 --output_dir "$WORK/run"
check checkpoint-written 10 test -d "$WORK/run/checkpoint-4"
# Issue #17: a one-rank NCCL communicator made through the launcher's control plane (one GPU:
# NCCL refuses two ranks on one device): every operation against the host rings' result
# (`checked_max_abs_diff`), then its all-reduce bus bandwidth.
check bench-collectives 120 "$BIN/coca-launch" --nproc-per-node gpu --log-dir "$WORK/log-comm" -- \
  bench-collectives --device cuda --bytes 1048576,67108864,268435456
check bench-l14 400 "$W" bench --device cuda --tf32 True --model coca_ViT-L-14 --batch 64 \
  --steps 2 --captions False
check torch-l14 400 "$PY" scripts/open_clip_train_bench.py --device cuda --tf32 \
  --model coca_ViT-L-14 --batch 64 --steps 2
check bench-l14-bf16 400 "$W" bench --device cuda --bf16 True --model coca_ViT-L-14 --batch 64 \
  --steps 2 --captions False
check torch-l14-bf16 400 "$PY" scripts/open_clip_train_bench.py --device cuda \
  --precision amp_bf16 --model coca_ViT-L-14 --batch 64 --steps 2
# L-14 at the seed's per-device batch (16) with checkpointing and bf16: device memory in use.
check l14-seed-batch-memory 300 "$W" bench --device cuda --bf16 True --grad_checkpointing True \
  --model coca_ViT-L-14 --batch 16 --steps 2 --captions False
# Device memory of a B-32 step at batch 64 (the memory pool's peak) beside the estimate.
check bench-memory-b32 300 "$W" bench-memory --device cuda --model coca_ViT-B-32 --batch 64 \
  --sharding 1 --tensor_parallel 1
# L-14 at the issue's batch in bf16, where attention's recomputed probabilities matter most
# (9.7 GB before): the measured peak beside the estimate (35.1 GB; 42.1 GB before the heads'
# copies and the branches' outputs stopped being kept).
check bench-memory-l14-bf16 400 "$W" bench-memory --device cuda --bf16 True \
  --model coca_ViT-L-14 --batch 64 --sharding 1 --tensor_parallel 1
# Kernel timelines (scripts/cuda/kernel_profile.c, CUPTI) of the bf16 B-32 step and embedding,
# ours and open_clip's, in the same windows: time per kernel and per kind, and the GPU's idle
# share (what launching from the host leaves unused). CUPTI's records cost a little time, so
# these runs' step times are not the benchmark's. The tables and the compressed timelines go
# to $OUT (kernels-*.txt, kernels-*.tsv.xz).
PROFILER="$(cd "$KIT/bin" && pwd)/libcoca_kernel_profile.so"
PROFILES=${OUT:-$WORK}
profile() { # profile NAME SECONDS COMMAND...: the command's timeline, then its summary
  local name=$1 limit=$2
  shift 2
  local tsv="$PROFILES/kernels-$name.tsv"
  check "profile-$name" "$limit" env CUDA_INJECTION64_PATH="$PROFILER" COCA_KERNEL_PROFILE="$tsv" "$@"
  [ -f "$tsv" ] || return 0
  # The summary goes with its profile, also under --only.
  ONLY= check "kernels-$name" 120 "$PY" scripts/cuda/kernel_profile_summary.py --json-only --top 30 \
    --table "$PROFILES/kernels-$name.txt" "$tsv"
  xz -T2 -f "$tsv" 2>/dev/null || true
}
if [ -f "$PROFILER" ]; then
  profile coca-b32-bf16 300 "$W" bench --device cuda --bf16 True --model coca_ViT-B-32 --batch 256 \
    --steps 3 --captions False
  profile torch-b32-bf16 300 "$PY" scripts/open_clip_train_bench.py --device cuda \
    --precision amp_bf16 --model coca_ViT-B-32 --batch 256 --steps 3
  profile coca-l14-bf16 400 "$W" bench --device cuda --bf16 True --model coca_ViT-L-14 --batch 64 \
    --steps 2 --captions False
  profile torch-l14-bf16 400 "$PY" scripts/open_clip_train_bench.py --device cuda \
    --precision amp_bf16 --model coca_ViT-L-14 --batch 64 --steps 2
fi
