// The model's fused ops on NVIDIA GPUs: the CUDA side of worker/src/model/ops (layer norm,
// scaled and masked softmax, erf GELU, cross-entropy, the bias add, each with its backward)
// and AdamW's in-place update (worker/src/train/adamw_inplace.rs).
//
// Compiled to PTX by worker/build.rs (nvcc, only with the `cuda` feature) and loaded by
// worker/src/model/ops/cuda.rs. The same source also compiles as plain C++ with
// COCA_EMULATE defined (kernels/emulate.h, with host versions of CUDA's bfloat16 and float16
// conversions): the CPU tests run these kernels, thread for thread, against the CPU kernels
// (worker/tests/cuda_kernels_emulated.rs).
//
// Conventions, shared with the launches in ops/cuda.rs:
// - Row kernels give each row one warp (32 lanes): block = ROW_WARPS warps, grid = rows /
//   ROW_WARPS rounded up. A whole warp leaves together when its row is past the end, so every
//   shuffle has all 32 lanes.
// - Inputs of type T (float32, bfloat16 or float16; the suffix of each entry point) are read
//   into float32; every sum, maximum, exp and erf is float32. What each op returns follows
//   PyTorch autocast (the table in ops/mod.rs): layer norm, softmax and the cross-entropy
//   return float32, GELU returns T.
// - Elementwise kernels use a grid-stride loop.
#ifdef COCA_EMULATE
#include "emulate.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif
#define EACH_DTYPE(M) M(f32, float) M(bf16, __nv_bfloat16) M(f16, __half)

#define WARP 32
#define FULL_MASK 0xffffffffu

// Loads and stores of T as float32 (rounding to nearest even).
template <typename T> struct Io;
template <> struct Io<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <> struct Io<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16(v); }
};
template <> struct Io<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half(v); }
};

// The sum and the maximum of a value over the 32 lanes of a warp, in every lane.
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = WARP / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(FULL_MASK, v, offset);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int offset = WARP / 2; offset > 0; offset /= 2)
    v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
  return v;
}

// The row of the calling warp, and its lane.
__device__ __forceinline__ long long warp_row() {
  return (long long)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
}
__device__ __forceinline__ int lane_id() { return threadIdx.x % WARP; }

// ---- Layer norm ----------------------------------------------------------------------------

// Mean and 1 / sqrt(biased variance + eps) of a row (two passes: a large mean costs no
// precision), in every lane.
template <typename T>
__device__ __forceinline__ void row_stats(const T* x, int d, float eps, float* mean, float* rstd) {
  const int lane = lane_id();
  float s = 0.0f;
  for (int j = lane; j < d; j += WARP) s += Io<T>::load(x[j]);
  const float m = warp_sum(s) / d;
  float q = 0.0f;
  for (int j = lane; j < d; j += WARP) {
    const float c = Io<T>::load(x[j]) - m;
    q += c * c;
  }
  *mean = m;
  *rstd = 1.0f / sqrtf(warp_sum(q) / d + eps);
}

// y = (x - mean) * rstd * w + b, rows of width d; y is float32.
template <typename T>
__device__ void layer_norm_fwd(const T* x, const float* w, const float* b, float* y,
                               long long rows, int d, float eps) {
  const long long row = warp_row();
  if (row >= rows) return;
  const T* xr = x + row * d;
  float* yr = y + row * d;
  float mean, rstd;
  row_stats(xr, d, eps, &mean, &rstd);
  for (int j = lane_id(); j < d; j += WARP) yr[j] = (Io<T>::load(xr[j]) - mean) * rstd * w[j] + b[j];
}

