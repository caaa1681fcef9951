#!/usr/bin/env bash
# Checks that the CPU build compiles for 64-bit ARM Linux (Grace Hopper and other aarch64 GPU
# nodes) with no warning: `cargo clippy --all-targets -- -D warnings` for the target
# aarch64-unknown-linux-gnu, into target/aarch64. Nothing is run.
#
#   scripts/check_aarch64.sh
#
# It needs the target's standard library (`rustup target add aarch64-unknown-linux-gnu`) and a C
# cross compiler with the target's C library headers for the crates that compile C (`ring`:
# Debian's gcc-aarch64-linux-gnu and libc6-dev-arm64-cross, which the compiler only recommends); as root
# it installs what is missing (each download within 10 minutes). Where either cannot be had it
# says so and exits 0 (skipped); a compile error or warning exits 1, bad arguments 2.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 0 ] || { echo "check_aarch64.sh: no arguments expected, got $*" >&2; exit 2; }
TARGET=aarch64-unknown-linux-gnu
CC_CROSS=aarch64-linux-gnu-gcc

if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
  timeout 600 rustup target add "$TARGET" >/dev/null 2>&1 || {
    echo "check_aarch64.sh: skipped: rustup could not install the $TARGET standard library"
    exit 0
  }
fi
CROSS_HEADER=/usr/aarch64-linux-gnu/include/stdio.h
if ! command -v "$CC_CROSS" >/dev/null || [ ! -f "$CROSS_HEADER" ]; then
  if [ "$(id -u)" = 0 ]; then
    install_cross_gcc() {
      timeout 600 apt-get install -y -qq --no-install-recommends gcc-aarch64-linux-gnu \
        libc6-dev-arm64-cross
    }
    install_cross_gcc >/dev/null 2>&1 \
      || { timeout 600 apt-get update -qq >/dev/null 2>&1 && install_cross_gcc >/dev/null 2>&1; }
  fi
  command -v "$CC_CROSS" >/dev/null && [ -f "$CROSS_HEADER" ] || {
    echo "check_aarch64.sh: skipped: no $CC_CROSS with the target's C headers (Debian: apt-get" \
      "install gcc-aarch64-linux-gnu libc6-dev-arm64-cross)"
    exit 0
  }
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=$CC_CROSS
cargo clippy --release --workspace --all-targets --target "$TARGET" --target-dir target/aarch64 \
  -- -D warnings || exit 1
echo "check_aarch64.sh: $TARGET builds with no warning"
