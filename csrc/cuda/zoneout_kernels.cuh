// zoneout_kernels.cuh: the per-step CUDA kernels, templated on the I/O dtype, and their
// launch geometry. zoneout_launch.cuh launches them; kernels_float.cu (float32, float64) and
// kernels_half.cu (float16, bfloat16) instantiate the launchers, so the two dtype families
// compile in parallel. This file has no launch syntax, so host code can include it too.
//
// One thread per (example b, unit j). The per-element math and the masks are the shared
// framework-free functions of zoneout_lstm.h (cell_forward, cell_backward, gru_forward,
// gru_backward, rnn_forward, rnn_backward, element_masks); this file only moves data and, in
// the fused LSTM variants, computes the recurrent product.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/zoneout_cuda.h"
#include "zoneout_lstm.h"

namespace zoneout {
namespace cuda {
namespace detail {

// float32 arithmetic for every dtype but float64; the state dtype equals it.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccType<scalar_t>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Dynamic shared memory of the fused kernels (one untyped array shared by all instantiations).
extern __shared__ __align__(16) unsigned char fused_smem[];

// Resolved once at every kernel's entry: params with the seed loaded from seed_in_memory when
// the caller left it on the device (a CUDA graph replay draws with the buffer's current value);
// only when the kernel draws, so evaluation never dereferences the pointer.
__device__ __forceinline__ ZoneoutParams resolve_seed(const ZoneoutParams& params) {
  ZoneoutParams p = params;
  if (p.training && p.seed_in_memory != nullptr) p.seed = static_cast<uint64_t>(*p.seed_in_memory);
  return p;
}

// Examples per block of the fused kernels: each weight loaded from L2 serves kFusedRows
// examples. 4 keeps the accumulators of the forward kernel (4 x 4) in registers.
constexpr int kFusedRows = 4;
constexpr int kPointwiseThreads = 256;
constexpr int kFusedMaxThreads = 128;

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------
// Finishes element (b, j) given its recurrent contribution rec[g] = (h_{t-1} W_hh^T)[b, gH + j].
template <typename scalar_t>
__device__ __forceinline__ void forward_element(const ForwardStepArgs& a, const ZoneoutParams& p, int64_t b, int64_t j,
                                                const acc_type<scalar_t> (&rec)[4]) {
  using acc_t = acc_type<scalar_t>;
  const int64_t hidden = p.hidden;
  const int64_t e = b * hidden + j;            // index in [B, H]
  const int64_t row = b * 4 * hidden + j;      // index of gate i in [B, 4H]
  const scalar_t h_prev = static_cast<const scalar_t*>(a.h_prev)[e];
  const acc_t c_prev = static_cast<const acc_t*>(a.c_prev)[e];
  scalar_t* y = static_cast<scalar_t*>(a.y);
  acc_t* c = static_cast<acc_t*>(a.c);
  acc_t* gates = static_cast<acc_t*>(a.gates);
  scalar_t* c_n = static_cast<scalar_t*>(a.c_n);

  if (!step_active(a.t, a.lengths, b)) {  // past the sequence's end: state copied through
    y[e] = h_prev;                          // bit-exact copy, no round trip through acc_t
    c[e] = c_prev;
#pragma unroll
    for (int g = 0; g < 4; ++g) gates[row + g * hidden] = acc_t(0);
    if (c_n != nullptr) store(c_n + e, c_prev);
    return;
  }
  const acc_t* x_proj = static_cast<const acc_t*>(a.x_proj);
  const scalar_t* bias = static_cast<const scalar_t*>(a.bias);
  acc_t pre[4];
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    acc_t v = x_proj[row + g * hidden];
    if (bias != nullptr) v += to_acc(bias[g * hidden + j]);
    pre[g] = v + rec[g];
  }
  const ElementMasks<acc_t> m = element_masks<acc_t>(p, a.t, b, j);
  const CellForward<acc_t> out = cell_forward<acc_t>(pre[0], pre[1], pre[2], pre[3], c_prev, to_acc(h_prev), m);
  store(y + e, out.h);
  c[e] = out.c;
  gates[row] = out.i;
  gates[row + hidden] = out.f;
  gates[row + 2 * hidden] = out.g;
  gates[row + 3 * hidden] = out.o;
  if (c_n != nullptr) store(c_n + e, out.c);
}

// Pointwise forward: the recurrent product comes precomputed in args.hh (cuBLAS).
template <typename scalar_t>
__global__ void __launch_bounds__(kPointwiseThreads)
    forward_step_kernel(const ForwardStepArgs a, const ZoneoutParams params) {
  using acc_t = acc_type<scalar_t>;
  const ZoneoutParams p = resolve_seed(params);
  const int64_t hidden = p.hidden;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.batch * hidden) return;
  const int64_t b = e / hidden, j = e - b * hidden;
  const acc_t* hh = static_cast<const acc_t*>(a.hh) + b * 4 * hidden + j;
  acc_t rec[4];
#pragma unroll
  for (int g = 0; g < 4; ++g) rec[g] = hh[g * hidden];
  forward_element<scalar_t>(a, p, b, j, rec);
}

// Fused forward: block (blockIdx.x, blockIdx.y) owns units [x*blockDim, ...) of examples
// [y*kFusedRows, ...). h_{t-1} of those examples is staged in shared memory; each thread
// forms the four dot products of its unit with W_hh^T ([H, 4H], so that consecutive j read
// consecutive addresses) in a fixed order k = 0..H-1: deterministic, no atomics.
template <typename scalar_t>
__global__ void __launch_bounds__(kFusedMaxThreads)
    forward_step_fused_kernel(const ForwardStepArgs a, const ZoneoutParams params) {
  using acc_t = acc_type<scalar_t>;
  const ZoneoutParams p = resolve_seed(params);
  const int hidden = static_cast<int>(p.hidden);  // <= kFusedMaxHidden
  const int64_t batch = p.batch;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * kFusedRows;
  acc_t* h_s = reinterpret_cast<acc_t*>(fused_smem);  // [kFusedRows][H]
  const scalar_t* h_prev = static_cast<const scalar_t*>(a.h_prev) + b0 * hidden;
  for (int idx = threadIdx.x; idx < kFusedRows * hidden; idx += blockDim.x) {
    const bool valid = b0 + idx / hidden < batch;
    h_s[idx] = valid ? to_acc(h_prev[idx]) : acc_t(0);
  }
  __syncthreads();
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= hidden) return;
  const scalar_t* w = static_cast<const scalar_t*>(a.w_hh_t) + j;
  acc_t acc[kFusedRows][4];
#pragma unroll
  for (int r = 0; r < kFusedRows; ++r)
#pragma unroll
    for (int g = 0; g < 4; ++g) acc[r][g] = acc_t(0);
#pragma unroll 2
  for (int k = 0; k < hidden; ++k) {
    const scalar_t* wk = w + static_cast<int64_t>(k) * 4 * hidden;
    acc_t wg[4];
#pragma unroll
    for (int g = 0; g < 4; ++g) wg[g] = to_acc(wk[g * hidden]);
#pragma unroll
    for (int r = 0; r < kFusedRows; ++r) {
      const acc_t hk = h_s[r * hidden + k];
#pragma unroll
      for (int g = 0; g < 4; ++g) acc[r][g] += hk * wg[g];
    }
  }
#pragma unroll
  for (int r = 0; r < kFusedRows; ++r) {
    if (b0 + r < batch) forward_element<scalar_t>(a, p, b0 + r, j, acc[r]);
  }
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------
// Element (b, j) given dh_rec = (d_pre_next W_hh)[b, j], the gradient reaching h_t through
// the next processed step's pre-activations.
template <typename scalar_t>
__device__ __forceinline__ void backward_element(const BackwardStepArgs& a, const ZoneoutParams& p, int64_t b,
                                                 int64_t j, acc_type<scalar_t> dh_rec) {
  using acc_t = acc_type<scalar_t>;
  const int64_t hidden = p.hidden;
  const int64_t e = b * hidden + j;
  const int64_t row = b * 4 * hidden + j;
  acc_t* dh_direct = static_cast<acc_t*>(a.dh_direct);
  acc_t* dc = static_cast<acc_t*>(a.dc);
  acc_t* d_pre = static_cast<acc_t*>(a.d_pre);
  const acc_t dh = to_acc(static_cast<const scalar_t*>(a.grad_y)[e]) + dh_rec + dh_direct[e];

  if (!step_active(a.t, a.lengths, b)) {  // y_t was h_{t-1}: dh and dc pass straight through
    dh_direct[e] = dh;
#pragma unroll
    for (int g = 0; g < 4; ++g) d_pre[row + g * hidden] = acc_t(0);
    return;
  }
  const acc_t* gates = static_cast<const acc_t*>(a.gates);
  const acc_t c_prev = static_cast<const acc_t*>(a.c_prev)[e];
  const ElementMasks<acc_t> m = element_masks<acc_t>(p, a.t, b, j);
  const CellBackward<acc_t> out = cell_backward<acc_t>(dh, dc[e], gates[row], gates[row + hidden],
                                                       gates[row + 2 * hidden], gates[row + 3 * hidden], c_prev, m);
  dh_direct[e] = out.dh_prev_direct;
  dc[e] = out.dc_prev;
  d_pre[row] = out.d_pre_i;
  d_pre[row + hidden] = out.d_pre_f;
  d_pre[row + 2 * hidden] = out.d_pre_g;
  d_pre[row + 3 * hidden] = out.d_pre_o;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kPointwiseThreads)
    backward_step_kernel(const BackwardStepArgs a, const ZoneoutParams params) {
  using acc_t = acc_type<scalar_t>;
  const ZoneoutParams p = resolve_seed(params);
  const int64_t hidden = p.hidden;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.batch * hidden) return;
  const int64_t b = e / hidden, j = e - b * hidden;
  const acc_t dh_rec = a.dh_rec != nullptr ? static_cast<const acc_t*>(a.dh_rec)[e] : acc_t(0);
  backward_element<scalar_t>(a, p, b, j, dh_rec);
}

