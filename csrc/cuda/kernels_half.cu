// Step kernels for float16 and bfloat16 (float32 arithmetic and float32 cell state).
#include "cuda/zoneout_launch.cuh"

namespace zoneout {
namespace cuda {
namespace detail {

using P = ZoneoutParams;
template cudaError_t launch_forward_step<__half>(Recurrence, const ForwardStepArgs&, const P&, cudaStream_t);
template cudaError_t launch_forward_step<__nv_bfloat16>(Recurrence, const ForwardStepArgs&, const P&, cudaStream_t);
template cudaError_t launch_backward_step<__half>(Recurrence, const BackwardStepArgs&, const P&, cudaStream_t);
template cudaError_t launch_backward_step<__nv_bfloat16>(Recurrence, const BackwardStepArgs&, const P&, cudaStream_t);

}  // namespace detail
}  // namespace cuda
}  // namespace zoneout
