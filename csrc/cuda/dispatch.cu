// The public launch helpers of zoneout_cuda.h: a switch from the runtime dtype to the
// launcher instantiated in kernels_float.cu / kernels_half.cu (one switch, dispatch_dtype,
// shared by the LSTM's and the GRU/RNN's helpers).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/zoneout_cuda.h"

namespace zoneout {
namespace cuda {
namespace detail {

template <typename scalar_t>
cudaError_t launch_forward_step(Recurrence, const ForwardStepArgs&, const ZoneoutParams&, cudaStream_t);
template <typename scalar_t>
cudaError_t launch_backward_step(Recurrence, const BackwardStepArgs&, const ZoneoutParams&, cudaStream_t);
template <typename scalar_t>
cudaError_t launch_gru_rnn_forward_step(CellKind, const GruRnnForwardStepArgs&, const ZoneoutParams&, cudaStream_t);
template <typename scalar_t>
cudaError_t launch_gru_rnn_backward_step(CellKind, const GruRnnBackwardStepArgs&, const ZoneoutParams&,
                                         cudaStream_t);

// Instantiated in kernels_float.cu (float, double) and kernels_half.cu (__half, __nv_bfloat16).
#define ZF_EXTERN_LAUNCHERS(T)                                                                                   \
  extern template cudaError_t launch_forward_step<T>(Recurrence, const ForwardStepArgs&, const ZoneoutParams&,  \
                                                     cudaStream_t);                                             \
  extern template cudaError_t launch_backward_step<T>(Recurrence, const BackwardStepArgs&, const ZoneoutParams&, \
                                                      cudaStream_t);                                            \
  extern template cudaError_t launch_gru_rnn_forward_step<T>(CellKind, const GruRnnForwardStepArgs&,            \
                                                             const ZoneoutParams&, cudaStream_t);               \
  extern template cudaError_t launch_gru_rnn_backward_step<T>(CellKind, const GruRnnBackwardStepArgs&,          \
                                                              const ZoneoutParams&, cudaStream_t);
ZF_EXTERN_LAUNCHERS(float)
ZF_EXTERN_LAUNCHERS(double)
ZF_EXTERN_LAUNCHERS(__half)
ZF_EXTERN_LAUNCHERS(__nv_bfloat16)
#undef ZF_EXTERN_LAUNCHERS

template <typename T>
struct DtypeTag {
  using type = T;
};

// Calls launch(DtypeTag<scalar_t>{}) for the runtime dtype.
template <typename Launch>
cudaError_t dispatch_dtype(ScalarType dtype, Launch&& launch) {
  switch (dtype) {
    case ScalarType::kFloat32:
      return launch(DtypeTag<float>{});
    case ScalarType::kFloat64:
      return launch(DtypeTag<double>{});
    case ScalarType::kFloat16:
      return launch(DtypeTag<__half>{});
    case ScalarType::kBFloat16:
      return launch(DtypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace detail

cudaError_t forward_step(ScalarType dtype, Recurrence recurrence, const ForwardStepArgs& args,
                         const ZoneoutParams& params, cudaStream_t stream) {
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    return detail::launch_forward_step<typename decltype(tag)::type>(recurrence, args, params, stream);
  });
}

cudaError_t backward_step(ScalarType dtype, Recurrence recurrence, const BackwardStepArgs& args,
                          const ZoneoutParams& params, cudaStream_t stream) {
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    return detail::launch_backward_step<typename decltype(tag)::type>(recurrence, args, params, stream);
  });
}

cudaError_t gru_rnn_forward_step(ScalarType dtype, CellKind cell, const GruRnnForwardStepArgs& args,
                                 const ZoneoutParams& params, cudaStream_t stream) {
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    return detail::launch_gru_rnn_forward_step<typename decltype(tag)::type>(cell, args, params, stream);
  });
}

cudaError_t gru_rnn_backward_step(ScalarType dtype, CellKind cell, const GruRnnBackwardStepArgs& args,
                                  const ZoneoutParams& params, cudaStream_t stream) {
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    return detail::launch_gru_rnn_backward_step<typename decltype(tag)::type>(cell, args, params, stream);
  });
}

}  // namespace cuda
}  // namespace zoneout
