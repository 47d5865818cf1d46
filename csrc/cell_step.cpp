// cell_step.cpp: see cell_step.h.
#include "cell_step.h"

#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/extension.h>

#include "zoneout_lstm.h"

namespace zoneout_cell_step {
namespace {

using at::Tensor;
namespace py = pybind11;

using LstmForward = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, const Tensor&, int64_t, int64_t, double, double, double, int64_t, bool);
using GruRnnForward = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                 const std::optional<Tensor>&, const std::optional<Tensor>&,
                                                 const std::optional<Tensor>&, const Tensor&, int64_t, int64_t,
                                                 int64_t, double, double, int64_t, bool);

// A plain tensor (torch.Tensor or nn.Parameter, no subclass that could override its behaviour).
std::optional<Tensor> plain_tensor(py::handle object) {
  if (!THPVariable_CheckExact(object.ptr())) return std::nullopt;
  return THPVariable_Unpack(object.ptr());
}

// A bias: absent (None), or a plain CPU tensor of `dtype` and `rows` entries. False for anything else.
bool read_bias(py::handle object, at::ScalarType dtype, int64_t rows, std::optional<Tensor>* bias) {
  if (object.is_none()) return true;
  *bias = plain_tensor(object);
  return bias->has_value() && (*bias)->device().is_cpu() && (*bias)->scalar_type() == dtype &&
         (*bias)->dim() == 1 && (*bias)->size(0) == rows;
}

// The states in hx, each a plain tensor shaped and typed as the step needs: [B, H] (or [H] for
// an unbatched input), on the CPU, in the input's dtype. Empty for hx=None; nullopt for anything
// the Python path must see (it raises nn.LSTMCell's errors).
std::optional<std::vector<Tensor>> read_states(py::handle hx, size_t count, const Tensor& input, int64_t hidden) {
  std::vector<Tensor> states;
  if (hx.is_none()) return states;
  std::vector<py::handle> objects;
  if (count == 1) {
    objects.push_back(hx);
  } else if (PyTuple_Check(hx.ptr()) || PyList_Check(hx.ptr())) {
    const auto sequence = py::reinterpret_borrow<py::sequence>(hx);
    if (sequence.size() != count) return std::nullopt;
    for (size_t k = 0; k < count; ++k) objects.push_back(sequence[k]);
  } else {
    return std::nullopt;
  }
  for (const py::handle object : objects) {
    std::optional<Tensor> state = plain_tensor(object);
    if (!state || !state->device().is_cpu() || state->scalar_type() != input.scalar_type() ||
        state->dim() != input.dim() || state->size(-1) != hidden ||
        (input.dim() == 2 && state->size(0) != input.size(0))) {
      return std::nullopt;
    }
    states.push_back(std::move(*state));
  }
  return states;
}

// Neither autocast, the JIT tracer, a Python torch-function or dispatch mode: each changes what the
// step's ops mean (and the mode and tracer see the ops the Python path calls), so they get that path.
bool plain_context() {
  return !at::autocast::is_autocast_enabled(at::kCPU) && !torch::jit::tracer::isTracing() &&
         !at::impl::torch_function_mode_enabled() && !c10::impl::dispatch_mode_enabled();
}

// torch.randint(0, 2**63 - 1, ()) on torch's default CPU generator: the same 64-bit word, reduced the
// same way (ATen's random_from_to for ranges of 2**32 and more), so a seed drawn here is the one
// the Python path would draw.
Tensor draw_seed() {
  constexpr uint64_t kRange = (uint64_t{1} << 63) - 1;
  at::Generator generator = at::detail::getDefaultCPUGenerator();
  uint64_t word;
  {
    std::lock_guard<std::mutex> lock(generator.mutex());
    word = at::check_generator<at::CPUGeneratorImpl>(generator)->random64();
  }
  Tensor seed = at::empty({}, at::kLong);
  *seed.data_ptr<int64_t>() = static_cast<int64_t>(word % kRange);
  return seed;
}

