// ops.cpp: the torch binding of the CPU backend, zoneout_fused::cpu_layer_{forward,backward}
// (LSTM) and zoneout_fused::cpu_gru_rnn_layer_{forward,backward} (GRU, RNN).
//
// Schemas are the ones in zoneout_fused/ops.py's docstring; the autograd formula is the C++
// kernel of layer_autograd.h, the fake kernels are attached from Python
// (ops.register_layer_op_pair). The namespace is shared with the CUDA extension, hence
// TORCH_LIBRARY_FRAGMENT.
#include <optional>
#include <string>
#include <vector>

#include <torch/extension.h>
#include <torch/library.h>

#include "cell_step.h"
#include "cpu/gemm.h"
#include "cpu/lstm_cpu.h"
#include "layer_autograd.h"
#include "zoneout_lstm.h"

namespace {

using at::Tensor;

// Every floating tensor argument: defined, on the CPU, x's dtype, the expected shape.
void check_tensor(const Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.defined(), name, " must be a tensor");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the cpu backend, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, " (that of x), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

void check_probability(double value, const char* name, bool one_allowed) {
  TORCH_CHECK(value >= 0.0 && (one_allowed ? value <= 1.0 : value < 1.0), name, " must be in [0, 1",
              one_allowed ? "]" : ")", ", got ", value);
}

struct LayerArgs {
  Tensor x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths;  // contiguous; c0, biases, lengths may be undefined
  zoneout::ZoneoutParams params;
};

// Validates the arguments every layer op shares (forward and backward, LSTM, GRU and RNN);
// returns contiguous copies. The LSTM passes c0 and its summed bias as b_ih; the GRU and RNN
// pass no c0 and both biases. Weights have G*H rows: G = 4 (LSTM), 3 (GRU), 1 (RNN).
LayerArgs check_layer_args(int64_t cell, const Tensor& x, const Tensor& h0, const Tensor* c0, const Tensor& w_ih,
                           const Tensor& w_hh, const std::optional<Tensor>& b_ih, const char* b_ih_name,
                           const std::optional<Tensor>* b_hh, const std::optional<Tensor>& lengths,
                           const Tensor& seed, int64_t layer, int64_t direction, double zoneout_cell,
                           double zoneout_hidden, double recurrent_dropout, int64_t mask_mode, bool training) {
  TORCH_CHECK(x.defined() && x.dim() == 3, "x must be a [T, B, I] tensor, got ", x.defined() ? x.dim() : 0,
              " dimensions");
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the cpu backend, got device ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "x must be float32 or float64 for the cpu backend, got ",
              dtype);
  const int64_t steps = x.size(0), batch = x.size(1), input = x.size(2);
  TORCH_CHECK(steps >= 1, "x must have at least one time step, got T = ", steps);
  const int64_t gates = zoneout::cell_rows(static_cast<int>(cell));
  TORCH_CHECK(w_hh.defined() && w_hh.dim() == 2 && w_hh.size(1) >= 1 && w_hh.size(0) == gates * w_hh.size(1),
              "w_hh must be a [", gates, "H, H] tensor with H >= 1, got shape ",
              w_hh.defined() ? w_hh.sizes() : at::IntArrayRef{});
  const int64_t hidden = w_hh.size(1);
  check_tensor(w_hh, "w_hh", dtype, {gates * hidden, hidden});
  check_tensor(w_ih, "w_ih", dtype, {gates * hidden, input});
  check_tensor(h0, "h0", dtype, {batch, hidden});
  LayerArgs args;
  if (c0 != nullptr) {
    check_tensor(*c0, "c0", dtype, {batch, hidden});
    args.c0 = c0->contiguous();
  }
  if (b_ih.has_value() && b_ih->defined()) {
    check_tensor(*b_ih, b_ih_name, dtype, {gates * hidden});
    args.b_ih = b_ih->contiguous();
  }
  if (b_hh != nullptr && b_hh->has_value() && (*b_hh)->defined()) {
    check_tensor(**b_hh, "b_hh", dtype, {gates * hidden});
    args.b_hh = (*b_hh)->contiguous();
  }
  if (lengths.has_value() && lengths->defined()) {
    const Tensor& len = *lengths;
    TORCH_CHECK(len.device().is_cpu(), "lengths must be on x's device (cpu), got ", len.device());
    TORCH_CHECK(len.scalar_type() == at::kLong, "lengths must be an int64 tensor, got ", len.scalar_type());
    TORCH_CHECK(len.dim() == 1 && len.size(0) == batch, "lengths must have shape [B] = [", batch, "], got ",
                len.sizes());
    args.lengths = len.contiguous();
    if (batch > 0) {
      const int64_t lo = args.lengths.min().item<int64_t>(), hi = args.lengths.max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi <= steps, "lengths must be in [0, T] = [0, ", steps, "], got values in [", lo, ", ",
                  hi, "]");
    }
  }
  TORCH_CHECK(seed.defined() && seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "seed must be a 0-dim (one-element) int64 CPU tensor");
  const int64_t seed_value = seed.item<int64_t>();
  TORCH_CHECK(seed_value >= 0, "seed must be non-negative, got ", seed_value);
  TORCH_CHECK(layer >= 0 && layer < (1 << 30), "layer must be in [0, 2^30), got ", layer);
  TORCH_CHECK(direction == 0 || direction == 1, "direction must be 0 (forward) or 1 (reverse), got ", direction);
  TORCH_CHECK(mask_mode >= zoneout::kIndependent && mask_mode <= zoneout::kStatic,
              "mask_mode must be 0 (independent), 1 (shared), 2 (timestep) or 3 (static), got ", mask_mode);
  check_probability(zoneout_cell, "zoneout_cell", true);
  check_probability(zoneout_hidden, "zoneout_hidden", true);
  check_probability(recurrent_dropout, "recurrent_dropout", false);

  args.x = x.contiguous();
  args.h0 = h0.contiguous();
  args.w_ih = w_ih.contiguous();
  args.w_hh = w_hh.contiguous();
  args.params = zoneout::make_params(static_cast<uint64_t>(seed_value), layer, direction, mask_mode, zoneout_cell,
                                     zoneout_hidden, recurrent_dropout, training, batch, hidden);
  return args;
}

