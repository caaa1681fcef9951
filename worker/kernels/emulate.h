// Runs the kernels of fused_ops.cu on the CPU, thread for thread: each CUDA thread of a block
// is an OS thread, the warp shuffles exchange values through a barrier of the warp's 32
// threads, and blocks run one after another; bfloat16 and float16 are 16-bit values converted
// as CUDA's __float2bfloat16 / __float2half do (round to nearest even). Built only by the test
// that compares the kernels with the CPU ops (worker/tests/cuda_kernels_emulated.rs, via
// kernels/emulate_main.cpp). A shuffle that not all 32 lanes reach hangs here, as it would be
// undefined on a GPU (the test bounds its wait).
#pragma once
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <math.h>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline

// bfloat16: the upper half of a float32.
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t u = (uint32_t)v.bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return __nv_bfloat16{0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return __nv_bfloat16{(uint16_t)(u >> 16)};
}

// float16 through the compiler's IEEE binary16 (_Float16: round to nearest even).
struct __half {
  uint16_t bits;
};
inline float __half2float(__half v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return (float)h;
}
inline __half __float2half(float f) {
  const _Float16 h = (_Float16)f;
  __half v;
  std::memcpy(&v.bits, &h, 2);
  return v;
}

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// The 32 lanes of one warp: a reusable barrier and the values being exchanged.
class Warp {
 public:
  explicit Warp(int lanes) : lanes_(lanes) {}
  float exchange(int lane, float v, int source) {
    slots_[lane] = v;
    wait();
    const float r = slots_[source];
    wait();
    return r;
  }

 private:
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const unsigned generation = generation_;
    if (++arrived_ == lanes_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation != generation_; });
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  int lanes_;
  int arrived_ = 0;
  unsigned generation_ = 0;
  float slots_[32] = {};
};
inline thread_local Warp* current_warp = nullptr;

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  const int lane = threadIdx.x % 32;
  return current_warp->exchange(lane, v, lane ^ lane_mask);
}

// Bit k set where lane k's predicate holds, in every lane.
inline unsigned __ballot_sync(unsigned /*mask*/, bool predicate) {
  const int lane = threadIdx.x % 32;
  unsigned bits = 0;
  for (int k = 0; k < 32; ++k) {
    // Every lane takes part in each exchange, so the warp stays in step.
    const float theirs = current_warp->exchange(lane, predicate ? 1.0f : 0.0f, k);
    if (theirs != 0.0f) bits |= 1u << k;
  }
  return bits;
}

// The 1-based position of the lowest set bit, 0 for none.
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }

// Runs `kernel` (a callable taking no arguments, reading the thread-local indices) on a grid
// of `grid` blocks of `block` threads (1-D blocks, whole warps).
template <typename Kernel>
void launch(dim3 grid, dim3 block, Kernel kernel) {
  const unsigned warps = (block.x + 31) / 32;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::vector<std::unique_ptr<Warp>> warp;
      for (unsigned w = 0; w < warps; ++w) warp.emplace_back(new Warp(32));
      std::vector<std::thread> threads;
      for (unsigned tx = 0; tx < block.x; ++tx) {
        threads.emplace_back([&, tx] {
          threadIdx = dim3{tx, 0, 1};
          blockIdx = dim3{bx, by, 1};
          blockDim = block;
          gridDim = grid;
          current_warp = warp[tx / 32].get();
          kernel();
        });
      }
      for (auto& t : threads) t.join();
    }
  }
}
