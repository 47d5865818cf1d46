// cell_step.h: one step of a cell module (ZoneoutLSTMCell, ZoneoutGRUCell, ZoneoutRNNCell) on
// the cpu backend in a single call from Python.
//
// A decoder calls its cell once per frame, and at small sizes the Python around the layer op
// (argument checks, reshapes, the seed draw, the op call's argument parsing) cost more than the
// step itself. This entry does the same work in C++ for the common case: plain CPU tensors of one
// floating dtype, the shapes the module expects, no autocast, no tracer, no Python mode. It takes
// nothing else: for any other input it returns None, and the module's Python path runs, which
// raises nn.LSTMCell's errors or handles the case (autocast, torch.compile, tensor subclasses).
// The op is the same (zoneout_fused::cpu_layer_forward / cpu_gru_rnn_layer_forward, through the
// dispatcher, so its autograd kernel records the node), and so are the seed and the result bits.
#pragma once

#include <cstdint>

#include <pybind11/pybind11.h>

namespace zoneout_cell_step {

// cell: reference.CELL_CODES (0 lstm, 1 gru, 2 rnn_tanh, 3 rnn_relu).
// input: [B, I] or [I]. hx: None; for the LSTM a tuple or list (h, c), for the others a tensor;
//   each [B, H] (or [H] with an unbatched input).
// bias_a, bias_b: the LSTM's summed bias (b_ih + b_hh) and None; the GRU's and RNN's b_ih, b_hh.
// The seed, when the step is stochastic (training and a probability above zero), is drawn from
// torch's default CPU generator exactly as torch.randint(0, 2**63 - 1, ()) draws it.
// Returns (h_1, c_1) for the LSTM, h_1 for the others, or None where the Python path must run.
pybind11::object cell_step(int64_t cell, pybind11::handle input, pybind11::handle hx, pybind11::handle w_ih,
                           pybind11::handle w_hh, pybind11::handle bias_a, pybind11::handle bias_b,
                           double zoneout_cell, double zoneout_hidden, double recurrent_dropout, int64_t mask_mode,
                           bool training);

}  // namespace zoneout_cell_step
