// cuda_ops.cpp: the torch binding of the CUDA backend, zoneout_fused::cuda_layer_{forward,backward}
// (LSTM) and zoneout_fused::cuda_gru_rnn_layer_{forward,backward} (GRU, plain RNN).
//
// Argument checks, allocation, the time loop and the large matrix products live here; the
// per-step kernels (csrc/cuda/*.cu) see raw pointers only. Everything runs on torch's
// current stream, with no host synchronization: `seed` is read with item() when it is on the
// CPU and by the kernels when it is on x's device; `lengths` stays on the GPU and the kernels
// test step_active per element.
//
// Per step (B examples, H units): the forward reads x_t W_ih^T from one [T*B, I] x [I, 4H]
// GEMM done before the loop and adds h_{t-1} W_hh^T either from a cuBLAS GEMM (two launches
// per step) or inside the step kernel (Recurrence::kFused, one launch per step, H <= 256).
// The backward mirrors it; dW_hh, dW_ih, dx and dbias are single large products afterwards.
//
// ZONEOUT_FUSED_CUDA_RECURRENCE = auto (default) | fused | cublas picks the recurrent product
// ("fused" falls back to cuBLAS where the shape does not fit). "auto" takes the fused kernel
// for small problems, where launch and GEMM host overhead dominate (pMNIST: T=784, B=H=100).
// The threshold is a guess that no GPU measurement has confirmed yet.
//
// Launch overhead beyond kFused (nothing here is measured yet: no session has had a GPU): at
// T=784 even one launch per step costs ~3-5 us x 784 per direction.
// (1) CUDA graphs: zoneout_fused/graphs.py captures each call of this op whole (cuBLAS included)
//     from Python, into static buffers, and replays it; the seed goes in as a device buffer
//     (below). Off by default until a GPU run shows it correct and faster.
// (2) Persistent kernel (not implemented): one cooperative launch per sequence, W_hh resident in shared memory
//     across SMs (H=100: 160 KB float32), a grid-wide barrier per step instead of a launch
//     (~1 us); needs cudaLaunchCooperativeKernel and an occupancy check, with this per-step
//     path as the fallback.
// What works today: the op never synchronizes with the host or creates streams, so a caller
// can capture a whole training step in torch.cuda.graph (or torch.compile(mode="reduce-overhead")).
// Seed: a CPU seed is read on the host at capture time, so every replay reuses the captured
// masks. A seed on x's device is read by the kernels (ZoneoutParams::seed_in_memory), so a
// capture taken with it draws fresh masks whenever the buffer's value changes (the modules
// draw it on the device under capture).

#include <cstdint>
#include <cstdlib>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "cuda/zoneout_cuda.h"
#include "zoneout_lstm.h"

namespace {

namespace zc = zoneout::cuda;
using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

at::ScalarType state_dtype(at::ScalarType dtype) {
  return (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
}

zc::ScalarType kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return zc::ScalarType::kFloat32;
    case at::kDouble:
      return zc::ScalarType::kFloat64;
    case at::kHalf:
      return zc::ScalarType::kFloat16;
    case at::kBFloat16:
      return zc::ScalarType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "zoneout_fused cuda: unsupported dtype ", dtype);
  }
  return zc::ScalarType::kFloat32;  // unreachable
}

void check_launch(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "zoneout_fused cuda: ", what, " kernel launch failed: ", cudaGetErrorString(error));
}

zc::Recurrence choose_recurrence(int64_t batch, int64_t hidden) {
  const char* env = std::getenv("ZONEOUT_FUSED_CUDA_RECURRENCE");
  const std::string mode = env != nullptr ? env : "auto";
  TORCH_CHECK_VALUE(mode == "auto" || mode == "fused" || mode == "cublas",
                    "ZONEOUT_FUSED_CUDA_RECURRENCE must be auto, fused or cublas, got '", mode, "'");
  const bool fits = hidden <= zc::kFusedMaxHidden && batch <= zc::kFusedMaxBatch;
  if (mode == "cublas" || !fits) return zc::Recurrence::kCublas;
  if (mode == "fused") return zc::Recurrence::kFused;
  // auto: up to 2^26 multiply-adds per step on CUDA cores (pMNIST: 4M).
  return batch * 4 * hidden * hidden <= (int64_t{1} << 26) ? zc::Recurrence::kFused : zc::Recurrence::kCublas;
}

// Pointer to slice t of a contiguous [T, ...] tensor, each slice `slice_numel` elements.
void* slice_ptr(const Tensor& tensor, int64_t t, int64_t slice_numel) {
  return static_cast<char*>(tensor.data_ptr()) + t * slice_numel * static_cast<int64_t>(tensor.element_size());
}

