// zoneout_cuda.h: launch helpers of the CUDA kernels, callable from a torch binding or any
// other host code. Raw pointers, sizes, zoneout::ZoneoutParams and a stream; no torch type.
// Every helper returns cudaGetLastError() after its launch, so the caller checks each one.
//
// One call = one time step of one layer direction. The caller owns the time loop, the
// large matrix products (x W_ih^T for all steps before the loop; the weight and input
// gradients after it) and all allocation; the kernels only read and write what is listed.
//
// Dtypes: `scalar` is the I/O dtype (x, h, y, weights, biases, grad_y);
// `state` is float32 for float16/bfloat16 and the I/O dtype otherwise (cell states, gates,
// the products x W_ih^T and h W_hh^T, d_pre and the backward carries dh/dc: cuBLAS writes
// its float32 accumulators straight out, so no product is rounded to 16 bits and no
// pre-activation gradient underflows); arithmetic is in float32 (float64 for float64).
//
// Shapes (B = params.batch, H = params.hidden; all contiguous, row-major):
//   [B, H] per-step states, [B, 4H] per-step gates / pre-activations (rows i, f, g, o).
// Aliasing: outputs never alias inputs, except the backward carries dh_direct and dc,
// which are read and written in place (each thread owns its own elements).
// Seed: params.seed, or, when params.seed_in_memory is set, the int64 it points to on the
// device, loaded by each kernel that draws (params.training); a CUDA graph replay then draws
// with whatever value that buffer holds.
//
// Cell kinds (zoneout::CellKind): forward_step / backward_step run the LSTM (kLstm);
// gru_rnn_forward_step / gru_rnn_backward_step run the hidden-state-only cells (kGru,
// kRnnTanh, kRnnRelu) with G = cell_rows(cell) rows per unit (3: r, u, n; 1) and
// cell_saved(cell) saved columns (4: r, u, n, hp_n; 1: h~). Those take every product and
// every pre-activation gradient in the state dtype (float32 for the 16-bit types): the
// caller forms them with float32 outputs (at::mm's out_dtype), so nothing recurrent is
// rounded to float16/bfloat16 but the states y_t themselves.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "zoneout_lstm.h"