LayerArgs check_lstm_args(const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                          const std::optional<Tensor>& bias, const std::optional<Tensor>& lengths, const Tensor& seed,
                          int64_t layer, int64_t direction, double zoneout_cell, double zoneout_hidden,
                          double recurrent_dropout, int64_t mask_mode, bool training) {
  return check_layer_args(zoneout::kLstm, x, h0, &c0, w_ih, w_hh, bias, "bias", nullptr, lengths, seed, layer,
                          direction, zoneout_cell, zoneout_hidden, recurrent_dropout, mask_mode, training);
}

// The GRU / RNN ops: the cell code, and the rules of contract sec. 4 (mask_mode "shared" ties a
// cell mask they do not have; the RNN has no gated update for recurrent dropout to drop).
LayerArgs check_gru_rnn_args(const Tensor& x, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh,
                             const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
                             const std::optional<Tensor>& lengths, const Tensor& seed, int64_t cell, int64_t layer,
                             int64_t direction, double zoneout_hidden, double recurrent_dropout, int64_t mask_mode,
                             bool training) {
  TORCH_CHECK(cell == zoneout::kGru || cell == zoneout::kRnnTanh || cell == zoneout::kRnnRelu,
              "cell must be 1 (gru), 2 (rnn_tanh) or 3 (rnn_relu), got ", cell);
  TORCH_CHECK(mask_mode != zoneout::kShared, "mask_mode 'shared' (1) ties the cell mask to the hidden mask: the GRU "
              "and RNN have no cell state; use 'independent', 'timestep' or 'static'");
  TORCH_CHECK(cell == zoneout::kGru || recurrent_dropout == 0.0,
              "recurrent_dropout must be 0 for the plain RNN (it has no gated update to drop), got ",
              recurrent_dropout);
  return check_layer_args(cell, x, h0, nullptr, w_ih, w_hh, b_ih, "b_ih", &b_hh, lengths, seed, layer, direction,
                          0.0, zoneout_hidden, recurrent_dropout, mask_mode, training);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cpu_layer_forward(
    const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& lengths, const Tensor& seed, int64_t layer,
    int64_t direction, double zoneout_cell, double zoneout_hidden, double recurrent_dropout, int64_t mask_mode,
    bool training) {
  const LayerArgs a = check_lstm_args(x, h0, c0, w_ih, w_hh, bias, lengths, seed, layer, direction, zoneout_cell,
                                      zoneout_hidden, recurrent_dropout, mask_mode, training);
  return zoneout_cpu::layer_forward(a.x, a.h0, a.c0, a.w_ih, a.w_hh, a.b_ih, a.lengths, a.params);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cpu_layer_backward(
    const Tensor& grad_y, const Tensor& grad_c_n, const Tensor& x, const Tensor& h0, const Tensor& c0,
    const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& bias, const std::optional<Tensor>& lengths,
    const Tensor& seed, int64_t layer, int64_t direction, double zoneout_cell, double zoneout_hidden,
    double recurrent_dropout, int64_t mask_mode, bool training, const Tensor& y, const Tensor& c_seq,
    const Tensor& gates) {
  const LayerArgs a = check_lstm_args(x, h0, c0, w_ih, w_hh, bias, lengths, seed, layer, direction, zoneout_cell,
                                      zoneout_hidden, recurrent_dropout, mask_mode, training);
  const int64_t steps = x.size(0), batch = x.size(1), hidden = a.params.hidden;
  const auto dtype = x.scalar_type();
  check_tensor(grad_y, "grad_y", dtype, {steps, batch, hidden});
  check_tensor(grad_c_n, "grad_c_n", dtype, {batch, hidden});
  check_tensor(y, "y", dtype, {steps, batch, hidden});
  check_tensor(c_seq, "c_seq", dtype, {steps, batch, hidden});
  check_tensor(gates, "gates", dtype, {steps, batch, 4 * hidden});
  return zoneout_cpu::layer_backward(grad_y.contiguous(), grad_c_n.contiguous(), a.x, a.h0, a.c0, a.w_ih, a.w_hh,
                                     a.lengths, y.contiguous(), c_seq.contiguous(), gates.contiguous(), a.params);
}

std::tuple<Tensor, Tensor> cpu_gru_rnn_layer_forward(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                                     const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                                     const std::optional<Tensor>& b_hh,
                                                     const std::optional<Tensor>& lengths, const Tensor& seed,
                                                     int64_t cell, int64_t layer, int64_t direction,
                                                     double zoneout_hidden, double recurrent_dropout,
                                                     int64_t mask_mode, bool training) {
  const LayerArgs a = check_gru_rnn_args(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, seed, cell, layer, direction,
                                         zoneout_hidden, recurrent_dropout, mask_mode, training);
  return zoneout_cpu::gru_rnn_layer_forward(a.x, a.h0, a.w_ih, a.w_hh, a.b_ih, a.b_hh, a.lengths, cell, a.params);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cpu_gru_rnn_layer_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, const std::optional<Tensor>& lengths,
    const Tensor& seed, int64_t cell, int64_t layer, int64_t direction, double zoneout_hidden,
    double recurrent_dropout, int64_t mask_mode, bool training, const Tensor& y, const Tensor& gates) {
  const LayerArgs a = check_gru_rnn_args(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, seed, cell, layer, direction,
                                         zoneout_hidden, recurrent_dropout, mask_mode, training);
  const int64_t steps = x.size(0), batch = x.size(1), hidden = a.params.hidden;
  const auto dtype = x.scalar_type();
  check_tensor(grad_y, "grad_y", dtype, {steps, batch, hidden});
  check_tensor(y, "y", dtype, {steps, batch, hidden});
  check_tensor(gates, "gates", dtype, {steps, batch, zoneout::cell_saved(static_cast<int>(cell)) * hidden});
  return zoneout_cpu::gru_rnn_layer_backward(grad_y.contiguous(), a.x, a.h0, a.w_ih, a.w_hh, a.lengths,
                                             y.contiguous(), gates.contiguous(), cell, a.params);
}

// Test hook (tests/test_cpu.py): f(x) elementwise by the CPU element kernels' vector math of
// instruction set isa (1 AVX2, 2 AVX-512), f: 0 exp, 1 tanh, 2 sigmoid; an empty tensor where
// that instruction set has none here. x: float32, numel a multiple of 16.
Tensor cpu_vector_math(const Tensor& x, int64_t function, int64_t isa) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32");
  TORCH_CHECK(x.numel() % 16 == 0, "x.numel() must be a multiple of 16");
  TORCH_CHECK(function >= 0 && function <= 2, "function must be 0 (exp), 1 (tanh) or 2 (sigmoid)");
  const Tensor input = x.contiguous();
  Tensor out = at::empty_like(input);
  if (!zoneout_cpu::vector_math_test_hook(input.data_ptr<float>(), out.data_ptr<float>(), input.numel(), function,
                                          isa)) {
    return at::empty({0}, x.options());
  }
  return out;
}

// Test hook (tests/test_cpu.py): float32 [n], 1 where the CPU mask rows of instruction set isa (0
// scalar, 1 AVX2, 2 AVX-512) keep a unit of probability z whose Philox word is words[k] (int64
// holding uint32 values), else 0; an empty tensor where that instruction set has none here.
Tensor cpu_keep_by_word(const Tensor& words, double z, int64_t isa) {
  TORCH_CHECK(words.scalar_type() == at::kLong && words.dim() == 1, "words must be a 1-D int64 tensor");
  TORCH_CHECK(words.numel() % 16 == 0, "words.numel() must be a multiple of 16");
  const Tensor values = words.contiguous();
  const int64_t n = values.numel();
  std::vector<uint32_t> w(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) {
    const int64_t v = values.data_ptr<int64_t>()[k];
    TORCH_CHECK(v >= 0 && v <= 0xFFFFFFFFll, "words must hold uint32 values, got ", v);
    w[k] = static_cast<uint32_t>(v);
  }
  Tensor out = at::empty({n}, values.options().dtype(at::kFloat));
  if (!zoneout_cpu::keep_by_word_test_hook(w.data(), out.data_ptr<float>(), n, z, isa)) {
    return at::empty({0}, out.options());
  }
  return out;
}

// Test hook (tests/test_cpu.py): int64 [2, 3, n] holding uint32 words r0, r1, r2 of Philox
// counters (first + k, c2, c3): [0] from the CPU kernels' draw path of instruction set isa
// (-1 the active one, 0 scalar, 1 AVX2, 2 AVX-512; an empty tensor if unavailable here), [1]
// from zoneout::philox4x32_10 element by element. seed and first are reinterpreted as uint64.
Tensor philox_words_cpu(int64_t seed, int64_t first, int64_t c2, int64_t c3, int64_t n, int64_t isa) {
  TORCH_CHECK(n >= 0, "n must be >= 0");
  std::vector<uint32_t> w(static_cast<size_t>(6 * n));
  const uint64_t s = static_cast<uint64_t>(seed), f = static_cast<uint64_t>(first);
  if (!zoneout_cpu::philox_words_test_hook(s, f, static_cast<uint32_t>(c2), static_cast<uint32_t>(c3), n, w.data(),
                                           w.data() + n, w.data() + 2 * n, isa)) {
    return at::empty({0}, at::kLong);
  }
  for (int64_t k = 0; k < n; ++k) {
    const uint64_t c = f + static_cast<uint64_t>(k);
    const zoneout::Philox4 r = zoneout::philox4x32_10(s, static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32),
                                                      static_cast<uint32_t>(c2), static_cast<uint32_t>(c3));
    w[3 * n + k] = r.r0;
    w[4 * n + k] = r.r1;
    w[5 * n + k] = r.r2;
  }
  Tensor out = at::empty({2, 3, n}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (size_t i = 0; i < w.size(); ++i) o[i] = static_cast<int64_t>(w[i]);
  return out;
}

}  // namespace

