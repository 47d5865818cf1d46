// lstm_cpu.cpp: one zoneout-LSTM layer direction on the CPU.
//
// Forward: the input projection of all steps is one matrix product written straight into
// the gates buffer; each step then adds h_{t-1} W_hh^T into its slice (one GEMM) and one
// fused element-wise pass turns those pre-activations into gates in place and writes
// y[t], c_seq[t]. Backward mirrors it: one fused pass and one GEMM per step, then the
// weight and input gradients as a few large products over all steps. Masks are
// regenerated from Philox in both passes (zoneout_lstm.h), never stored.

// With glibc's vector math library (setup.py defines ZF_USE_LIBMVEC and links -lmvec on
// Linux x86-64), declaring expf/tanhf/exp/tanh as SIMD functions lets the compiler vectorize
// the header's cell math (every sigmoid and tanh) instead of calling scalar libm per element.
// Must come before zoneout_lstm.h, whose zf_exp/zf_tanh call these.
#include <cmath>
#if defined(ZF_USE_LIBMVEC)
extern "C" {
float expf(float) noexcept __attribute__((__simd__("notinbranch")));
float tanhf(float) noexcept __attribute__((__simd__("notinbranch")));
double exp(double) noexcept __attribute__((__simd__("notinbranch")));
double tanh(double) noexcept __attribute__((__simd__("notinbranch")));
}
#endif

#include "cpu/lstm_cpu.h"

#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

// The element kernels are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load
// time (GCC function multiversioning), as setup.py builds for the baseline ISA.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define ZF_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ZF_CPU_CLONES
#endif
#if defined(__GNUC__)
#define ZF_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ZF_ALWAYS_INLINE inline
#endif

namespace zoneout_cpu {
namespace {

using at::Tensor;
using zoneout::ZoneoutParams;

// Elements per parallel_for task: the element work is tens of ns, so this keeps tasks well
// above the threading overhead while still splitting typical batches (B*H of a few
// thousand) across cores.
constexpr int64_t kGrain = 1024;
// Units per chunk: masks are drawn into small stack arrays, then the cell math runs over them.
constexpr int64_t kChunk = 64;

// Calls f(b, j_begin, j_end) for the row segments of the flat [B, H] range [begin, end).
template <typename F>
inline void for_row_segments(int64_t begin, int64_t end, int64_t hidden, const F& f) {
  while (begin < end) {
    const int64_t b = begin / hidden, j0 = begin % hidden;
    const int64_t j1 = std::min(hidden, j0 + (end - begin));
    f(b, j0, j1);
    begin += j1 - j0;
  }
}

// Position in the input of the s-th processed step.
inline int64_t step_position(int64_t s, int64_t steps, int direction) {
  return direction == 0 ? s : steps - 1 - s;
}

template <typename scalar_t>
struct MaskChunk {
  scalar_t keep_cell[kChunk], keep_hidden[kChunk], update_scale[kChunk];
  ZF_ALWAYS_INLINE zoneout::ElementMasks<scalar_t> operator[](int64_t k) const {
    return {keep_cell[k], keep_hidden[k], update_scale[k]};
  }
};

// Training-mode draws with the mask mode a compile-time constant: the header's branches on
// the mode then fold away and the Philox loop vectorizes.
template <typename scalar_t, int kMode>
ZF_ALWAYS_INLINE void draw_masks(MaskChunk<scalar_t>& out, const ZoneoutParams& params, int64_t t, int64_t b,
                                 int64_t j0, int64_t n) {
  ZoneoutParams p = params;
  p.mask_mode = kMode;
  p.training = true;
  for (int64_t k = 0; k < n; ++k) {
    const auto m = zoneout::element_masks<scalar_t>(p, t, b, j0 + k);
    out.keep_cell[k] = m.keep_cell;
    out.keep_hidden[k] = m.keep_hidden;
    out.update_scale[k] = m.update_scale;
  }
}

// Masks of units j0 .. j0+n-1 of example b at step t (n <= kChunk).
template <typename scalar_t>
ZF_ALWAYS_INLINE void chunk_masks(MaskChunk<scalar_t>& out, const ZoneoutParams& p, int64_t t, int64_t b,
                                  int64_t j0, int64_t n) {
  if (!p.training) {  // the expectations: one constant for every unit
    const auto m = zoneout::element_masks<scalar_t>(p, t, b, j0);
    std::fill_n(out.keep_cell, n, m.keep_cell);
    std::fill_n(out.keep_hidden, n, m.keep_hidden);
    std::fill_n(out.update_scale, n, m.update_scale);
    return;
  }
  switch (p.mask_mode) {
    case zoneout::kIndependent: draw_masks<scalar_t, zoneout::kIndependent>(out, p, t, b, j0, n); break;
    case zoneout::kShared: draw_masks<scalar_t, zoneout::kShared>(out, p, t, b, j0, n); break;
    case zoneout::kTimestep: draw_masks<scalar_t, zoneout::kTimestep>(out, p, t, b, j0, n); break;
    default: draw_masks<scalar_t, zoneout::kStatic>(out, p, t, b, j0, n); break;
  }
}

// Forward of units [j0, j1) of one active example row. g: the row's pre-activations
// [4H] in, activations out; hp, cp: h_{t-1}, c_{t-1}; yo, co: h_t, c_t.
template <typename scalar_t>
ZF_ALWAYS_INLINE void forward_row(scalar_t* __restrict g, const scalar_t* __restrict hp,
                                  const scalar_t* __restrict cp, scalar_t* __restrict yo, scalar_t* __restrict co,
                                  int64_t t, int64_t b, int64_t j0, int64_t j1, const ZoneoutParams& p) {
  const int64_t hidden = p.hidden;
  MaskChunk<scalar_t> masks;
  for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, j1 - c0);
    chunk_masks(masks, p, t, b, c0, n);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t j = c0 + k;
      const auto r = zoneout::cell_forward<scalar_t>(g[j], g[hidden + j], g[2 * hidden + j], g[3 * hidden + j],
                                                     cp[j], hp[j], masks[k]);
      g[j] = r.i;
      g[hidden + j] = r.f;
      g[2 * hidden + j] = r.g;
      g[3 * hidden + j] = r.o;
      yo[j] = r.h;
      co[j] = r.c;
    }
  }
}