// dx of each row (float32), and the row's (mean, rstd) into stats[2 row ..] for the weight
// and bias gradients.
template <typename T>
__device__ void layer_norm_bwd_dx(const T* x, const float* w, const float* g, float* dx,
                                  float* stats, long long rows, int d, float eps) {
  const long long row = warp_row();
  if (row >= rows) return;
  const int lane = lane_id();
  const T* xr = x + row * d;
  const float* gr = g + row * d;
  float* dxr = dx + row * d;
  float mean, rstd;
  row_stats(xr, d, eps, &mean, &rstd);
  float s_gw = 0.0f, s_gwx = 0.0f;
  for (int j = lane; j < d; j += WARP) {
    const float gw = gr[j] * w[j];
    s_gw += gw;
    s_gwx += gw * (Io<T>::load(xr[j]) - mean) * rstd;
  }
  s_gw = warp_sum(s_gw) / d;
  s_gwx = warp_sum(s_gwx) / d;
  for (int j = lane; j < d; j += WARP) {
    const float xhat = (Io<T>::load(xr[j]) - mean) * rstd;
    dxr[j] = rstd * (gr[j] * w[j] - s_gw - xhat * s_gwx);
  }
  if (lane == 0) {
    stats[2 * row] = mean;
    stats[2 * row + 1] = rstd;
  }
}

// Per chunk of `chunk` rows (blockIdx.y) and column (one thread each): Σ g·x̂ and Σ g, into
// partial[chunk][0 .. d] and partial[chunk][d .. 2d]. Summed over chunks by column_sum: the
// order is fixed, so the result does not depend on scheduling.
template <typename T>
__device__ void layer_norm_bwd_partials(const T* x, const float* g, const float* stats,
                                        float* partial, long long rows, int d, int chunk) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= d) return;
  const long long start = (long long)blockIdx.y * chunk;
  const long long end = start + chunk < rows ? start + chunk : rows;
  float acc_w = 0.0f, acc_b = 0.0f;
  for (long long r = start; r < end; ++r) {
    const float gv = g[r * d + col];
    acc_w += gv * (Io<T>::load(x[r * d + col]) - stats[2 * r]) * stats[2 * r + 1];
    acc_b += gv;
  }
  partial[(long long)blockIdx.y * 2 * d + col] = acc_w;
  partial[(long long)blockIdx.y * 2 * d + d + col] = acc_b;
}

// out[col] = Σ_c partial[c][col] for col < width, in chunk order, stored as T.
template <typename T>
__device__ void column_sum(const float* partial, T* out, int chunks, int width) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= width) return;
  float s = 0.0f;
  for (int c = 0; c < chunks; ++c) s += partial[(long long)c * width + col];
  out[col] = Io<T>::store(s);
}

// ---- Bias ----------------------------------------------------------------------------------

// out = y + b over rows of width d (all T; the sum in float32, rounded once).
template <typename T>
__device__ void add_bias(const T* y, const T* b, T* out, long long n, int d) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    out[i] = Io<T>::store(Io<T>::load(y[i]) + Io<T>::load(b[i % d]));
  }
}

// The bias gradient's partial column sums of g (rows of width d), float32, per chunk of
// `chunk` rows (blockIdx.y), into partial[chunk][0 .. d]; column_sum adds the chunks.
template <typename T>
__device__ void column_partials(const T* g, float* partial, long long rows, int d, int chunk) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= d) return;
  const long long start = (long long)blockIdx.y * chunk;
  const long long end = start + chunk < rows ? start + chunk : rows;
  float acc = 0.0f;
  for (long long r = start; r < end; ++r) acc += Io<T>::load(g[r * d + col]);
  partial[(long long)blockIdx.y * d + col] = acc;
}

// ---- Softmax -------------------------------------------------------------------------------

// y = softmax(scale · x + mask) over rows of width n (y float32). Rows are [B, H, T] flattened;
// mask (float32, or null) is [T, n] shared by the batch (mask_batch = 1) or [B, T, n]. A row
// that is −∞ everywhere gives zeros, as the CPU kernel.
template <typename T>
__device__ void softmax_fwd(const T* x, const float* mask, float* y, long long rows, int n,
                            float scale, int t, long long heads_t, int mask_batch) {
  const long long row = warp_row();
  if (row >= rows) return;
  const int lane = lane_id();
  const T* xr = x + row * n;
  float* yr = y + row * n;
  const float* mr = nullptr;
  if (mask != nullptr) {
    const long long mrow = mask_batch == 1 ? row % t : (row / heads_t) * t + row % t;
    mr = mask + mrow * n;
  }
  float mx = -INFINITY;
  for (int j = lane; j < n; j += WARP) {
    const float z = Io<T>::load(xr[j]) * scale + (mr != nullptr ? mr[j] : 0.0f);
    yr[j] = z;
    mx = fmaxf(mx, z);
  }
  mx = warp_max(mx);
  if (mx == -INFINITY) {
    for (int j = lane; j < n; j += WARP) yr[j] = 0.0f;
    return;
  }
  float s = 0.0f;
  for (int j = lane; j < n; j += WARP) {
    const float e = expf(yr[j] - mx);
    yr[j] = e;
    s += e;
  }
  const float inv = 1.0f / warp_sum(s);
  for (int j = lane; j < n; j += WARP) yr[j] *= inv;
}