// Fused backward: dh_rec[b, j] = sum_k d_pre_next[b, k] W_hh[k, j] over k = 0..4H-1 in a
// fixed order, d_pre_next rows staged in shared memory, W_hh read as stored ([4H, H]:
// consecutive j, consecutive addresses).
template <typename scalar_t>
__global__ void __launch_bounds__(kFusedMaxThreads)
    backward_step_fused_kernel(const BackwardStepArgs a, const ZoneoutParams params) {
  using acc_t = acc_type<scalar_t>;
  const ZoneoutParams p = resolve_seed(params);
  const int hidden = static_cast<int>(p.hidden);
  const int gates4 = 4 * hidden;
  const int64_t batch = p.batch;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * kFusedRows;
  const bool has_next = a.d_pre_next != nullptr;  // uniform over the grid
  acc_t* d_s = reinterpret_cast<acc_t*>(fused_smem);  // [kFusedRows][4H]
  if (has_next) {
    const acc_t* d_next = static_cast<const acc_t*>(a.d_pre_next) + b0 * gates4;
    for (int idx = threadIdx.x; idx < kFusedRows * gates4; idx += blockDim.x) {
      const bool valid = b0 + idx / gates4 < batch;
      d_s[idx] = valid ? d_next[idx] : acc_t(0);
    }
  }
  __syncthreads();
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= hidden) return;
  acc_t acc[kFusedRows];