struct LayerShape {
  int64_t steps, batch, input, hidden;
};

void check_same(const Tensor& tensor, const char* name, const Tensor& x) {
  TORCH_CHECK(tensor.device() == x.device(), "zoneout_fused cuda: ", name, " must be on ", x.device(),
              " like x, got ", tensor.device());
  TORCH_CHECK_TYPE(tensor.scalar_type() == x.scalar_type(), "zoneout_fused cuda: ", name, " must have x's dtype ",
                   x.scalar_type(), ", got ", tensor.scalar_type());
}

void check_shape(const Tensor& tensor, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(tensor.sizes() == expected, "zoneout_fused cuda: ", name, " must have shape ", expected, ", got ",
              tensor.sizes());
}

// ---- Argument checks shared by the LSTM's and the GRU/RNN's layer ops -----------------
void check_input(const Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "zoneout_fused cuda: x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 3, "zoneout_fused cuda: x must be [T, B, I], got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "zoneout_fused cuda: x must be float32, float64, float16 or bfloat16, got ", dtype);
}

// w_hh [rows*H, H] gives H; then w_ih [rows*H, I] and h0 [B, H]. rows_name spells rows*H
// in the messages ("4H", "3H", "H").
LayerShape check_weights_and_h0(const Tensor& x, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh,
                                int64_t rows, const char* rows_name) {
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == rows * w_hh.size(1), "zoneout_fused cuda: w_hh must be [",
              rows_name, ", H], got shape ", w_hh.sizes());
  LayerShape s{x.size(0), x.size(1), x.size(2), w_hh.size(1)};
  check_same(w_hh, "w_hh", x);
  check_same(w_ih, "w_ih", x);
  check_shape(w_ih, "w_ih", {rows * s.hidden, s.input});
  check_same(h0, "h0", x);
  check_shape(h0, "h0", {s.batch, s.hidden});
  return s;
}

void check_bias(const OptionalTensor& bias, const char* name, const Tensor& x, int64_t numel) {
  if (bias.has_value()) {
    check_same(*bias, name, x);
    check_shape(*bias, name, {numel});
  }
}

// The Philox key as make_params and the kernels take it: a CPU seed's value (read only in
// training mode), or a pointer to a seed on x's device, which only the kernels read.
struct SeedArg {
  uint64_t value = 0;
  const int64_t* in_memory = nullptr;
};

SeedArg check_seed(const Tensor& seed, const Tensor& x, bool training) {
  TORCH_CHECK(seed.device().is_cpu() || seed.device() == x.device(), "zoneout_fused cuda: seed must be on the CPU "
              "or on x's device ", x.device(), ", got device ", seed.device());
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, "zoneout_fused cuda: seed must be int64, got ",
                   seed.scalar_type());
  TORCH_CHECK(seed.numel() == 1, "zoneout_fused cuda: seed must hold one value, got shape ", seed.sizes());
  SeedArg arg;
  if (seed.device().is_cpu()) {
    arg.value = training ? static_cast<uint64_t>(seed.item<int64_t>()) : 0;  // CPU: no device sync
  } else {
    arg.in_memory = seed.data_ptr<int64_t>();  // never read here: a graph replay sees its current value
  }
  return arg;
}

// lengths, seed, the integer arguments and zoneout_hidden / recurrent_dropout; returns the
// mask parameters (the LSTM checks zoneout_cell itself, the GRU/RNN passes 0).
zoneout::ZoneoutParams check_common_args(const Tensor& x, const LayerShape& s, const OptionalTensor& lengths,
                                         const Tensor& seed, int64_t layer, int64_t direction, double zoneout_cell,
                                         double zoneout_hidden, double recurrent_dropout, int64_t mask_mode,
                                         bool training) {
  if (lengths.has_value()) {
    TORCH_CHECK_TYPE(lengths->scalar_type() == at::kLong, "zoneout_fused cuda: lengths must be int64, got ",
                     lengths->scalar_type());
    TORCH_CHECK(lengths->device() == x.device(), "zoneout_fused cuda: lengths must be on ", x.device(),
                " like x, got ", lengths->device());
    check_shape(*lengths, "lengths", {s.batch});
  }
  const SeedArg seed_arg = check_seed(seed, x, training);
  TORCH_CHECK_VALUE(layer >= 0, "zoneout_fused cuda: layer must be >= 0, got ", layer);
  TORCH_CHECK_VALUE(direction == 0 || direction == 1, "zoneout_fused cuda: direction must be 0 or 1, got ",
                    direction);
  TORCH_CHECK_VALUE(mask_mode >= zoneout::kIndependent && mask_mode <= zoneout::kStatic,
                    "zoneout_fused cuda: mask_mode must be 0..3 (independent, shared, timestep, static), got ",
                    mask_mode);
  TORCH_CHECK_VALUE(zoneout_hidden >= 0.0 && zoneout_hidden <= 1.0,
                    "zoneout_fused cuda: zoneout_hidden must be in [0, 1], got ", zoneout_hidden);
  TORCH_CHECK_VALUE(recurrent_dropout >= 0.0 && recurrent_dropout < 1.0,
                    "zoneout_fused cuda: recurrent_dropout must be in [0, 1), got ", recurrent_dropout);
  zoneout::ZoneoutParams p = zoneout::make_params(seed_arg.value, layer, direction, mask_mode, zoneout_cell,
                                                  zoneout_hidden, recurrent_dropout, training, s.batch, s.hidden);
  p.seed_in_memory = seed_arg.in_memory;
  return p;
}