// Backward of units [j0, j1) of one active example row. gy: grad_y[t]; dh: in, the gradient
// reaching h_t from later processed steps, out, the direct part m_h * dh of the gradient
// reaching h_{t-1} (the W_hh part is the caller's GEMM); dc: gradient reaching c_t in,
// c_{t-1} out; dp: the row's pre-activation gradient [4H].
template <typename scalar_t>
ZF_ALWAYS_INLINE void backward_row(const scalar_t* __restrict g, const scalar_t* __restrict gy,
                                   const scalar_t* __restrict cp, scalar_t* __restrict dh, scalar_t* __restrict dc,
                                   scalar_t* __restrict dp, int64_t t, int64_t b, int64_t j0, int64_t j1,
                                   const ZoneoutParams& p) {
  const int64_t hidden = p.hidden;
  MaskChunk<scalar_t> masks;
  for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, j1 - c0);
    chunk_masks(masks, p, t, b, c0, n);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t j = c0 + k;
      const auto r = zoneout::cell_backward<scalar_t>(gy[j] + dh[j], dc[j], g[j], g[hidden + j], g[2 * hidden + j],
                                                      g[3 * hidden + j], cp[j], masks[k]);
      dp[j] = r.d_pre_i;
      dp[hidden + j] = r.d_pre_f;
      dp[2 * hidden + j] = r.d_pre_g;
      dp[3 * hidden + j] = r.d_pre_o;
      dh[j] = r.dh_prev_direct;
      dc[j] = r.dc_prev;
    }
  }
}

// Non-template entry points, one multiversioned copy per dtype.
ZF_CPU_CLONES void forward_row_f32(float* g, const float* hp, const float* cp, float* yo, float* co, int64_t t,
                                   int64_t b, int64_t j0, int64_t j1, const ZoneoutParams& p) {
  forward_row<float>(g, hp, cp, yo, co, t, b, j0, j1, p);
}
ZF_CPU_CLONES void forward_row_f64(double* g, const double* hp, const double* cp, double* yo, double* co, int64_t t,
                                   int64_t b, int64_t j0, int64_t j1, const ZoneoutParams& p) {
  forward_row<double>(g, hp, cp, yo, co, t, b, j0, j1, p);
}
ZF_CPU_CLONES void backward_row_f32(const float* g, const float* gy, const float* cp, float* dh, float* dc, float* dp,
                                    int64_t t, int64_t b, int64_t j0, int64_t j1, const ZoneoutParams& p) {
  backward_row<float>(g, gy, cp, dh, dc, dp, t, b, j0, j1, p);
}
ZF_CPU_CLONES void backward_row_f64(const double* g, const double* gy, const double* cp, double* dh, double* dc,
                                    double* dp, int64_t t, int64_t b, int64_t j0, int64_t j1, const ZoneoutParams& p) {
  backward_row<double>(g, gy, cp, dh, dc, dp, t, b, j0, j1, p);
}
inline void forward_row_dispatch(float* g, const float* hp, const float* cp, float* yo, float* co, int64_t t, int64_t b,
                                 int64_t j0, int64_t j1, const ZoneoutParams& p) {
  forward_row_f32(g, hp, cp, yo, co, t, b, j0, j1, p);
}
inline void forward_row_dispatch(double* g, const double* hp, const double* cp, double* yo, double* co, int64_t t,
                                 int64_t b, int64_t j0, int64_t j1, const ZoneoutParams& p) {
  forward_row_f64(g, hp, cp, yo, co, t, b, j0, j1, p);
}
inline void backward_row_dispatch(const float* g, const float* gy, const float* cp, float* dh, float* dc, float* dp,
                                  int64_t t, int64_t b, int64_t j0, int64_t j1, const ZoneoutParams& p) {
  backward_row_f32(g, gy, cp, dh, dc, dp, t, b, j0, j1, p);
}
inline void backward_row_dispatch(const double* g, const double* gy, const double* cp, double* dh, double* dc,
                                  double* dp, int64_t t, int64_t b, int64_t j0, int64_t j1, const ZoneoutParams& p) {
  backward_row_f64(g, gy, cp, dh, dc, dp, t, b, j0, j1, p);
}