#pragma unroll
  for (int r = 0; r < kFusedRows; ++r) acc[r] = acc_t(0);
  if (has_next) {
    const scalar_t* w = static_cast<const scalar_t*>(a.w_hh) + j;
#pragma unroll 4
    for (int k = 0; k < gates4; ++k) {
      const acc_t wk = to_acc(w[static_cast<int64_t>(k) * hidden]);
#pragma unroll
      for (int r = 0; r < kFusedRows; ++r) acc[r] += d_s[r * gates4 + k] * wk;
    }
  }
#pragma unroll
  for (int r = 0; r < kFusedRows; ++r) {
    if (b0 + r < batch) backward_element<scalar_t>(a, p, b0 + r, j, acc[r]);
  }
}

// ---------------------------------------------------------------------------------------
// GRU and plain RNN (kCell = kGru, kRnnTanh or kRnnRelu), recurrent product from cuBLAS.
// Products and pre-activation gradients are in the state dtype acc_t (see zoneout_cuda.h).
// ---------------------------------------------------------------------------------------
template <typename scalar_t, int kCell>
__global__ void __launch_bounds__(kPointwiseThreads)
    gru_rnn_forward_step_kernel(const GruRnnForwardStepArgs a, const ZoneoutParams params) {
  using acc_t = acc_type<scalar_t>;
  const ZoneoutParams p = resolve_seed(params);
  constexpr int kRows = kCell == kGru ? 3 : 1;   // cell_rows(kCell)
  constexpr int kSaved = kCell == kGru ? 4 : 1;  // cell_saved(kCell)
  const int64_t hidden = p.hidden;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.batch * hidden) return;
  const int64_t b = e / hidden, j = e - b * hidden;
  const int64_t row = b * kRows * hidden + j;    // first row of (b, j) in [B, G*H]
  const int64_t saved = b * kSaved * hidden + j; // first column of (b, j) in [B, S*H]
  const scalar_t h_prev = static_cast<const scalar_t*>(a.h_prev)[e];
  scalar_t* y = static_cast<scalar_t*>(a.y);
  acc_t* gates = static_cast<acc_t*>(a.gates);

  if (!step_active(a.t, a.lengths, b)) {  // past the sequence's end: state copied through
    y[e] = h_prev;                          // bit-exact copy, no round trip through acc_t
#pragma unroll
    for (int g = 0; g < kSaved; ++g) gates[saved + g * hidden] = acc_t(0);
    return;
  }
  const acc_t* x_proj = static_cast<const acc_t*>(a.x_proj);
  const acc_t* hp = static_cast<const acc_t*>(a.hp);
  const scalar_t* b_ih = static_cast<const scalar_t*>(a.b_ih);
  const scalar_t* b_hh = static_cast<const scalar_t*>(a.b_hh);
  acc_t xs[kRows], hs[kRows];  // input parts x W_i*^T + b_i*, recurrent parts h W_h*^T + b_h*
