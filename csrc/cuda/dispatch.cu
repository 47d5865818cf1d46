// The public launch helpers of zoneout_cuda.h: a switch from the runtime dtype to the
// launcher instantiated in kernels_float.cu / kernels_half.cu.
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

extern template cudaError_t launch_forward_step<float>(Recurrence, const ForwardStepArgs&, const ZoneoutParams&,
                                                       cudaStream_t);
extern template cudaError_t launch_forward_step<double>(Recurrence, const ForwardStepArgs&, const ZoneoutParams&,
                                                        cudaStream_t);
extern template cudaError_t launch_forward_step<__half>(Recurrence, const ForwardStepArgs&, const ZoneoutParams&,
                                                        cudaStream_t);
extern template cudaError_t launch_forward_step<__nv_bfloat16>(Recurrence, const ForwardStepArgs&,
                                                               const ZoneoutParams&, cudaStream_t);
extern template cudaError_t launch_backward_step<float>(Recurrence, const BackwardStepArgs&, const ZoneoutParams&,
                                                        cudaStream_t);
extern template cudaError_t launch_backward_step<double>(Recurrence, const BackwardStepArgs&, const ZoneoutParams&,
                                                         cudaStream_t);
extern template cudaError_t launch_backward_step<__half>(Recurrence, const BackwardStepArgs&, const ZoneoutParams&,
                                                         cudaStream_t);
extern template cudaError_t launch_backward_step<__nv_bfloat16>(Recurrence, const BackwardStepArgs&,
                                                                const ZoneoutParams&, cudaStream_t);

}  // namespace detail

cudaError_t forward_step(ScalarType dtype, Recurrence recurrence, const ForwardStepArgs& args,
                         const ZoneoutParams& params, cudaStream_t stream) {
  switch (dtype) {
    case ScalarType::kFloat32:
      return detail::launch_forward_step<float>(recurrence, args, params, stream);
    case ScalarType::kFloat64:
      return detail::launch_forward_step<double>(recurrence, args, params, stream);
    case ScalarType::kFloat16:
      return detail::launch_forward_step<__half>(recurrence, args, params, stream);
    case ScalarType::kBFloat16:
      return detail::launch_forward_step<__nv_bfloat16>(recurrence, args, params, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t backward_step(ScalarType dtype, Recurrence recurrence, const BackwardStepArgs& args,
                          const ZoneoutParams& params, cudaStream_t stream) {
  switch (dtype) {
    case ScalarType::kFloat32:
      return detail::launch_backward_step<float>(recurrence, args, params, stream);
    case ScalarType::kFloat64:
      return detail::launch_backward_step<double>(recurrence, args, params, stream);
    case ScalarType::kFloat16:
      return detail::launch_backward_step<__half>(recurrence, args, params, stream);
    case ScalarType::kBFloat16:
      return detail::launch_backward_step<__nv_bfloat16>(recurrence, args, params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace zoneout