// Importing zoneout_fused._C runs the registrations below; the module itself takes the Python
// function behind create_graph=True (layer_autograd.h) and has the cell modules' step (cell_step.h).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("_set_differentiable_backward", &zoneout_autograd::set_differentiable_backward);
  m.def("_cell_step", &zoneout_cell_step::cell_step);
}

TORCH_LIBRARY_FRAGMENT(zoneout_fused, m) {
  m.def(
      "cpu_layer_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? bias, "
      "Tensor? lengths, Tensor seed, int layer, int direction, float zoneout_cell, float zoneout_hidden, "
      "float recurrent_dropout, int mask_mode, bool training) -> (Tensor y, Tensor c_n, Tensor c_seq, Tensor gates)");
  m.def(
      "cpu_layer_backward(Tensor grad_y, Tensor grad_c_n, Tensor x, Tensor h0, Tensor c0, Tensor w_ih, "
      "Tensor w_hh, Tensor? bias, Tensor? lengths, Tensor seed, int layer, int direction, float zoneout_cell, "
      "float zoneout_hidden, float recurrent_dropout, int mask_mode, bool training, Tensor y, Tensor c_seq, "
      "Tensor gates) -> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_bias)");
  m.def(
      "cpu_gru_rnn_layer_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? lengths, Tensor seed, int cell, int layer, int direction, float zoneout_hidden, "
      "float recurrent_dropout, int mask_mode, bool training) -> (Tensor y, Tensor gates)");
  m.def(
      "cpu_gru_rnn_layer_backward(Tensor grad_y, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? lengths, Tensor seed, int cell, int layer, int direction, float zoneout_hidden, "
      "float recurrent_dropout, int mask_mode, bool training, Tensor y, Tensor gates) -> (Tensor grad_x, "
      "Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh)");
  m.def("_philox_words_cpu(int seed, int first, int c2, int c3, int n, int isa=-1) -> Tensor");
  m.def("_cpu_vector_math(Tensor x, int function, int isa) -> Tensor");
  m.def("_cpu_keep_by_word(Tensor words, float z, int isa) -> Tensor");
  // The CPU kernels' instruction set (zoneout_fused.cpu_isa wraps these).
  m.def("_cpu_isa_supported(int isa) -> bool");
  m.def("_cpu_isa() -> int");
  m.def("_set_cpu_isa(int isa) -> int");
  // The engine of the CPU kernels' matrix products (0 aten, 1 onednn; csrc/cpu/gemm.h).
  m.def("_cpu_gemm_supported(int engine) -> bool");
  m.def("_cpu_gemm() -> int");
  m.def("_set_cpu_gemm(int engine) -> int");
  // The CPU kernels' time loop (zoneout_fused.cpu_isa wraps these).
  m.def("_cpu_loop() -> int");
  m.def("_set_cpu_loop(int loop) -> int");
  m.def("_cpu_split() -> int");
  m.def("_set_cpu_split(int split) -> int");
  m.def("_cpu_panels() -> int");
  m.def("_set_cpu_panels(int panels) -> int");
  m.def("_cpu_input() -> int");
  m.def("_set_cpu_input(int input) -> int");
  m.def("_cpu_order() -> int");
  m.def("_set_cpu_order(int order) -> int");
  // Test hook: the bytes of freed forward outputs kept for reuse.
  m.def("_cpu_pooled_bytes() -> int");
  m.def("_cpu_empty_cache() -> ()");
}

