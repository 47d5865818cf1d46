// Step kernels for float32 and float64 (one translation unit per dtype family: parallel builds).
#include "cuda/zoneout_launch.cuh"

namespace zoneout {
namespace cuda {
namespace detail {

using P = ZoneoutParams;
template cudaError_t launch_forward_step<float>(Recurrence, const ForwardStepArgs&, const P&, cudaStream_t);
template cudaError_t launch_forward_step<double>(Recurrence, const ForwardStepArgs&, const P&, cudaStream_t);
template cudaError_t launch_backward_step<float>(Recurrence, const BackwardStepArgs&, const P&, cudaStream_t);
template cudaError_t launch_backward_step<double>(Recurrence, const BackwardStepArgs&, const P&, cudaStream_t);
using GF = GruRnnForwardStepArgs;
using GB = GruRnnBackwardStepArgs;
template cudaError_t launch_gru_rnn_forward_step<float>(CellKind, const GF&, const P&, cudaStream_t);
template cudaError_t launch_gru_rnn_forward_step<double>(CellKind, const GF&, const P&, cudaStream_t);
template cudaError_t launch_gru_rnn_backward_step<float>(CellKind, const GB&, const P&, cudaStream_t);
template cudaError_t launch_gru_rnn_backward_step<double>(CellKind, const GB&, const P&, cudaStream_t);

}  // namespace detail
}  // namespace cuda
}  // namespace zoneout