// The seed of a step that draws no mask, one tensor for every call (nothing writes to it). Made a
// normal tensor even when the first call runs under torch.inference_mode: autograd saves the seed,
// and an inference tensor cannot be saved. (Never freed: a static Tensor would outlive torch's
// allocator.)
const Tensor& unused_seed() {
  static const Tensor* seed = [] {
    c10::InferenceMode normal_tensors(/*enabled=*/false);
    return new Tensor(at::zeros({}, at::kLong));
  }();
  return *seed;
}

}  // namespace

py::object cell_step(int64_t cell, py::handle input_object, py::handle hx, py::handle w_ih_object,
                     py::handle w_hh_object, py::handle bias_a_object, py::handle bias_b_object, double zoneout_cell,
                     double zoneout_hidden, double recurrent_dropout, int64_t mask_mode, bool training) {
  const std::optional<Tensor> input = plain_tensor(input_object);
  const std::optional<Tensor> w_ih = plain_tensor(w_ih_object), w_hh = plain_tensor(w_hh_object);
  if (!input || !w_ih || !w_hh || !plain_context()) return py::none();
  const at::ScalarType dtype = input->scalar_type();
  if (!input->device().is_cpu() || (dtype != at::kFloat && dtype != at::kDouble) ||
      (input->dim() != 1 && input->dim() != 2)) {
    return py::none();
  }
  // Weights and biases of the shapes the op takes (G*H rows), so that its own checks, whose messages
  // the Python path gives as the op raises them, never fire here.
  for (const Tensor* weight : {&*w_ih, &*w_hh}) {
    if (!weight->device().is_cpu() || weight->scalar_type() != dtype || weight->dim() != 2) return py::none();
  }
  const bool batched = input->dim() == 2;
  const int64_t batch = batched ? input->size(0) : 1, input_size = w_ih->size(1), hidden = w_hh->size(1);
  const int64_t rows = zoneout::cell_rows(static_cast<int>(cell)) * hidden;
  if (input->size(-1) != input_size || w_ih->size(0) != rows || w_hh->size(0) != rows) return py::none();
  std::optional<Tensor> bias_a, bias_b;
  if (!read_bias(bias_a_object, dtype, rows, &bias_a) || !read_bias(bias_b_object, dtype, rows, &bias_b)) {
    return py::none();
  }
  const std::optional<std::vector<Tensor>> states = read_states(hx, cell == zoneout::kLstm ? 2 : 1, *input, hidden);
  if (!states) return py::none();

  Tensor h1, c1;
  {
    py::gil_scoped_release no_gil;  // (as torch's own op calls do; the step may take milliseconds)
    const Tensor x = input->reshape({1, batch, input_size});
    std::vector<Tensor> initial;
    for (const Tensor& state : *states) initial.push_back(batched ? state.contiguous() : state.reshape({1, hidden}));
    if (initial.empty()) initial.assign(cell == zoneout::kLstm ? 2 : 1, at::zeros({batch, hidden}, input->options()));
    const bool stochastic = training && (zoneout_cell > 0 || zoneout_hidden > 0 || recurrent_dropout > 0);
    const Tensor seed = stochastic ? draw_seed() : unused_seed();
    if (cell == zoneout::kLstm) {
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("zoneout_fused::cpu_layer_forward", "")
                                 .typed<LstmForward>();
      Tensor y;
      std::tie(y, c1, std::ignore, std::ignore) =
          op.call(x, initial[0], initial[1], *w_ih, *w_hh, bias_a, std::nullopt, seed, 0, 0, zoneout_cell,
                  zoneout_hidden, recurrent_dropout, mask_mode, training);
      h1 = y.select(0, 0);
    } else {
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("zoneout_fused::cpu_gru_rnn_layer_forward", "")
                                 .typed<GruRnnForward>();
      const Tensor y = std::get<0>(op.call(x, initial[0], *w_ih, *w_hh, bias_a, bias_b, std::nullopt, seed, cell, 0,
                                           0, zoneout_hidden, recurrent_dropout, mask_mode, training));
      h1 = y.select(0, 0);
    }
    if (!batched) {
      h1 = h1.select(0, 0);
      if (c1.defined()) c1 = c1.select(0, 0);
    }
  }
  if (cell == zoneout::kLstm) return py::make_tuple(h1, c1);
  return py::cast(h1);
}

}  // namespace zoneout_cell_step