// One step's fused element-wise forward: gates_t holds the pre-activations [B, 4H] and is
// overwritten with the activations; writes y[t] and c_seq[t].
template <typename scalar_t>
void forward_pointwise(scalar_t* gates_t, const scalar_t* h_prev, const scalar_t* c_prev, scalar_t* y_t,
                       scalar_t* c_t, const int64_t* lengths, int64_t t, const ZoneoutParams& p) {
  const int64_t batch = p.batch, hidden = p.hidden;
  at::parallel_for(0, batch * hidden, kGrain, [&](int64_t begin, int64_t end) {
    for_row_segments(begin, end, hidden, [&](int64_t b, int64_t j0, int64_t j1) {
      scalar_t* g = gates_t + b * 4 * hidden;
      const scalar_t* hp = h_prev + b * hidden;
      const scalar_t* cp = c_prev + b * hidden;
      scalar_t* yo = y_t + b * hidden;
      scalar_t* co = c_t + b * hidden;
      if (zoneout::step_active(t, lengths, b)) {
        forward_row_dispatch(g, hp, cp, yo, co, t, b, j0, j1, p);
        return;
      }
      for (int64_t j = j0; j < j1; ++j) {  // past the sequence's end: state frozen, gates 0
        yo[j] = hp[j];
        co[j] = cp[j];
        g[j] = g[hidden + j] = g[2 * hidden + j] = g[3 * hidden + j] = scalar_t(0);
      }
    });
  });
}