#pragma unroll
  for (int g = 0; g < kRows; ++g) {
    xs[g] = x_proj[row + g * hidden];
    if (b_ih != nullptr) xs[g] += to_acc(b_ih[g * hidden + j]);
    hs[g] = hp[row + g * hidden];
    if (b_hh != nullptr) hs[g] += to_acc(b_hh[g * hidden + j]);
  }
  const ElementMasks<acc_t> m = element_masks<acc_t>(p, a.t, b, j);
  if constexpr (kCell == kGru) {
    const GruForward<acc_t> out = gru_forward<acc_t>(xs[0], xs[1], xs[2], hs[0], hs[1], hs[2], to_acc(h_prev), m);
    store(y + e, out.h);
    gates[saved] = out.r;
    gates[saved + hidden] = out.u;
    gates[saved + 2 * hidden] = out.n;
    gates[saved + 3 * hidden] = out.hp_n;
  } else {
    const RnnForward<acc_t> out = rnn_forward<acc_t>(kCell == kRnnRelu, xs[0] + hs[0], to_acc(h_prev), m);
    store(y + e, out.h);
    gates[saved] = out.candidate;
  }
}

template <typename scalar_t, int kCell>
__global__ void __launch_bounds__(kPointwiseThreads)
    gru_rnn_backward_step_kernel(const GruRnnBackwardStepArgs a, const ZoneoutParams params) {
  using acc_t = acc_type<scalar_t>;
  const ZoneoutParams p = resolve_seed(params);
  constexpr int kRows = kCell == kGru ? 3 : 1;
  constexpr int kSaved = kCell == kGru ? 4 : 1;
  const int64_t hidden = p.hidden;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.batch * hidden) return;
  const int64_t b = e / hidden, j = e - b * hidden;
  const int64_t row = b * kRows * hidden + j;
  const int64_t saved = b * kSaved * hidden + j;
  acc_t* dh_direct = static_cast<acc_t*>(a.dh_direct);
  acc_t* d_x = static_cast<acc_t*>(a.d_x);
  acc_t* d_h = static_cast<acc_t*>(a.d_h);  // GRU only
  const acc_t dh_rec = a.dh_rec != nullptr ? static_cast<const acc_t*>(a.dh_rec)[e] : acc_t(0);
  const acc_t dh = to_acc(static_cast<const scalar_t*>(a.grad_y)[e]) + dh_rec + dh_direct[e];

  if (!step_active(a.t, a.lengths, b)) {  // y_t was h_{t-1}: dh passes straight through
    dh_direct[e] = dh;
#pragma unroll
    for (int g = 0; g < kRows; ++g) {
      d_x[row + g * hidden] = acc_t(0);
      if constexpr (kCell == kGru) d_h[row + g * hidden] = acc_t(0);
    }
    return;
  }
  const acc_t* gates = static_cast<const acc_t*>(a.gates);
  const ElementMasks<acc_t> m = element_masks<acc_t>(p, a.t, b, j);
  if constexpr (kCell == kGru) {
    const acc_t h_prev = to_acc(static_cast<const scalar_t*>(a.h_prev)[e]);
    const GruBackward<acc_t> out = gru_backward<acc_t>(dh, gates[saved], gates[saved + hidden],
                                                       gates[saved + 2 * hidden], gates[saved + 3 * hidden], h_prev, m);
    dh_direct[e] = out.dh_prev_direct;
    d_x[row] = out.d_r;
    d_x[row + hidden] = out.d_u;
    d_x[row + 2 * hidden] = out.d_n;
    d_h[row] = out.d_r;
    d_h[row + hidden] = out.d_u;
    d_h[row + 2 * hidden] = out.d_hp_n;
  } else {
    const RnnBackward<acc_t> out = rnn_backward<acc_t>(kCell == kRnnRelu, dh, gates[saved], m);
    dh_direct[e] = out.dh_prev_direct;
    d_x[row] = out.d_pre;
  }
}

// ---------------------------------------------------------------------------------------
// Launch geometry (zoneout_launch.cuh)
// ---------------------------------------------------------------------------------------
struct FusedConfig {
  dim3 grid, block;
};

// Fused kernels: one thread per unit (up to kFusedMaxThreads per block), kFusedRows examples
// per block along grid.y.
inline FusedConfig fused_config(int64_t batch, int64_t hidden) {
  const int64_t warps = (hidden + 31) / 32;
  const int threads = static_cast<int>(warps * 32 < kFusedMaxThreads ? warps * 32 : kFusedMaxThreads);
  FusedConfig cfg;
  cfg.block = dim3(threads);
  cfg.grid = dim3(static_cast<unsigned>((hidden + threads - 1) / threads),
                  static_cast<unsigned>((batch + kFusedRows - 1) / kFusedRows));
  return cfg;
}

inline bool fused_fits(int64_t batch, int64_t hidden) {
  return hidden <= kFusedMaxHidden && batch <= kFusedMaxBatch;
}

}  // namespace detail
}  // namespace cuda
}  // namespace zoneout