TORCH_LIBRARY_IMPL(zoneout_fused, CPU, m) {
  m.impl("cpu_layer_forward", &cpu_layer_forward);
  m.impl("cpu_layer_backward", &cpu_layer_backward);
  m.impl("cpu_gru_rnn_layer_forward", &cpu_gru_rnn_layer_forward);
  m.impl("cpu_gru_rnn_layer_backward", &cpu_gru_rnn_layer_backward);
  m.impl("_cpu_vector_math", &cpu_vector_math);
  m.impl("_cpu_keep_by_word", &cpu_keep_by_word);
}

TORCH_LIBRARY_IMPL(zoneout_fused, AutogradCPU, m) {
  m.impl("cpu_layer_forward", torch::CppFunction::makeFromBoxedFunction<&zoneout_autograd::layer_forward_autograd>());
  m.impl("cpu_gru_rnn_layer_forward",
         torch::CppFunction::makeFromBoxedFunction<&zoneout_autograd::layer_forward_autograd>());
}

// No tensor arguments: registered for every dispatch key.
TORCH_LIBRARY_IMPL(zoneout_fused, CompositeExplicitAutograd, m) {
  m.impl("_philox_words_cpu", &philox_words_cpu);
  m.impl("_cpu_isa_supported", &zoneout_cpu::cpu_isa_supported);
  m.impl("_cpu_isa", &zoneout_cpu::cpu_isa);
  m.impl("_set_cpu_isa", &zoneout_cpu::set_cpu_isa);
  m.impl("_cpu_gemm_supported", &zoneout_cpu::cpu_gemm_supported);
  m.impl("_cpu_gemm", &zoneout_cpu::cpu_gemm);
  m.impl("_set_cpu_gemm", &zoneout_cpu::set_cpu_gemm);
  m.impl("_cpu_loop", &zoneout_cpu::cpu_loop);
  m.impl("_set_cpu_loop", &zoneout_cpu::set_cpu_loop);
  m.impl("_cpu_split", &zoneout_cpu::cpu_split);
  m.impl("_set_cpu_split", &zoneout_cpu::set_cpu_split);
  m.impl("_cpu_panels", &zoneout_cpu::cpu_panels);
  m.impl("_set_cpu_panels", &zoneout_cpu::set_cpu_panels);
  m.impl("_cpu_input", &zoneout_cpu::cpu_input);
  m.impl("_set_cpu_input", &zoneout_cpu::set_cpu_input);
  m.impl("_cpu_order", &zoneout_cpu::cpu_order);
  m.impl("_set_cpu_order", &zoneout_cpu::set_cpu_order);
  m.impl("_cpu_pooled_bytes", &zoneout_cpu::pooled_bytes);
  m.impl("_cpu_empty_cache", &zoneout_cpu::empty_cache);
}
