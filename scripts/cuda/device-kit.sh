#!/usr/bin/env bash
# Prepares what `scripts/cuda/device-check.sh` needs on a GPU machine that has no cargo and no
# network: the CUDA binaries (stripped, xz), the fixture files `verify` reads, and the
# pure-Python wheels of open_clip for the PyTorch side of the comparison. Everything lands in
# target/device-kit (about 50 MB: under the 64 MiB a device call may carry).
#
#   scripts/cuda/device-kit.sh [--fixtures DIR] [--no-build]
#
# DIR defaults to ../shared/fixtures/coca-tiny. Then, on the GPU machine, from the repository
# root with target/device-kit beside it: scripts/cuda/device-check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
FIXTURES=../shared/fixtures/coca-tiny
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --fixtures) FIXTURES="$2"; shift ;;
    --no-build) BUILD=0 ;;
    *) echo "device-kit.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
KIT=target/device-kit
[ -f "$FIXTURES/config.json" ] || { echo "device-kit.sh: no fixture at $FIXTURES" >&2; exit 2; }
if [ "$BUILD" = 1 ]; then
  scripts/cuda/build.sh --pack
fi
[ -f target/cuda/dist/coca-worker.xz ] || {
  echo "device-kit.sh: no target/cuda/dist/coca-worker.xz (run scripts/cuda/build.sh --pack)" >&2
  exit 2
}
rm -rf "$KIT"
mkdir -p "$KIT/bin" "$KIT/fixture" "$KIT/wheels"
cp target/cuda/dist/coca-worker.xz target/cuda/dist/coca-launch.xz \
  target/cuda/dist/libcoca_kernel_profile.so "$KIT/bin/"
# What `verify` reads: the config, weights, inputs/outputs, extras and the images.
for f in config.json weights.safetensors io.safetensors extras.json extras.safetensors; do
  [ -f "$FIXTURES/$f" ] && cp "$FIXTURES/$f" "$KIT/fixture/"
done
[ -d "$FIXTURES/images" ] && cp -r "$FIXTURES/images" "$KIT/fixture/"
# open_clip and the packages it imports at start that the GPU machine's image lacks (its own
# torch, torchvision, timm, huggingface_hub, safetensors, regex and tqdm serve; carrying them
# too puts the kit over the 64 MiB a device call may carry). Optional: without them the PyTorch
# checks report that they could not run.
python3 -m pip download --quiet --no-deps --dest "$KIT/wheels" \
  open_clip_torch==3.3.0 ftfy wcwidth \
  --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
  || echo "device-kit.sh: could not fetch open_clip's wheels; the PyTorch checks will be skipped" >&2
du -sh "$KIT"
echo "kit ready: carry target/device-kit and run scripts/cuda/device-check.sh there"