// dx = scale · y ⊙ (g − Σ g ⊙ y), row by row (all float32).
extern "C" __global__ void softmax_bwd_f32(const float* y, const float* g, float* dx,
                                           long long rows, int n, float scale) {
  const long long row = warp_row();
  if (row >= rows) return;
  const int lane = lane_id();
  const float* yr = y + row * n;
  const float* gr = g + row * n;
  float* dxr = dx + row * n;
  float dot = 0.0f;
  for (int j = lane; j < n; j += WARP) dot += yr[j] * gr[j];
  dot = warp_sum(dot);
  for (int j = lane; j < n; j += WARP) dxr[j] = scale * yr[j] * (gr[j] - dot);
}

// ---- GELU (erf) ----------------------------------------------------------------------------

#define COCA_FRAC_1_SQRT_2 0.70710678118654752f
#define COCA_INV_SQRT_2PI 0.39894228040143268f

// y = 0.5 · x · (1 + erf(x / √2)), elementwise; y has x's type.
template <typename T>
__device__ void gelu_fwd(const T* x, T* y, long long n) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const float v = Io<T>::load(x[i]);
    y[i] = Io<T>::store(0.5f * v * (1.0f + erff(v * COCA_FRAC_1_SQRT_2)));
  }
}

// dx = g · (Φ(x) + x·φ(x)), elementwise; dx has x's type.
template <typename T>
__device__ void gelu_bwd(const T* x, const T* g, T* dx, long long n) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const float v = Io<T>::load(x[i]);
    const float cdf = 0.5f * (1.0f + erff(v * COCA_FRAC_1_SQRT_2));
    const float pdf = COCA_INV_SQRT_2PI * expf(-0.5f * v * v);
    dx[i] = Io<T>::store(Io<T>::load(g[i]) * (cdf + v * pdf));
  }
}

// ---- Cross-entropy -------------------------------------------------------------------------

// log Σ exp over a row of width v, in every lane.
template <typename T>
__device__ __forceinline__ float row_log_sum_exp(const T* xr, int v) {
  const int lane = lane_id();
  float mx = -INFINITY;
  for (int j = lane; j < v; j += WARP) mx = fmaxf(mx, Io<T>::load(xr[j]));
  mx = warp_max(mx);
  float s = 0.0f;
  for (int j = lane; j < v; j += WARP) s += expf(Io<T>::load(xr[j]) - mx);
  return mx + logf(warp_sum(s));
}

// The cross-entropy's two terms per row, over a slice of the vocabulary: the logits x are
// columns start .. start + v of rows over a vocabulary of `vocab` ids (the whole vocabulary:
// start 0, vocab v). stats[row] = logsumexp(x[row]); stats[rows + row] = x[row, target − start]
// where the slice holds the target, else 0; both 0 where the target is `ignore` (ignore < 0:
// none). A target outside the vocabulary gives a NaN target logit (the host does not read the
// targets back to check them; the trainer stops on a non-finite loss).
template <typename T>
__device__ void cross_entropy_stats_fwd(const T* x, const unsigned int* targets, float* stats,
                                        long long rows, int v, long long ignore, long long start,
                                        long long vocab) {
  const long long row = warp_row();
  if (row >= rows) return;
  const long long target = targets[row];
  if (ignore >= 0 && target == ignore) {
    if (lane_id() == 0) stats[row] = stats[rows + row] = 0.0f;
    return;
  }
  const T* xr = x + row * v;
  const float lse = row_log_sum_exp(xr, v);
  if (lane_id() == 0) {
    float picked = 0.0f;
    if (target >= vocab) picked = NAN;
    else if (target >= start && target < start + v) picked = Io<T>::load(xr[target - start]);
    stats[row] = lse;
    stats[rows + row] = picked;
  }
}