// One step's fused element-wise backward (see backward_row for dh and dc).
template <typename scalar_t>
void backward_pointwise(const scalar_t* grad_y_t, const scalar_t* gates_t, const scalar_t* c_prev, scalar_t* dh,
                        scalar_t* dc, scalar_t* d_pre_t, const int64_t* lengths, int64_t t, const ZoneoutParams& p) {
  const int64_t batch = p.batch, hidden = p.hidden;
  at::parallel_for(0, batch * hidden, kGrain, [&](int64_t begin, int64_t end) {
    for_row_segments(begin, end, hidden, [&](int64_t b, int64_t j0, int64_t j1) {
      const scalar_t* gy = grad_y_t + b * hidden;
      scalar_t* dh_b = dh + b * hidden;
      scalar_t* dp = d_pre_t + b * 4 * hidden;
      if (zoneout::step_active(t, lengths, b)) {
        backward_row_dispatch(gates_t + b * 4 * hidden, gy, c_prev + b * hidden, dh_b, dc + b * hidden, dp, t, b, j0,
                              j1, p);
        return;
      }
      for (int64_t j = j0; j < j1; ++j) {  // the state passed through: so do its gradients
        dh_b[j] += gy[j];
        dp[j] = dp[hidden + j] = dp[2 * hidden + j] = dp[3 * hidden + j] = scalar_t(0);
      }
    });
  });
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_forward(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                                         const Tensor& w_ih, const Tensor& w_hh, const Tensor& bias,
                                                         const Tensor& lengths, const zoneout::ZoneoutParams& params) {
  const int64_t steps = x.size(0), batch = x.size(1), input = x.size(2), hidden = w_hh.size(1);
  Tensor y = at::empty({steps, batch, hidden}, x.options());
  Tensor c_seq = at::empty({steps, batch, hidden}, x.options());
  Tensor gates = at::empty({steps, batch, 4 * hidden}, x.options());

  // Input projection of every step at once, written where the pre-activations live.
  Tensor gates_2d = gates.view({steps * batch, 4 * hidden});
  if (bias.defined()) {
    at::addmm_out(gates_2d, bias, x.view({steps * batch, input}), w_ih.t());
  } else {
    at::mm_out(gates_2d, x.view({steps * batch, input}), w_ih.t());
  }
  const Tensor w_hh_t = w_hh.t();
  const int64_t* len = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  const int direction = params.direction;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "zoneout_cpu_layer_forward", [&] {
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = step_position(s, steps, direction);
      const int64_t t_prev = s == 0 ? -1 : step_position(s - 1, steps, direction);
      const Tensor h_prev = t_prev < 0 ? h0 : y[t_prev];
      const Tensor c_prev = t_prev < 0 ? c0 : c_seq[t_prev];
      Tensor gates_t = gates[t];
      gates_t.addmm_(h_prev, w_hh_t);  // the step's one GEMM, accumulated onto x_t W_ih^T + b
      forward_pointwise<scalar_t>(gates_t.data_ptr<scalar_t>(), h_prev.data_ptr<scalar_t>(),
                                  c_prev.data_ptr<scalar_t>(), y[t].data_ptr<scalar_t>(),
                                  c_seq[t].data_ptr<scalar_t>(), len, t, params);
    }
  });
  Tensor c_n = c_seq[step_position(steps - 1, steps, direction)].clone();
  return {y, c_n, c_seq, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_backward(
    const Tensor& grad_y, const Tensor& grad_c_n, const Tensor& x, const Tensor& h0, const Tensor& c0,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& lengths, const Tensor& y, const Tensor& c_seq,
    const Tensor& gates, const zoneout::ZoneoutParams& params) {
  const int64_t steps = x.size(0), batch = x.size(1), input = x.size(2), hidden = w_hh.size(1);
  const int direction = params.direction;
  const int64_t* len = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;

  Tensor d_pre = at::empty({steps, batch, 4 * hidden}, x.options());
  Tensor dh = at::zeros({batch, hidden}, x.options());  // h_n's gradient is already in grad_y
  Tensor dc = grad_c_n.clone();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "zoneout_cpu_layer_backward", [&] {
    for (int64_t s = steps - 1; s >= 0; --s) {  // processed steps, last first
      const int64_t t = step_position(s, steps, direction);
      const Tensor c_prev = s == 0 ? c0 : c_seq[step_position(s - 1, steps, direction)];
      Tensor d_pre_t = d_pre[t];
      backward_pointwise<scalar_t>(grad_y[t].data_ptr<scalar_t>(), gates[t].data_ptr<scalar_t>(),
                                   c_prev.data_ptr<scalar_t>(), dh.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(),
                                   d_pre_t.data_ptr<scalar_t>(), len, t, params);
      dh.addmm_(d_pre_t, w_hh);  // the step's one GEMM: the W_hh path to h_{t-1}
    }
  });

  // Weight and input gradients: large products over all steps. The three weight-side
  // gradients come from ONE product d_pre^T [x | h_prev | 1], which reads d_pre once:
  // h_prev of step t is y of the previously processed step (h0 for the first one), and
  // the column of ones gives grad_bias = sum over steps and examples of d_pre.
  const Tensor d_pre_2d = d_pre.view({steps * batch, 4 * hidden});
  const Tensor grad_x = at::mm(d_pre_2d, w_ih).view({steps, batch, input});
  Tensor operands = at::empty({steps, batch, input + hidden + 1}, x.options());
  operands.narrow(2, 0, input).copy_(x);
  Tensor h_prev = operands.narrow(2, input, hidden);
  const int64_t first = step_position(0, steps, direction);
  h_prev[first].copy_(h0);
  if (steps > 1) {  // direction 0: steps 1..T-1 read y[0..T-2]; direction 1: steps 0..T-2 read y[1..T-1]
    if (direction == 0) {
      h_prev.narrow(0, 1, steps - 1).copy_(y.narrow(0, 0, steps - 1));
    } else {
      h_prev.narrow(0, 0, steps - 1).copy_(y.narrow(0, 1, steps - 1));
    }
  }
  operands.narrow(2, input + hidden, 1).fill_(1);
  const Tensor weight_grads = at::mm(d_pre_2d.t(), operands.view({steps * batch, input + hidden + 1}));
  const Tensor grad_w_ih = weight_grads.narrow(1, 0, input).contiguous();
  const Tensor grad_w_hh = weight_grads.narrow(1, input, hidden).contiguous();
  const Tensor grad_bias = weight_grads.select(1, input + hidden).contiguous();
  return {grad_x, dh, dc, grad_w_ih, grad_w_hh, grad_bias};
}

}  // namespace zoneout_cpu
