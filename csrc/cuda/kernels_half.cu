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
using GF = GruRnnForwardStepArgs;
using GB = GruRnnBackwardStepArgs;
template cudaError_t launch_gru_rnn_forward_step<__half>(CellKind, const GF&, const P&, cudaStream_t);
template cudaError_t launch_gru_rnn_forward_step<__nv_bfloat16>(CellKind, const GF&, const P&, cudaStream_t);
template cudaError_t launch_gru_rnn_backward_step<__half>(CellKind, const GB&, const P&, cudaStream_t);
template cudaError_t launch_gru_rnn_backward_step<__nv_bfloat16>(CellKind, const GB&, const P&, cudaStream_t);

}  // namespace detail
}  // namespace cuda
}  // namespace zoneout