// Their gradient for the logits (x's dtype): dx[row] = exp(x[row] − lse) · g_lse + onehot(target
// − start) · g_target, with aux [3, rows] = (the forward's lse, g_lse, g_target); zeros on
// ignored rows.
template <typename T>
__device__ void cross_entropy_stats_bwd(const T* x, const unsigned int* targets, const float* aux,
                                        T* dx, long long rows, int v, long long ignore,
                                        long long start) {
  const long long row = warp_row();
  if (row >= rows) return;
  const int lane = lane_id();
  const long long target = targets[row];
  T* dxr = dx + row * v;
  if (ignore >= 0 && target == ignore) {
    for (int j = lane; j < v; j += WARP) dxr[j] = Io<T>::store(0.0f);
    return;
  }
  const T* xr = x + row * v;
  const float lse = aux[row], g_lse = aux[rows + row], g_target = aux[2 * rows + row];
  for (int j = lane; j < v; j += WARP) {
    const float onehot = start + j == target ? g_target : 0.0f;
    dxr[j] = Io<T>::store(expf(Io<T>::load(xr[j]) - lse) * g_lse + onehot);
  }
}

// ---- Token embedding -----------------------------------------------------------------------

// out[i] = table[ids[i] − start] (rows of width d, float32) for a table of the v ids start ..
// start + v of a vocabulary of `vocab` ids (the whole table: start 0, vocab v); a row of zeros
// for an id another tensor-parallel member holds, and a row of NaN for an id outside the
// vocabulary (no error can leave a kernel; the NaN loss stops training).
extern "C" __global__ void embedding_fwd_f32(const float* table, const unsigned int* ids,
                                             float* out, long long n, int d, long long v,
                                             long long start, long long vocab) {
  const long long row = warp_row();
  if (row >= n) return;
  const long long id = ids[row];
  float* o = out + row * d;
  const bool known = id < vocab, mine = id >= start && id < start + v;
  for (int j = lane_id(); j < d; j += WARP)
    o[j] = !known ? NAN : mine ? table[(id - start) * d + j] : 0.0f;
}

// dtable[id − start] += g[i] for every position i of an id the table holds, in position order:
// the first position of each id (its leader warp) adds the rows of all that id's positions, so
// no two warps write one row and the sums do not depend on scheduling (candle's index_add
// gives each column one thread looping over every position). dtable starts at zero; ids
// outside the table are skipped.
extern "C" __global__ void embedding_bwd_f32(const unsigned int* ids, const float* g,
                                             float* dtable, long long n, int d, long long v,
                                             long long start) {
  const long long row = warp_row();
  if (row >= n) return;
  const int lane = lane_id();
  const unsigned int id = ids[row];
  if ((long long)id < start || (long long)id >= start + v) return;
  // Leader: no earlier position has this id.
  for (long long base = 0; base < row; base += WARP) {
    const long long j = base + lane;
    if (__ballot_sync(FULL_MASK, j < row && ids[j] == id) != 0) return;
  }
  float* dst = dtable + ((long long)id - start) * d;
  for (long long base = row; base < n; base += WARP) {
    const long long j = base + lane;
    unsigned int matches = __ballot_sync(FULL_MASK, j < n && ids[j] == id);
    while (matches != 0) {
      const long long p = base + __ffs(matches) - 1;
      matches &= matches - 1;
      for (int c = lane; c < d; c += WARP) dst[c] += g[p * d + c];
    }
  }
}

// ---- AdamW ---------------------------------------------------------------------------------

