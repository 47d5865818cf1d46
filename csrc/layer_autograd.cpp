// layer_autograd.cpp: see layer_autograd.h.
#include "layer_autograd.h"

#include <algorithm>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <torch/csrc/autograd/custom_function.h>
#include <torch/extension.h>

namespace zoneout_autograd {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
namespace py = pybind11;

constexpr size_t kTensorArguments = 8;  // the 6 differentiable inputs, lengths, seed
constexpr size_t kDifferentiableInputs = 6;

// Which outputs of a forward op carry gradients and which its backward op takes (what
// ops.LayerOpFamily says in Python), read from the two schemas: the backward op takes grad_<name>
// for each differentiable output <name>, then the forward's arguments, then the saved outputs by name.
struct LayerOpFamily {
  std::string forward_name;
  c10::OperatorHandle backward;
  std::vector<size_t> differentiable_outputs, saved_outputs;
};

size_t output_named(const c10::FunctionSchema& schema, const std::string& name) {
  const auto& returns = schema.returns();
  for (size_t k = 0; k < returns.size(); ++k) {
    if (returns[k].name() == name) return k;
  }
  TORCH_CHECK(false, "layer_forward_autograd: ", schema.name(), " has no output named ", name);
}

LayerOpFamily read_family(const c10::OperatorHandle& forward, const std::string& forward_name) {
  const std::string suffix = "_forward";
  TORCH_CHECK(forward_name.size() > suffix.size() &&
                  forward_name.compare(forward_name.size() - suffix.size(), suffix.size(), suffix) == 0,
              "layer_forward_autograd: ", forward_name, " is not a layer forward op");
  const std::string backward_name = forward_name.substr(0, forward_name.size() - suffix.size()) + "_backward";
  LayerOpFamily family{forward_name, c10::Dispatcher::singleton().findSchemaOrThrow(backward_name.c_str(), ""), {},
                       {}};
  const c10::FunctionSchema& schema = forward.schema();
  const auto& backward_arguments = family.backward.schema().arguments();
  size_t k = 0;
  for (; k < backward_arguments.size() && backward_arguments[k].name().rfind("grad_", 0) == 0; ++k) {
    family.differentiable_outputs.push_back(output_named(schema, backward_arguments[k].name().substr(5)));
  }
  for (k += schema.arguments().size(); k < backward_arguments.size(); ++k) {
    family.saved_outputs.push_back(output_named(schema, backward_arguments[k].name()));
  }
  return family;
}

// The family of a forward op, read on its first call (`forward` given) and found by name after.
const LayerOpFamily& family_of(const std::string& forward_name, const c10::OperatorHandle* forward = nullptr) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<LayerOpFamily>> known;  // (pointers: references stay valid)
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& family : known) {
    if (family->forward_name == forward_name) return *family;
  }
  TORCH_CHECK(forward != nullptr, "layer_forward_autograd: ", forward_name, " has not run forward");
  known.push_back(std::make_unique<LayerOpFamily>(read_family(*forward, forward_name)));
  return *known.back();
}

py::object* differentiable_backward = nullptr;  // never freed: it must not outlive the interpreter

py::object to_python(const c10::IValue& scalar) {
  if (scalar.isBool()) return py::bool_(scalar.toBool());
  if (scalar.isInt()) return py::int_(scalar.toInt());
  TORCH_CHECK(scalar.isDouble(), "layer_forward_autograd: unexpected scalar argument ", scalar.tagKind());
  return py::float_(scalar.toDouble());
}

py::object to_python(const Tensor& tensor) { return tensor.defined() ? py::cast(tensor) : py::none(); }

// The input gradients as differentiable functions (backward with create_graph=True): Python's
// ops.differentiable_layer_backward through the callable set at import.
variable_list differentiable_gradients(AutogradContext* ctx, const std::string& forward_name,
                                       const variable_list& grad_outputs, const variable_list& inputs,
                                       const std::vector<c10::IValue>& scalars) {
  py::gil_scoped_acquire gil;
  TORCH_CHECK(differentiable_backward != nullptr,
              "create_graph=True through a zoneout layer op needs zoneout_fused.ops imported");
  py::list grads, tensors, python_scalars, needs_grad;
  for (const Tensor& grad : grad_outputs) grads.append(py::cast(grad));
  size_t edge = 0;  // needs_input_grad counts the tensors given, absent optional ones left out
  for (size_t i = 0; i < kDifferentiableInputs; ++i) {
    tensors.append(to_python(inputs[i]));
    needs_grad.append(py::bool_(inputs[i].defined() && ctx->needs_input_grad(edge)));
    edge += inputs[i].defined();
  }
  for (const c10::IValue& scalar : scalars) python_scalars.append(to_python(scalar));
  const py::object result = (*differentiable_backward)(forward_name, grads, tensors, to_python(inputs[6]),
                                                       to_python(inputs[7]), py::tuple(python_scalars), needs_grad);
  variable_list gradients;
  for (const py::handle gradient : result) {
    gradients.push_back(gradient.is_none() ? Tensor() : gradient.cast<Tensor>());
  }
  TORCH_CHECK(gradients.size() == kDifferentiableInputs, "differentiable backward returned ", gradients.size(),
              " gradients, expected 6");
  return gradients;
}

}  // namespace

