// lstm_cpu.h: the fused CPU kernels of one zoneout-LSTM layer direction.
//
// The callers (csrc/ops.cpp) validate arguments and pass contiguous tensors of one
// floating dtype; shapes are as in csrc/zoneout_lstm.h. lengths may be undefined.
#pragma once

#include <tuple>

#include <ATen/ATen.h>

#include "zoneout_lstm.h"

namespace zoneout_cpu {

// -> (y [T,B,H], c_n [B,H], c_seq [T,B,H], gates [T,B,4H])
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& bias, const at::Tensor& lengths, const zoneout::ZoneoutParams& params);

// -> (grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias [4H])
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_backward(
    const at::Tensor& grad_y, const at::Tensor& grad_c_n, const at::Tensor& x, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& lengths,
    const at::Tensor& y, const at::Tensor& c_seq, const at::Tensor& gates, const zoneout::ZoneoutParams& params);

}  // namespace zoneout_cpu