// torch.optim.AdamW's update in place, in the order of adamw_chunk on the CPU: both moments
// first (m ← β·m + (1 − β)·g, and the same of g² into v), then the parameters.
extern "C" __global__ void adam_moment_f32(float* m, const float* g, long long n, float beta,
                                           int squared) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const float w = (1.0f - beta) * g[i];
    m[i] = beta * m[i] + (squared ? w * g[i] : w);
  }
}

// p ← p·decay − step_size · m / (√v · inv_bias2_sqrt + eps).
extern "C" __global__ void adamw_param_f32(float* p, const float* m, const float* v, long long n,
                                           float decay, float step_size, float inv_bias2_sqrt,
                                           float eps) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    p[i] = p[i] * decay - step_size * m[i] / (sqrtf(v[i]) * inv_bias2_sqrt + eps);
  }
}

// ---- Entry points, one per dtype -----------------------------------------------------------

#define ENTRY_POINTS(SUFFIX, T)                                                                 \
  extern "C" __global__ void column_sum_##SUFFIX(const float* partial, T* out, int chunks,       \
                                                 int width) {                                    \
    column_sum<T>(partial, out, chunks, width);                                                  \
  }                                                                                              \
  extern "C" __global__ void add_bias_##SUFFIX(const T* y, const T* b, T* out, long long n,       \
                                               int d) {                                          \
    add_bias<T>(y, b, out, n, d);                                                                \
  }                                                                                              \
  extern "C" __global__ void column_partials_##SUFFIX(const T* g, float* partial, long long rows, \
                                                      int d, int chunk) {                        \
    column_partials<T>(g, partial, rows, d, chunk);                                              \
  }                                                                                              \
  extern "C" __global__ void layer_norm_fwd_##SUFFIX(const T* x, const float* w, const float* b, \
                                                     float* y, long long rows, int d, float eps) { \
    layer_norm_fwd<T>(x, w, b, y, rows, d, eps);                                                 \
  }                                                                                              \
  extern "C" __global__ void layer_norm_bwd_dx_##SUFFIX(const T* x, const float* w,              \
                                                        const float* g, float* dx, float* stats, \
                                                        long long rows, int d, float eps) {      \
    layer_norm_bwd_dx<T>(x, w, g, dx, stats, rows, d, eps);                                      \
  }                                                                                              \
  extern "C" __global__ void layer_norm_bwd_partials_##SUFFIX(                                   \
      const T* x, const float* g, const float* stats, float* partial, long long rows, int d,     \
      int chunk) {                                                                               \
    layer_norm_bwd_partials<T>(x, g, stats, partial, rows, d, chunk);                            \
  }                                                                                              \
  extern "C" __global__ void softmax_fwd_##SUFFIX(const T* x, const float* mask, float* y,       \
                                                  long long rows, int n, float scale, int t,     \
                                                  long long heads_t, int mask_batch) {           \
    softmax_fwd<T>(x, mask, y, rows, n, scale, t, heads_t, mask_batch);                          \
  }                                                                                              \
  extern "C" __global__ void gelu_fwd_##SUFFIX(const T* x, T* y, long long n) {                  \
    gelu_fwd<T>(x, y, n);                                                                        \
  }                                                                                              \
  extern "C" __global__ void gelu_bwd_##SUFFIX(const T* x, const T* g, T* dx, long long n) {     \
    gelu_bwd<T>(x, g, dx, n);                                                                    \
  }                                                                                              \
  extern "C" __global__ void cross_entropy_stats_fwd_##SUFFIX(                                  \
      const T* x, const unsigned int* targets, float* stats, long long rows, int v,              \
      long long ignore, long long start, long long vocab) {                                      \
    cross_entropy_stats_fwd<T>(x, targets, stats, rows, v, ignore, start, vocab);                \
  }                                                                                              \
  extern "C" __global__ void cross_entropy_stats_bwd_##SUFFIX(                                  \
      const T* x, const unsigned int* targets, const float* aux, T* dx, long long rows, int v,   \
      long long ignore, long long start) {                                                       \
    cross_entropy_stats_bwd<T>(x, targets, aux, dx, rows, v, ignore, start);                     \
  }

EACH_DTYPE(ENTRY_POINTS)