// (Named outside the anonymous namespace: its name is that of the autograd nodes it records,
// which grad_fn shows.)
struct LayerOp : public torch::autograd::Function<LayerOp> {
  // The 8 tensor arguments come one by one: torch::autograd::Function finds the inputs to
  // differentiate among its arguments, and an absent optional one (bias, lengths) is no input.
  static variable_list forward(AutogradContext* ctx, const c10::OperatorHandle* op, const std::optional<Tensor>& x,
                               const std::optional<Tensor>& t1, const std::optional<Tensor>& t2,
                               const std::optional<Tensor>& t3, const std::optional<Tensor>& t4,
                               const std::optional<Tensor>& t5, const std::optional<Tensor>& lengths,
                               const std::optional<Tensor>& seed, const std::vector<c10::IValue>& scalars) {
    const LayerOpFamily& family = family_of(op->schema().name(), op);
    const std::optional<Tensor>* tensors[kTensorArguments] = {&x, &t1, &t2, &t3, &t4, &t5, &lengths, &seed};
    torch::jit::Stack stack;
    stack.reserve(kTensorArguments + scalars.size());
    for (const auto* tensor : tensors) stack.emplace_back(*tensor);
    stack.insert(stack.end(), scalars.begin(), scalars.end());
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      op->callBoxed(&stack);
    }
    variable_list outputs;
    for (c10::IValue& output : stack) outputs.push_back(std::move(output).toTensor());

    variable_list saved, not_differentiable;
    std::vector<c10::IValue> output_shapes;
    for (const auto* tensor : tensors) saved.push_back(tensor->value_or(Tensor()));
    for (size_t k : family.saved_outputs) saved.push_back(outputs[k]);
    for (size_t k : family.differentiable_outputs) output_shapes.emplace_back(outputs[k].sizes());
    for (size_t k = 0; k < outputs.size(); ++k) {
      const auto& differentiable = family.differentiable_outputs;
      if (std::find(differentiable.begin(), differentiable.end(), k) == differentiable.end()) {
        not_differentiable.push_back(outputs[k]);
      }
    }
    ctx->mark_non_differentiable(not_differentiable);
    ctx->set_materialize_grads(false);  // no zero tensors for outputs nobody differentiates: backward makes them
    ctx->save_for_backward(saved);
    ctx->saved_data["forward_name"] = family.forward_name;
    ctx->saved_data["scalars"] = c10::ivalue::Tuple::create(scalars);
    ctx->saved_data["output_shapes"] = c10::ivalue::Tuple::create(std::move(output_shapes));
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const LayerOpFamily& family = family_of(ctx->saved_data["forward_name"].toStringRef());
    const variable_list saved = ctx->get_saved_variables();
    const auto& scalars = ctx->saved_data["scalars"].toTupleRef().elements();
    const auto& output_shapes = ctx->saved_data["output_shapes"].toTupleRef().elements();
    const Tensor& x = saved[0];

    variable_list grads;  // of the differentiable outputs, zero where none came
    for (size_t j = 0; j < family.differentiable_outputs.size(); ++j) {
      const Tensor& grad = grad_outputs[family.differentiable_outputs[j]];
      grads.push_back(grad.defined() ? grad.contiguous() : at::zeros(output_shapes[j].toDimVector(), x.options()));
    }
    const variable_list inputs(saved.begin(), saved.begin() + kTensorArguments);
    variable_list input_grads;
    if (torch::autograd::GradMode::is_enabled()) {
      input_grads = differentiable_gradients(ctx, family.forward_name, grads,
                                             inputs, std::vector<c10::IValue>(scalars.begin(), scalars.end()));
    } else {
      torch::jit::Stack stack(grads.begin(), grads.end());
      for (const Tensor& input : inputs) stack.push_back(input.defined() ? c10::IValue(input) : c10::IValue());
      stack.insert(stack.end(), scalars.begin(), scalars.end());
      stack.insert(stack.end(), saved.begin() + kTensorArguments, saved.end());
      family.backward.callBoxed(&stack);
      for (size_t i = 0; i < kDifferentiableInputs; ++i) input_grads.push_back(std::move(stack[i]).toTensor());
    }
    // One entry per forward argument: op, the 8 tensors, the scalars; none for an absent input.
    variable_list result(2 + kTensorArguments);
    for (size_t i = 0; i < kDifferentiableInputs; ++i) {
      if (inputs[i].defined()) result[1 + i] = input_grads[i];
    }
    return result;
  }
};

void layer_forward_autograd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t arguments = op.schema().arguments().size();
  const auto args = torch::jit::last(*stack, arguments);
  bool record = false;
  if (torch::autograd::GradMode::is_enabled()) {
    for (size_t i = 0; i < kDifferentiableInputs; ++i) {
      record = record || (args[i].isTensor() && args[i].toTensor().requires_grad());
    }
  }
  if (!record) {  // nothing to differentiate (no_grad, inference, frozen inputs): the op alone
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.callBoxed(stack);
    return;
  }
  std::optional<Tensor> tensors[kTensorArguments];
  for (size_t i = 0; i < kTensorArguments; ++i) {
    if (!args[i].isNone()) tensors[i] = args[i].toTensor();
  }
  const std::vector<c10::IValue> scalars(args.begin() + kTensorArguments, args.end());
  torch::jit::drop(*stack, arguments);
  const variable_list outputs = LayerOp::apply(&op, tensors[0], tensors[1], tensors[2], tensors[3], tensors[4],
                                                     tensors[5], tensors[6], tensors[7], scalars);
  for (const Tensor& output : outputs) stack->emplace_back(output);
}

void set_differentiable_backward(py::object fn) {
  if (differentiable_backward == nullptr) {
    differentiable_backward = new py::object(std::move(fn));
  } else {
    *differentiable_backward = std::move(fn);
  }
}

}  // namespace zoneout_autograd