// The tensors a backward op gets back from its forward (y and the saved state-dtype tensors).
void check_saved(const Tensor& tensor, const char* name, const Tensor& x, at::IntArrayRef shape) {
  const auto state = state_dtype(x.scalar_type());
  TORCH_CHECK(tensor.device() == x.device(), "zoneout_fused cuda: ", name, " must be on ", x.device(), ", got ",
              tensor.device());
  TORCH_CHECK_TYPE(tensor.scalar_type() == state, "zoneout_fused cuda: ", name, " must be ", state, ", got ",
                   tensor.scalar_type());
  check_shape(tensor, name, shape);
}

// a b with the result in the state dtype: for float16/bfloat16 cuBLAS accumulates in float32
// and writes float32 (no rounding of the product to 16 bits); a plain mm otherwise.
Tensor mm_state(const Tensor& a, const Tensor& b) {
  const auto state = state_dtype(a.scalar_type());
  return state == a.scalar_type() ? at::mm(a, b) : at::mm(a, b, state);
}

void mm_state_out(Tensor& out, const Tensor& a, const Tensor& b) {
  if (out.scalar_type() == a.scalar_type()) {
    at::mm_out(out, a, b);
  } else {
    at::mm_out(out, a, b, out.scalar_type());
  }
}

// Validates the LSTM layer-op arguments (shared by forward and backward) and returns the
// mask parameters; a CPU seed is read only in training mode.
std::pair<LayerShape, zoneout::ZoneoutParams> check_layer_args(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const OptionalTensor& bias, const OptionalTensor& lengths, const Tensor& seed, int64_t layer, int64_t direction,
    double zoneout_cell, double zoneout_hidden, double recurrent_dropout, int64_t mask_mode, bool training) {
  check_input(x);
  const LayerShape s = check_weights_and_h0(x, h0, w_ih, w_hh, 4, "4H");
  check_same(c0, "c0", x);
  check_shape(c0, "c0", {s.batch, s.hidden});
  check_bias(bias, "bias", x, 4 * s.hidden);
  TORCH_CHECK_VALUE(zoneout_cell >= 0.0 && zoneout_cell <= 1.0,
                    "zoneout_fused cuda: zoneout_cell must be in [0, 1], got ", zoneout_cell);
  const zoneout::ZoneoutParams p = check_common_args(x, s, lengths, seed, layer, direction, zoneout_cell,
                                                     zoneout_hidden, recurrent_dropout, mask_mode, training);
  return {s, p};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cuda_layer_forward(
    const Tensor& x_in, const Tensor& h0_in, const Tensor& c0_in, const Tensor& w_ih_in, const Tensor& w_hh_in,
    const OptionalTensor& bias_in, const OptionalTensor& lengths_in, const Tensor& seed, int64_t layer,
    int64_t direction, double zoneout_cell, double zoneout_hidden, double recurrent_dropout, int64_t mask_mode,
    bool training) {
  const auto [s, params] = check_layer_args(x_in, h0_in, c0_in, w_ih_in, w_hh_in, bias_in, lengths_in, seed, layer,
                                            direction, zoneout_cell, zoneout_hidden, recurrent_dropout, mask_mode,
                                            training);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const Tensor x = x_in.contiguous(), h0 = h0_in.contiguous(), w_ih = w_ih_in.contiguous();
  const Tensor w_hh = w_hh_in.contiguous();
  const Tensor bias = bias_in.has_value() ? bias_in->contiguous() : Tensor();
  const Tensor lengths = lengths_in.has_value() ? lengths_in->contiguous() : Tensor();
  const auto state = state_dtype(x.scalar_type());
  const int64_t T = s.steps, B = s.batch, H = s.hidden;

  Tensor y = at::empty({T, B, H}, x.options());
  Tensor c_n = at::empty({B, H}, x.options());
  Tensor c_seq = at::empty({T, B, H}, x.options().dtype(state));
  Tensor gates = at::empty({T, B, 4 * H}, x.options().dtype(state));
  if (T == 0) {
    c_n.copy_(c0_in);
    return {y, c_n, c_seq, gates};
  }
  // x_t W_ih^T for every step in one GEMM, in the state dtype (float32 for 16-bit inputs: no
  // rounding of the products); the bias is added in the kernel in float32.
  const Tensor x_proj = mm_state(x.view({T * B, s.input}), w_ih.t()).view({T, B, 4 * H});
  const Tensor c0 = c0_in.to(state).contiguous();  // the kernels read c_{t-1} in the state dtype
  const zc::Recurrence recurrence = choose_recurrence(B, H);
  const bool fused = recurrence == zc::Recurrence::kFused;
  const Tensor w_hh_t = fused ? w_hh.t().contiguous() : Tensor();  // [H, 4H]: coalesced reads
  Tensor hh = fused ? Tensor() : at::empty({B, 4 * H}, x.options().dtype(state));
  const zc::ScalarType kdtype = kernel_dtype(x.scalar_type());

  zc::ForwardStepArgs a;
  a.bias = bias.defined() ? bias.data_ptr() : nullptr;
  a.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  a.w_hh_t = fused ? w_hh_t.data_ptr() : nullptr;
  a.hh = fused ? nullptr : hh.data_ptr();
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = direction == 0 ? step : T - 1 - step;  // position in the input
    const int64_t t_prev = direction == 0 ? t - 1 : t + 1;   // valid when step > 0
    if (!fused) {
      mm_state_out(hh, step == 0 ? h0 : y.select(0, t_prev), w_hh.t());
    }
    a.t = t;
    a.x_proj = slice_ptr(x_proj, t, B * 4 * H);
    a.h_prev = step == 0 ? h0.data_ptr() : slice_ptr(y, t_prev, B * H);
    a.c_prev = step == 0 ? c0.data_ptr() : slice_ptr(c_seq, t_prev, B * H);
    a.y = slice_ptr(y, t, B * H);
    a.c = slice_ptr(c_seq, t, B * H);
    a.gates = slice_ptr(gates, t, B * 4 * H);
    a.c_n = step == T - 1 ? c_n.data_ptr() : nullptr;
    check_launch(zc::forward_step(kdtype, recurrence, a, params, stream), "forward step");
  }
  return {y, c_n, c_seq, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cuda_layer_backward(
    const Tensor& grad_y_in, const Tensor& grad_c_n_in, const Tensor& x_in, const Tensor& h0_in, const Tensor& c0_in,
    const Tensor& w_ih_in, const Tensor& w_hh_in, const OptionalTensor& bias_in, const OptionalTensor& lengths_in,
    const Tensor& seed, int64_t layer, int64_t direction, double zoneout_cell, double zoneout_hidden,
    double recurrent_dropout, int64_t mask_mode, bool training, const Tensor& y_in, const Tensor& c_seq_in,
    const Tensor& gates_in) {
  const auto [s, params] = check_layer_args(x_in, h0_in, c0_in, w_ih_in, w_hh_in, bias_in, lengths_in, seed, layer,
                                            direction, zoneout_cell, zoneout_hidden, recurrent_dropout, mask_mode,
                                            training);
  const int64_t T = s.steps, B = s.batch, I = s.input, H = s.hidden;
  const auto state = state_dtype(x_in.scalar_type());
  check_same(grad_y_in, "grad_y", x_in);
  check_shape(grad_y_in, "grad_y", {T, B, H});
  check_same(grad_c_n_in, "grad_c_n", x_in);
  check_shape(grad_c_n_in, "grad_c_n", {B, H});
  check_same(y_in, "y", x_in);
  check_shape(y_in, "y", {T, B, H});
  check_saved(c_seq_in, "c_seq", x_in, {T, B, H});
  check_saved(gates_in, "gates", x_in, {T, B, 4 * H});

  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const Tensor grad_y = grad_y_in.contiguous(), x = x_in.contiguous(), h0 = h0_in.contiguous();
  const Tensor w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous(), y = y_in.contiguous();
  const Tensor c_seq = c_seq_in.contiguous(), gates = gates_in.contiguous();
  const Tensor lengths = lengths_in.has_value() ? lengths_in->contiguous() : Tensor();

  if (T == 0) {
    return {at::empty_like(x), at::zeros_like(h0_in), grad_c_n_in.clone(), at::zeros_like(w_ih_in),
            at::zeros_like(w_hh_in), at::zeros({4 * H}, w_hh_in.options())};
  }
  // d_pre and the recurrent gradient in the state dtype: float16's range would flush small
  // pre-activation gradients to zero (the Triton backend keeps them in float32 too).
  Tensor d_pre = at::empty({T, B, 4 * H}, x.options().dtype(state));
  Tensor dh_direct = at::zeros({B, H}, x.options().dtype(state));
  Tensor dc = at::empty({B, H}, x.options().dtype(state));
  dc.copy_(grad_c_n_in);
  const Tensor c0 = c0_in.to(state).contiguous();
  const zc::Recurrence recurrence = choose_recurrence(B, H);
  const bool fused = recurrence == zc::Recurrence::kFused;
  Tensor dh_rec = fused ? Tensor() : at::empty({B, H}, x.options().dtype(state));
  const Tensor w_hh_state = w_hh.to(state);  // (a float32 copy for 16-bit inputs)
  const zc::ScalarType kdtype = kernel_dtype(x.scalar_type());

  zc::BackwardStepArgs a;
  a.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  a.w_hh = w_hh.data_ptr();
  a.dh_direct = dh_direct.data_ptr();
  a.dc = dc.data_ptr();
  // Backward processes the steps in the reverse of the forward order.
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = direction == 0 ? T - 1 - step : step;
    const int64_t t_next = direction == 0 ? t + 1 : t - 1;  // processed just before; valid when step > 0
    const int64_t t_prev = direction == 0 ? t - 1 : t + 1;  // forward predecessor (c_{t-1})
    const bool first_forward_step = direction == 0 ? t == 0 : t == T - 1;
    if (!fused && step > 0) {
      at::mm_out(dh_rec, d_pre.select(0, t_next), w_hh_state);
    }
    a.t = t;
    a.grad_y = slice_ptr(grad_y, t, B * H);
    a.dh_rec = (!fused && step > 0) ? dh_rec.data_ptr() : nullptr;
    a.d_pre_next = (fused && step > 0) ? slice_ptr(d_pre, t_next, B * 4 * H) : nullptr;
    a.gates = slice_ptr(gates, t, B * 4 * H);
    a.c_prev = first_forward_step ? c0.data_ptr() : slice_ptr(c_seq, t_prev, B * H);
    a.d_pre = slice_ptr(d_pre, t, B * 4 * H);
    check_launch(zc::backward_step(kdtype, recurrence, a, params, stream), "backward step");
  }
  const int64_t t_first = direction == 0 ? 0 : T - 1;  // first forward step: h_{t-1} = h0
  const Tensor d_first = d_pre.select(0, t_first);
  const auto dtype = x.scalar_type();
  const Tensor grad_h0 = (dh_direct + at::mm(d_first, w_hh_state)).to(dtype);
  const Tensor grad_c0 = dc.to(dtype);

  // Weight and input gradients: single large products over all T*B rows, in the state dtype
  // (float32 copies of x, y, h0 and W_ih for 16-bit inputs), rounded to x's dtype at the end.
  const Tensor d_flat = d_pre.view({T * B, 4 * H});
  const Tensor grad_x = at::mm(d_flat, w_ih.to(state)).view({T, B, I}).to(dtype);
  const Tensor grad_w_ih = at::mm(d_flat.t(), x.view({T * B, I}).to(state)).to(dtype);
  // grad_w_hh = sum_t d_pre[t]^T h_{t-1}: h0 for the first forward step, y of its predecessor otherwise.
  Tensor grad_w_hh = at::mm(d_first.t(), h0.to(state));
  if (T > 1) {
    const Tensor d_rest = direction == 0 ? d_pre.narrow(0, 1, T - 1) : d_pre.narrow(0, 0, T - 1);
    const Tensor h_rest = direction == 0 ? y.narrow(0, 0, T - 1) : y.narrow(0, 1, T - 1);
    grad_w_hh = at::addmm(grad_w_hh, d_rest.reshape({(T - 1) * B, 4 * H}).t(),
                          h_rest.reshape({(T - 1) * B, H}).to(state));
  }
  // Deterministic reduction (no atomics) in the state dtype.
  const Tensor grad_bias = d_flat.sum(0).to(dtype);
  return {grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh.to(dtype), grad_bias};
}

// ---------------------------------------------------------------------------------------
// GRU and plain RNN: zoneout_fused::cuda_gru_rnn_layer_{forward,backward} (schema in
// zoneout_fused/ops.py). One cuBLAS GEMM and one element kernel per step, no fused variant.
// For float16/bfloat16 every product the kernels read (x W_ih^T, h W_hh^T, d_h W_hh) and every
// pre-activation gradient (d_x, d_h) is float32: the GEMMs take 16-bit inputs and write
// float32 (at::mm's out_dtype overload) or run in float32 on float32 copies.
// ---------------------------------------------------------------------------------------
struct GruRnnArgs {
  LayerShape shape;
  zoneout::ZoneoutParams params;
  zoneout::CellKind cell;
  int64_t rows;   // G: W_ih / W_hh rows per unit
  int64_t saved;  // saved gate columns per unit
};

GruRnnArgs check_gru_rnn_args(const Tensor& x, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh,
                              const OptionalTensor& b_ih, const OptionalTensor& b_hh, const OptionalTensor& lengths,
                              const Tensor& seed, int64_t cell, int64_t layer, int64_t direction,
                              double zoneout_hidden, double recurrent_dropout, int64_t mask_mode, bool training) {
  check_input(x);
  TORCH_CHECK_VALUE(cell == zoneout::kGru || cell == zoneout::kRnnTanh || cell == zoneout::kRnnRelu,
                    "zoneout_fused cuda: cell must be 1 (gru), 2 (rnn_tanh) or 3 (rnn_relu), got ", cell);
  const auto kind = static_cast<zoneout::CellKind>(cell);
  const int64_t rows = zoneout::cell_rows(kind);
  const LayerShape s = check_weights_and_h0(x, h0, w_ih, w_hh, rows, kind == zoneout::kGru ? "3H" : "H");
  check_bias(b_ih, "b_ih", x, rows * s.hidden);
  check_bias(b_hh, "b_hh", x, rows * s.hidden);
  TORCH_CHECK_VALUE(kind == zoneout::kGru || recurrent_dropout == 0.0,
                    "zoneout_fused cuda: recurrent_dropout must be 0 for an RNN cell (cell = ", cell,
                    "); recurrent dropout acts on the GRU's candidate only, got ", recurrent_dropout);
  // zoneout_cell = 0: the hidden mask is the LSTM's m_h for the same seed and position.
  const zoneout::ZoneoutParams p = check_common_args(x, s, lengths, seed, layer, direction, 0.0, zoneout_hidden,
                                                     recurrent_dropout, mask_mode, training);
  return {s, p, kind, rows, zoneout::cell_saved(kind)};
}


std::tuple<Tensor, Tensor> cuda_gru_rnn_layer_forward(
    const Tensor& x_in, const Tensor& h0_in, const Tensor& w_ih_in, const Tensor& w_hh_in,
    const OptionalTensor& b_ih_in, const OptionalTensor& b_hh_in, const OptionalTensor& lengths_in,
    const Tensor& seed, int64_t cell, int64_t layer, int64_t direction, double zoneout_hidden,
    double recurrent_dropout, int64_t mask_mode, bool training) {
  const GruRnnArgs args = check_gru_rnn_args(x_in, h0_in, w_ih_in, w_hh_in, b_ih_in, b_hh_in, lengths_in, seed, cell,
                                             layer, direction, zoneout_hidden, recurrent_dropout, mask_mode, training);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const Tensor x = x_in.contiguous(), h0 = h0_in.contiguous(), w_ih = w_ih_in.contiguous();
  const Tensor w_hh = w_hh_in.contiguous();
  const Tensor b_ih = b_ih_in.has_value() ? b_ih_in->contiguous() : Tensor();
  const Tensor b_hh = b_hh_in.has_value() ? b_hh_in->contiguous() : Tensor();
  const Tensor lengths = lengths_in.has_value() ? lengths_in->contiguous() : Tensor();
  const auto state = state_dtype(x.scalar_type());
  const int64_t T = args.shape.steps, B = args.shape.batch, I = args.shape.input, H = args.shape.hidden;
  const int64_t GH = args.rows * H, SH = args.saved * H;

  Tensor y = at::empty({T, B, H}, x.options());
  Tensor gates = at::empty({T, B, SH}, x.options().dtype(state));
  if (T == 0) return {y, gates};
  // x_t W_ih^T for every step in one GEMM (state dtype); the biases are added in the kernel.
  const Tensor x_proj = mm_state(x.view({T * B, I}), w_ih.t()).view({T, B, GH});
  Tensor hp = at::empty({B, GH}, x.options().dtype(state));
  const zc::ScalarType kdtype = kernel_dtype(x.scalar_type());

  zc::GruRnnForwardStepArgs a;
  a.b_ih = b_ih.defined() ? b_ih.data_ptr() : nullptr;
  a.b_hh = b_hh.defined() ? b_hh.data_ptr() : nullptr;
  a.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  a.hp = hp.data_ptr();
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = direction == 0 ? step : T - 1 - step;  // position in the input
    const int64_t t_prev = direction == 0 ? t - 1 : t + 1;   // valid when step > 0
    mm_state_out(hp, step == 0 ? h0 : y.select(0, t_prev), w_hh.t());
    a.t = t;
    a.x_proj = slice_ptr(x_proj, t, B * GH);
    a.h_prev = step == 0 ? h0.data_ptr() : slice_ptr(y, t_prev, B * H);
    a.y = slice_ptr(y, t, B * H);
    a.gates = slice_ptr(gates, t, B * SH);
    check_launch(zc::gru_rnn_forward_step(kdtype, args.cell, a, args.params, stream), "GRU/RNN forward step");
  }
  return {y, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cuda_gru_rnn_layer_backward(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& h0_in, const Tensor& w_ih_in, const Tensor& w_hh_in,
    const OptionalTensor& b_ih_in, const OptionalTensor& b_hh_in, const OptionalTensor& lengths_in,
    const Tensor& seed, int64_t cell, int64_t layer, int64_t direction, double zoneout_hidden,
    double recurrent_dropout, int64_t mask_mode, bool training, const Tensor& y_in, const Tensor& gates_in) {
  const GruRnnArgs args = check_gru_rnn_args(x_in, h0_in, w_ih_in, w_hh_in, b_ih_in, b_hh_in, lengths_in, seed, cell,
                                             layer, direction, zoneout_hidden, recurrent_dropout, mask_mode, training);
  const int64_t T = args.shape.steps, B = args.shape.batch, I = args.shape.input, H = args.shape.hidden;
  const int64_t GH = args.rows * H, SH = args.saved * H;
  const bool gru = args.cell == zoneout::kGru;
  const auto dtype = x_in.scalar_type();
  const auto state = state_dtype(dtype);
  check_same(grad_y_in, "grad_y", x_in);
  check_shape(grad_y_in, "grad_y", {T, B, H});
  check_same(y_in, "y", x_in);
  check_shape(y_in, "y", {T, B, H});
  check_saved(gates_in, "gates", x_in, {T, B, SH});

  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto options = x_in.options();
  if (T == 0) {  // y is empty: nothing reaches the inputs
    return {at::empty({T, B, I}, options), at::zeros({B, H}, options), at::zeros({GH, I}, options),
            at::zeros({GH, H}, options), at::zeros({GH}, options), at::zeros({GH}, options)};
  }
  const Tensor grad_y = grad_y_in.contiguous(), x = x_in.contiguous(), h0 = h0_in.contiguous();
  const Tensor w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous(), y = y_in.contiguous();
  const Tensor gates = gates_in.contiguous();
  const Tensor lengths = lengths_in.has_value() ? lengths_in->contiguous() : Tensor();
  // W_hh in the state dtype (a float32 copy for 16-bit inputs): d_h W_hh stays in float32.
  const Tensor w_hh_state = w_hh.to(state);

  // d_x: gradient of the input parts (GRU d_r, d_u, d_n; RNN d_pre); d_h: of the recurrent
  // parts (GRU d_r, d_u, d_hp_n; the RNN's is d_x itself).
  Tensor d_x = at::empty({T, B, GH}, options.dtype(state));
  Tensor d_h = gru ? at::empty({T, B, GH}, options.dtype(state)) : d_x;
  Tensor dh_direct = at::zeros({B, H}, options.dtype(state));
  Tensor dh_rec = at::empty({B, H}, options.dtype(state));
  const zc::ScalarType kdtype = kernel_dtype(dtype);

  zc::GruRnnBackwardStepArgs a;
  a.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  a.dh_direct = dh_direct.data_ptr();
  // Backward processes the steps in the reverse of the forward order.
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = direction == 0 ? T - 1 - step : step;
    const int64_t t_next = direction == 0 ? t + 1 : t - 1;  // processed just before; valid when step > 0
    const int64_t t_prev = direction == 0 ? t - 1 : t + 1;  // forward predecessor (h_{t-1})
    const bool first_forward_step = direction == 0 ? t == 0 : t == T - 1;
    if (step > 0) {
      at::mm_out(dh_rec, d_h.select(0, t_next), w_hh_state);
    }
    a.t = t;
    a.grad_y = slice_ptr(grad_y, t, B * H);
    a.dh_rec = step > 0 ? dh_rec.data_ptr() : nullptr;
    a.gates = slice_ptr(gates, t, B * SH);
    a.h_prev = first_forward_step ? h0.data_ptr() : slice_ptr(y, t_prev, B * H);
    a.d_x = slice_ptr(d_x, t, B * GH);
    a.d_h = gru ? slice_ptr(d_h, t, B * GH) : nullptr;
    check_launch(zc::gru_rnn_backward_step(kdtype, args.cell, a, args.params, stream), "GRU/RNN backward step");
  }
  const int64_t t_first = direction == 0 ? 0 : T - 1;  // first forward step: h_{t-1} = h0
  const Tensor d_h_first = d_h.select(0, t_first);
  const Tensor grad_h0 = (dh_direct + at::mm(d_h_first, w_hh_state)).to(dtype);

  // Weight and input gradients: single large products over all T*B rows, in the state dtype
  // (float32 copies of x, y, h0 and W_ih for 16-bit inputs), rounded to x's dtype at the end.
  const Tensor d_x_flat = d_x.view({T * B, GH});
  const Tensor d_h_flat = d_h.view({T * B, GH});
  const Tensor grad_x = at::mm(d_x_flat, w_ih.to(state)).view({T, B, I}).to(dtype);
  const Tensor grad_w_ih = at::mm(d_x_flat.t(), x.view({T * B, I}).to(state)).to(dtype);
  // grad_w_hh = sum_t d_h[t]^T h_{t-1}: h0 for the first forward step, y of its predecessor otherwise.
  Tensor grad_w_hh = at::mm(d_h_first.t(), h0.to(state));
  if (T > 1) {
    const Tensor d_rest = direction == 0 ? d_h.narrow(0, 1, T - 1) : d_h.narrow(0, 0, T - 1);
    const Tensor h_rest = direction == 0 ? y.narrow(0, 0, T - 1) : y.narrow(0, 1, T - 1);
    grad_w_hh = at::addmm(grad_w_hh, d_rest.reshape({(T - 1) * B, GH}).t(),
                          h_rest.reshape({(T - 1) * B, H}).to(state));
  }
  // Deterministic reductions (no atomics) in the state dtype.
  const Tensor grad_b_ih = d_x_flat.sum(0).to(dtype);
  const Tensor grad_b_hh = d_h_flat.sum(0).to(dtype);  // a separate tensor even when d_h is d_x
  return {grad_x, grad_h0, grad_w_ih, grad_w_hh.to(dtype), grad_b_ih, grad_b_hh};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zoneout_fused, m) {
  m.def(
      "cuda_layer_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? bias, "
      "Tensor? lengths, Tensor seed, int layer, int direction, float zoneout_cell, float zoneout_hidden, "
      "float recurrent_dropout, int mask_mode, bool training) -> (Tensor y, Tensor c_n, Tensor c_seq, Tensor gates)");
  m.def(
      "cuda_layer_backward(Tensor grad_y, Tensor grad_c_n, Tensor x, Tensor h0, Tensor c0, Tensor w_ih, "
      "Tensor w_hh, Tensor? bias, Tensor? lengths, Tensor seed, int layer, int direction, float zoneout_cell, "
      "float zoneout_hidden, float recurrent_dropout, int mask_mode, bool training, Tensor y, Tensor c_seq, "
      "Tensor gates) -> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_bias)");
  m.def(
      "cuda_gru_rnn_layer_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? lengths, Tensor seed, int cell, int layer, int direction, float zoneout_hidden, "
      "float recurrent_dropout, int mask_mode, bool training) -> (Tensor y, Tensor gates)");
  m.def(
      "cuda_gru_rnn_layer_backward(Tensor grad_y, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? lengths, Tensor seed, int cell, int layer, int direction, float zoneout_hidden, "
      "float recurrent_dropout, int mask_mode, bool training, Tensor y, Tensor gates) -> (Tensor grad_x, "
      "Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh)");
}

TORCH_LIBRARY_IMPL(zoneout_fused, CUDA, m) {
  m.impl("cuda_layer_forward", &cuda_layer_forward);
  m.impl("cuda_layer_backward", &cuda_layer_backward);
  m.impl("cuda_gru_rnn_layer_forward", &cuda_gru_rnn_layer_forward);
  m.impl("cuda_gru_rnn_layer_backward", &cuda_gru_rnn_layer_backward);
}

// The ops register on import; the module itself exports nothing.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { (void)m; }
