// layer_autograd.h: the autograd formula of a layer op pair (zoneout_fused/ops.py's docstring), in
// C++, registered as the op's Autograd kernel.
//
// Python's torch.library.register_autograd puts a Python autograd Function around every call: about
// 10 us, more than a decoder's whole cell step at small sizes. This kernel records the same node in
// C++. One boxed kernel serves both op families (the LSTM's layer ops and the GRU/RNN's), which
// share their argument layout: 8 tensor arguments (6 differentiable ones, then lengths and seed),
// then scalars; which outputs carry gradients and which are saved is read from the forward and
// backward ops' schemas. The backward calls the backward op; with create_graph=True it calls the Python
// function set by set_differentiable_backward (ops.differentiable_layer_backward: the reference,
// differentiated), as the fused backward ops are not differentiable.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <pybind11/pybind11.h>

namespace zoneout_autograd {

// The Autograd kernel of `{name}_layer_forward` and `{name}_gru_rnn_layer_forward`
// (torch::CppFunction::makeFromBoxedFunction<&layer_forward_autograd>()).
void layer_forward_autograd(const c10::OperatorHandle& op, torch::jit::Stack* stack);

// The Python callable behind create_graph=True:
//   fn(forward_op_name, grad_outputs, inputs[6] (None if absent), lengths, seed, scalars, needs_grad)
//   -> 6 gradients (None where none is needed)
void set_differentiable_backward(pybind11::object fn);

}  // namespace zoneout_autograd
