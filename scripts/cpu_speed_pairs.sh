#!/usr/bin/env bash
# coca against open_clip on this machine's CPU, in alternating pairs: `coca-worker bench`, then
# scripts/open_clip_train_bench.py at the same model, batch, threads and precision, PAIRS times,
# one line per pair with both figures and the ratio (the README's "Speed" rows are made this
# way). Optional, outside the product: it needs a Python with torch and open_clip_torch (see
# scripts/open_clip_train_bench.py).
#
#   scripts/cpu_speed_pairs.sh [--pairs N] [--steps N] [--model NAME|CONFIG.json] [--batch N]
#                              [--threads N] [--bf16] [--avx2] [--worker PATH] [--python PATH]
#
# --avx2 measures an AVX2-only CPU on an AVX-512 machine: both sides are held to AVX2 (our fused
# kernels by COCA_CPU_KERNELS=avx2; PyTorch, MKL and oneDNN by their three variables), and the
# worker must be a build without `gemm`'s AVX-512 kernels, by default
# target/avx2/release/coca-worker, made by
#   cargo build --release -p coca-worker --no-default-features --target-dir target/avx2
# (`gemm_kernels` in its report then says avx2).
set -euo pipefail
cd "$(dirname "$0")/.."

pairs=3 steps=5 model=coca_ViT-B-32 batch=8 threads=2 bf16=false avx2=false
worker="" python="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --pairs) pairs="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --batch) batch="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --bf16) bf16=true; shift ;;
    --avx2) avx2=true; shift ;;
    --worker) worker="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "cpu_speed_pairs.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$worker" ]; then
  worker=target/release/coca-worker
  $avx2 && worker=target/avx2/release/coca-worker
fi
if [ ! -x "$worker" ]; then
  echo "cpu_speed_pairs.sh: no worker binary at $worker; build it with" >&2
  if $avx2; then
    echo "  cargo build --release -p coca-worker --no-default-features --target-dir target/avx2" >&2
  else
    echo "  cargo build --release -p coca-worker" >&2
  fi
  exit 2
fi
if ! "$python" -c 'import torch, open_clip' 2>/dev/null; then
  echo "cpu_speed_pairs.sh: $python cannot import torch and open_clip (--python PATH, or see" \
    "scripts/open_clip_train_bench.py)" >&2
  exit 2
fi

ours_env=() torch_env=()
if $avx2; then
  ours_env=(COCA_CPU_KERNELS=avx2)
  torch_env=(ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2)
fi
precision=fp32
$bf16 && precision=amp_bf16

# One JSON line each; RAYON_NUM_THREADS gives coca the threads torch gets.
ours() {
  env "${ours_env[@]}" RAYON_NUM_THREADS="$threads" "$worker" bench --model "$model" \
    --batch "$batch" --steps "$steps" --captions False --bf16 "$bf16" --device cpu 2>/dev/null |
    tail -n 1
}
theirs() {
  env "${torch_env[@]}" "$python" scripts/open_clip_train_bench.py --model "$model" \
    --batch "$batch" --steps "$steps" --threads "$threads" --precision "$precision" 2>/dev/null |
    tail -n 1
}

for pair in $(seq 1 "$pairs"); do
  a=$(ours) b=$(theirs)
  python3 - "$pair" "$a" "$b" <<'EOF'
import json, sys
pair, ours, theirs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
if pair == "1":
    print(f"CPU: {ours['cpu_model']}; coca kernels: gemm {ours['gemm_kernels']}, fused ops "
          f"{ours['cpu_kernels']}, bf16 products {ours['bf16_product_kernels']}")
step, ref_step = ours["train_step_s"], theirs["train_step_s"]
emb, ref_emb = ours["embed_images_per_s"], theirs["embed_images_per_s"]
phases = lambda d: " / ".join(f"{d['train_phases_s'][k]:.2f}" for k in
                              ("forward_and_loss_s", "backward_s", "optimizer_s"))
print(f"pair {pair}: training step {step:.2f} s vs {ref_step:.2f} s ({ref_step / step:.2f}x; "
      f"forward / backward / optimizer {phases(ours)} vs {phases(theirs)}); "
      f"embedding {emb:.1f} vs {ref_emb:.1f} images/s ({emb / ref_emb:.2f}x)")
EOF
done