namespace zoneout {
namespace cuda {

enum class ScalarType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// The recurrent product h_{t-1} W_hh^T (forward) / d_pre_{t+1} W_hh (backward) is either
//   kCublas: computed by the caller (one cuBLAS GEMM per step) and passed in, or
//   kFused:  computed inside the step kernel from W_hh, a fixed-order dot product per
//            element (deterministic), which halves the launches per step and avoids the
//            GEMM's host overhead. Only for hidden <= kFusedMaxHidden (shared memory).
enum class Recurrence : int { kCublas = 0, kFused = 1 };
constexpr int64_t kFusedMaxHidden = 256;
constexpr int64_t kFusedMaxBatch = 65535 * 4;  // grid.y limit times examples per block

struct ForwardStepArgs {
  int64_t t = 0;                   // position in the input (the mask counter's t)
  const void* x_proj = nullptr;    // [B, 4H] state: x_t W_ih^T, bias not added
  const void* hh = nullptr;        // [B, 4H] state: h_{t-1} W_hh^T (kCublas only)
  const void* w_hh_t = nullptr;    // [H, 4H] scalar: W_hh transposed (kFused only)
  const void* bias = nullptr;      // [4H] scalar, or nullptr: b_ih + b_hh
  const int64_t* lengths = nullptr;  // [B] on the device, or nullptr (all steps active)
  const void* h_prev = nullptr;    // [B, H] scalar: h_{t-1} (h0 or the previous y slice)
  const void* c_prev = nullptr;    // [B, H] state: c_{t-1}
  void* y = nullptr;               // [B, H] scalar out: zoned h_t (h_{t-1} if inactive)
  void* c = nullptr;               // [B, H] state out: zoned c_t (c_{t-1} if inactive)
  void* gates = nullptr;           // [B, 4H] state out: i, f, g, o (zero if inactive)
  void* c_n = nullptr;             // [B, H] scalar out, or nullptr: c_t again (last step)
};

struct BackwardStepArgs {
  int64_t t = 0;                     // position in the input
  const void* grad_y = nullptr;      // [B, H] scalar: gradient of the loss w.r.t. y_t
  const void* dh_rec = nullptr;      // [B, H] state, or nullptr: d_pre_next W_hh (kCublas)
  const void* d_pre_next = nullptr;  // [B, 4H] state, or nullptr: the previously processed
                                     // step's d_pre (kFused; nullptr at the first one)
  const void* w_hh = nullptr;        // [4H, H] scalar (kFused only)
  const int64_t* lengths = nullptr;  // [B] on the device, or nullptr
  const void* gates = nullptr;       // [B, 4H] state: saved activations of step t
  const void* c_prev = nullptr;      // [B, H] state: c_{t-1}
  void* dh_direct = nullptr;         // [B, H] state in/out: m_h * dh reaching h_{t-1}
                                     // directly (zero before the first processed step)
  void* dc = nullptr;                // [B, H] state in/out: gradient reaching c_t, then c_{t-1}
  void* d_pre = nullptr;             // [B, 4H] state out: gradient of the pre-activations
};

// One forward step: gates, masks (regenerated from params), zoneout mixing.
cudaError_t forward_step(ScalarType dtype, Recurrence recurrence, const ForwardStepArgs& args,
                         const ZoneoutParams& params, cudaStream_t stream);

// One backward step: the total dh is grad_y + dh_direct + (d_pre_next W_hh); masks are
// regenerated; inactive steps pass dh (into dh_direct) and dc through and write d_pre = 0.
cudaError_t backward_step(ScalarType dtype, Recurrence recurrence, const BackwardStepArgs& args,
                          const ZoneoutParams& params, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// GRU and plain RNN (kGru, kRnnTanh, kRnnRelu): the recurrent product always comes from the
// caller (one GEMM per step, Recurrence::kCublas); there is no fused variant yet.
// Masks: params built with zoneout_cell = 0 (the hidden mask is the LSTM's m_h), and
// recurrent_dropout = 0 for the RNN cells.
// ---------------------------------------------------------------------------------------
struct GruRnnForwardStepArgs {
  int64_t t = 0;                     // position in the input (the mask counter's t)
  const void* x_proj = nullptr;      // [B, G*H] state: x_t W_ih^T, b_ih not added
  const void* hp = nullptr;          // [B, G*H] state: h_{t-1} W_hh^T, b_hh not added
  const void* b_ih = nullptr;        // [G*H] scalar, or nullptr
  const void* b_hh = nullptr;        // [G*H] scalar, or nullptr (the GRU's b_hn stays inside
                                     // the reset product, as in torch.nn.GRU)
  const int64_t* lengths = nullptr;  // [B] on the device, or nullptr (all steps active)
  const void* h_prev = nullptr;      // [B, H] scalar: h_{t-1} (h0 or the previous y slice)
  void* y = nullptr;                 // [B, H] scalar out: zoned h_t (h_{t-1} if inactive)
  void* gates = nullptr;             // [B, S*H] state out: GRU (r, u, n, hp_n), RNN h~;
                                     // zero if inactive
};

struct GruRnnBackwardStepArgs {
  int64_t t = 0;                     // position in the input
  const void* grad_y = nullptr;      // [B, H] scalar: gradient of the loss w.r.t. y_t
  const void* dh_rec = nullptr;      // [B, H] state, or nullptr: d_h_next W_hh, the gradient
                                     // reaching h_t through the next processed step's hp
  const int64_t* lengths = nullptr;  // [B] on the device, or nullptr
  const void* gates = nullptr;       // [B, S*H] state: saved values of step t
  const void* h_prev = nullptr;      // [B, H] scalar: h_{t-1} (read by the GRU only)
  void* dh_direct = nullptr;         // [B, H] state in/out: gradient reaching h_{t-1} other
                                     // than through W_hh (zero before the first processed step)
  void* d_x = nullptr;               // [B, G*H] state out: gradient of the input part
                                     // (GRU d_r, d_u, d_n; RNN d_pre); zero if inactive
  void* d_h = nullptr;               // [B, 3H] state out, GRU only (nullptr for the RNN, whose
                                     // recurrent gradient is d_x): d_r, d_u, d_hp_n
};

// One forward step of a GRU / RNN layer direction; cudaErrorInvalidValue for another cell.
cudaError_t gru_rnn_forward_step(ScalarType dtype, CellKind cell, const GruRnnForwardStepArgs& args,
                                 const ZoneoutParams& params, cudaStream_t stream);

// One backward step: the total dh is grad_y + dh_rec + dh_direct; masks are regenerated;
// inactive steps pass dh into dh_direct and write zero gradients.
cudaError_t gru_rnn_backward_step(ScalarType dtype, CellKind cell, const GruRnnBackwardStepArgs& args,
                                  const ZoneoutParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace zoneout
