// Runs the kernels of fused_ops.cu on the CPU, thread for thread: each CUDA thread of a block
// is an OS thread, the warp shuffles exchange values through a barrier of the warp's 32
// threads, and blocks run one after another. Built only by the test that compares the kernels
// with the CPU ops (worker/tests/cuda_kernels_emulated.rs, via kernels/emulate_main.cpp): float32
// only; a shuffle that not all 32 lanes reach hangs here as it would be undefined on a GPU (the
// test bounds its wait).
#pragma once
#include <condition_variable>
#include <math.h>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline

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
