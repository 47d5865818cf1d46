// zoneout_launch.cuh: the launchers of the step kernels (zoneout_kernels.cuh), instantiated
// per dtype in kernels_float.cu and kernels_half.cu and dispatched in dispatch.cu.
#pragma once

#include "cuda/zoneout_kernels.cuh"

namespace zoneout {
namespace cuda {
namespace detail {

template <typename scalar_t>
cudaError_t launch_forward_step(Recurrence recurrence, const ForwardStepArgs& a, const ZoneoutParams& p,
                                cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = p.batch * p.hidden;
  if (n == 0) return cudaSuccess;
  if (recurrence == Recurrence::kFused) {
    if (!fused_fits(p.batch, p.hidden) || a.w_hh_t == nullptr) return cudaErrorInvalidValue;
    const FusedConfig cfg = fused_config(p.batch, p.hidden);
    const size_t smem = sizeof(acc_t) * kFusedRows * p.hidden;
    forward_step_fused_kernel<scalar_t><<<cfg.grid, cfg.block, smem, stream>>>(a, p);
  } else {
    if (a.hh == nullptr) return cudaErrorInvalidValue;
    const unsigned blocks = static_cast<unsigned>((n + kPointwiseThreads - 1) / kPointwiseThreads);
    forward_step_kernel<scalar_t><<<blocks, kPointwiseThreads, 0, stream>>>(a, p);
  }
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_backward_step(Recurrence recurrence, const BackwardStepArgs& a, const ZoneoutParams& p,
                                 cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = p.batch * p.hidden;
  if (n == 0) return cudaSuccess;
  if (recurrence == Recurrence::kFused) {
    if (!fused_fits(p.batch, p.hidden) || a.w_hh == nullptr) return cudaErrorInvalidValue;
    const FusedConfig cfg = fused_config(p.batch, p.hidden);
    // <= 4 rows x 1024 x 8 bytes = 32 KiB: under the 48 KiB that needs no opt-in.
    const size_t smem = a.d_pre_next != nullptr ? sizeof(acc_t) * kFusedRows * 4 * p.hidden : 0;
    backward_step_fused_kernel<scalar_t><<<cfg.grid, cfg.block, smem, stream>>>(a, p);
  } else {
    const unsigned blocks = static_cast<unsigned>((n + kPointwiseThreads - 1) / kPointwiseThreads);
    backward_step_kernel<scalar_t><<<blocks, kPointwiseThreads, 0, stream>>>(a, p);
  }
  return cudaGetLastError();
}

// GRU / RNN: one pointwise kernel per step, instantiated per cell kind (the activation and
// the number of rows are compile-time constants).
inline unsigned pointwise_blocks(int64_t n) {
  return static_cast<unsigned>((n + kPointwiseThreads - 1) / kPointwiseThreads);
}

template <typename scalar_t>
cudaError_t launch_gru_rnn_forward_step(CellKind cell, const GruRnnForwardStepArgs& a, const ZoneoutParams& p,
                                        cudaStream_t stream) {
  if (cell != kGru && cell != kRnnTanh && cell != kRnnRelu) return cudaErrorInvalidValue;
  const int64_t n = p.batch * p.hidden;
  if (n == 0) return cudaSuccess;
  if (a.x_proj == nullptr || a.hp == nullptr || a.h_prev == nullptr || a.y == nullptr || a.gates == nullptr) {
    return cudaErrorInvalidValue;
  }
  const unsigned blocks = pointwise_blocks(n);
  switch (cell) {
    case kGru:
      gru_rnn_forward_step_kernel<scalar_t, kGru><<<blocks, kPointwiseThreads, 0, stream>>>(a, p);
      break;
    case kRnnTanh:
      gru_rnn_forward_step_kernel<scalar_t, kRnnTanh><<<blocks, kPointwiseThreads, 0, stream>>>(a, p);
      break;
    default:
      gru_rnn_forward_step_kernel<scalar_t, kRnnRelu><<<blocks, kPointwiseThreads, 0, stream>>>(a, p);
      break;
  }
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_gru_rnn_backward_step(CellKind cell, const GruRnnBackwardStepArgs& a, const ZoneoutParams& p,
                                         cudaStream_t stream) {
  if (cell != kGru && cell != kRnnTanh && cell != kRnnRelu) return cudaErrorInvalidValue;
  const int64_t n = p.batch * p.hidden;
  if (n == 0) return cudaSuccess;
  if (a.grad_y == nullptr || a.gates == nullptr || a.dh_direct == nullptr || a.d_x == nullptr ||
      (cell == kGru && (a.d_h == nullptr || a.h_prev == nullptr))) {
    return cudaErrorInvalidValue;
  }
  const unsigned blocks = pointwise_blocks(n);
  switch (cell) {
    case kGru:
      gru_rnn_backward_step_kernel<scalar_t, kGru><<<blocks, kPointwiseThreads, 0, stream>>>(a, p);
      break;
    case kRnnTanh:
      gru_rnn_backward_step_kernel<scalar_t, kRnnTanh><<<blocks, kPointwiseThreads, 0, stream>>>(a, p);
      break;
    default:
      gru_rnn_backward_step_kernel<scalar_t, kRnnRelu><<<blocks, kPointwiseThreads, 0, stream>>>(a, p);
      break;
  }
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace cuda
}  // namespace zoneout
