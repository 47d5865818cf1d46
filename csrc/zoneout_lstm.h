// zoneout_lstm.h: the framework-free core of zoneout_fused.
//
// One copy of the per-element math (LSTM gates, zoneout mixing, recurrent dropout, and
// their backward) and of the mask random-number contract (Philox4x32-10), as inline
// functions callable from host C++ and from CUDA device code. It includes no torch
// header, so the CPU kernels, the CUDA kernels and `nvcc -c` all see the same code.
// The specification is shared/design/contract.md; the Python oracle is
// zoneout_fused/masks.py and zoneout_fused/reference.py.
//
// Shapes used by the kernels (time-major, contiguous unless a stride is given):
//   x        [T, B, I]   layer input
//   pre      [B, 4H]     pre-activations of one step: x_t W_ih^T + b + h_{t-1} W_hh^T,
//                        rows i, f, g, o as in torch.nn.LSTM
//   gates    [T, B, 4H]  post-activations (i, f, g, o) saved for backward; zero at
//                        steps past a sequence's end
//   y        [T, B, H]   zoned h_t (the layer output); past a sequence's end it holds the
//                        sequence's frozen state
//   c_seq    [T, B, H]   zoned c_t, frozen the same way
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ZF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ZF_HOST_DEVICE inline
#endif

namespace zoneout {

// Mask modes; the integers are the codes zoneout_fused.masks.MASK_MODE_CODES passes in.
enum MaskMode : int {
  kIndependent = 0,  // stream 0: m_c = u0 < z_c, m_h = u1 < z_h
  kShared = 1,       // stream 0: m_c = u0 < z_c, m_h = u0 < z_h
  kTimestep = 2,     // stream 1, n = t*B + b: one uniform per (step, example)
  kStatic = 3,       // stream 2, n = t*H + j: one uniform per (step, unit)
};

// ---------------------------------------------------------------------------------------
// Philox4x32-10, bit-identical to triton.language.philox(seed, c0, c1, c2, c3).
// ---------------------------------------------------------------------------------------
struct Philox4 {
  uint32_t r0, r1, r2, r3;
};

ZF_HOST_DEVICE uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

ZF_HOST_DEVICE Philox4 philox4x32_10(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t old0 = c0, old2 = c2;
    c0 = mul_hi_u32(kRoundB, old2) ^ c1 ^ k0;
    c2 = mul_hi_u32(kRoundA, old0) ^ c3 ^ k1;
    c1 = kRoundB * old2;
    c3 = kRoundA * old0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return {c0, c1, c2, c3};
}

// triton.language.rand's conversion of a 32-bit word to [0, 1), in float32.
ZF_HOST_DEVICE float uint32_to_uniform(uint32_t r) {
  int32_t x = static_cast<int32_t>(r);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// ---------------------------------------------------------------------------------------
// Masks of one element (t, b, j) of a [T, B, H] sequence.
// ---------------------------------------------------------------------------------------
struct ZoneoutParams {
  uint64_t seed;
  const int64_t* seed_in_memory;  // nullptr: use seed; else the CUDA kernels load the seed from here
  int layer;
  int direction;  // 0 forward, 1 reverse
  int mask_mode;  // MaskMode
  // Probabilities are kept in double so that evaluation-mode expectations and 1/(1-p) are
  // exact in float64; the draws compare against their float32 roundings (contract sec. 2).
  double zoneout_cell;       // z_c: probability that c keeps its previous value
  double zoneout_hidden;     // z_h
  double recurrent_dropout;  // p: probability that the candidate update i*g is dropped
  bool training;            // false: masks are their expectations, no draw
  int64_t batch;            // B of the whole sequence (the mask counter uses it)
  int64_t hidden;           // H
};

// The params of one layer-direction call, as both bindings build them. With every probability
// 0 the training masks are the evaluation constants (keep 0, scale 1), so no draw is made.
inline ZoneoutParams make_params(uint64_t seed, int64_t layer, int64_t direction, int64_t mask_mode,
                                 double zoneout_cell, double zoneout_hidden, double recurrent_dropout, bool training,
                                 int64_t batch, int64_t hidden) {
  ZoneoutParams p{};
  p.seed = seed;
  p.seed_in_memory = nullptr;  // the CUDA binding sets it for a seed on the device
  p.layer = static_cast<int>(layer);
  p.direction = static_cast<int>(direction);
  p.mask_mode = static_cast<int>(mask_mode);
  p.zoneout_cell = zoneout_cell;
  p.zoneout_hidden = zoneout_hidden;
  p.recurrent_dropout = recurrent_dropout;
  p.training = training && (zoneout_cell > 0.0 || zoneout_hidden > 0.0 || recurrent_dropout > 0.0);
  p.batch = batch;
  p.hidden = hidden;
  return p;
}

// The multipliers of one element, in the accumulation type:
//   keep_cell / keep_hidden: m_c, m_h (0 or 1 in training, z in evaluation)
//   update_scale: d / (1 - p) (0 or 1/(1-p) in training, 1 in evaluation)
template <typename acc_t>
struct ElementMasks {
  acc_t keep_cell, keep_hidden, update_scale;
};

// The kept update's scale 1/(1-p): computed in double and rounded once to acc_t, as the
// reference (a Python float times a tensor) and the Triton kernels (a float64 parameter) do, so
// every backend uses the same bits (1.0f / (1.0f - float(p)) differs by an ulp for 462 of the
// 999 values p = k/1000). The evaluation mix uses acc_t(z) and acc_t(1) - acc_t(z) everywhere.
template <typename acc_t>
ZF_HOST_DEVICE acc_t kept_update_scale(double recurrent_dropout) {
  return static_cast<acc_t>(1.0 / (1.0 - recurrent_dropout));
}

template <typename acc_t>
ZF_HOST_DEVICE ElementMasks<acc_t> element_masks(const ZoneoutParams& p, int64_t t, int64_t b, int64_t j) {
  if (!p.training) {
    return {static_cast<acc_t>(p.zoneout_cell), static_cast<acc_t>(p.zoneout_hidden), acc_t(1)};
  }
  const uint32_t key2 = static_cast<uint32_t>(2 * p.layer + p.direction);
  const uint64_t n_elem = static_cast<uint64_t>((t * p.batch + b) * p.hidden + j);
  float u_cell, u_hidden, u_drop = 1.0f;
  if (p.mask_mode == kIndependent || p.mask_mode == kShared) {
    const Philox4 r = philox4x32_10(p.seed, static_cast<uint32_t>(n_elem), static_cast<uint32_t>(n_elem >> 32), key2, 0u);
    u_cell = uint32_to_uniform(r.r0);
    u_hidden = p.mask_mode == kIndependent ? uint32_to_uniform(r.r1) : u_cell;
    u_drop = uint32_to_uniform(r.r2);
  } else {
    const uint64_t n = p.mask_mode == kTimestep ? static_cast<uint64_t>(t * p.batch + b)
                                                : static_cast<uint64_t>(t * p.hidden + j);
    const uint32_t stream = p.mask_mode == kTimestep ? 1u : 2u;
    const Philox4 r = philox4x32_10(p.seed, static_cast<uint32_t>(n), static_cast<uint32_t>(n >> 32), key2, stream);
    u_cell = u_hidden = uint32_to_uniform(r.r0);
    if (p.recurrent_dropout > 0.0) {  // recurrent dropout always draws from the stream-0 counter
      const Philox4 rd = philox4x32_10(p.seed, static_cast<uint32_t>(n_elem), static_cast<uint32_t>(n_elem >> 32), key2, 0u);
      u_drop = uint32_to_uniform(rd.r2);
    }
  }
  const float z_cell = static_cast<float>(p.zoneout_cell), z_hidden = static_cast<float>(p.zoneout_hidden);
  const float p_drop = static_cast<float>(p.recurrent_dropout);
  ElementMasks<acc_t> m;
  m.keep_cell = u_cell < z_cell ? acc_t(1) : acc_t(0);
  m.keep_hidden = u_hidden < z_hidden ? acc_t(1) : acc_t(0);
  m.update_scale = (p.recurrent_dropout > 0.0 && !(u_drop >= p_drop)) ? acc_t(0)
                                                                       : kept_update_scale<acc_t>(p.recurrent_dropout);
  return m;
}

// ---------------------------------------------------------------------------------------
// Per-element LSTM + zoneout math (contract sec. 1).
// ---------------------------------------------------------------------------------------
ZF_HOST_DEVICE float zf_exp(float x) { return expf(x); }
ZF_HOST_DEVICE double zf_exp(double x) { return exp(x); }
ZF_HOST_DEVICE float zf_tanh(float x) { return tanhf(x); }
ZF_HOST_DEVICE double zf_tanh(double x) { return tanh(x); }

template <typename acc_t>
ZF_HOST_DEVICE acc_t zf_sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + zf_exp(-x));
}

// Zoneout mixing: m * previous + (1 - m) * candidate (the one formula every backend uses).
template <typename acc_t>
ZF_HOST_DEVICE acc_t zoneout_mix(acc_t keep, acc_t previous, acc_t candidate) {
  return keep * previous + (acc_t(1) - keep) * candidate;
}

template <typename acc_t>
struct CellForward {
  acc_t i, f, g, o;  // gate activations, saved for backward
  acc_t c, h;        // zoned states c_t, h_t
};

// Forward of one element from its four pre-activations.
template <typename acc_t>
ZF_HOST_DEVICE CellForward<acc_t> cell_forward(acc_t pre_i, acc_t pre_f, acc_t pre_g, acc_t pre_o, acc_t c_prev,
                                               acc_t h_prev, const ElementMasks<acc_t>& m) {
  CellForward<acc_t> out;
  out.i = zf_sigmoid(pre_i);
  out.f = zf_sigmoid(pre_f);
  out.g = zf_tanh(pre_g);
  out.o = zf_sigmoid(pre_o);
  const acc_t c_candidate = out.f * c_prev + m.update_scale * (out.i * out.g);
  const acc_t h_candidate = out.o * zf_tanh(c_candidate);  // from the un-zoned candidate
  out.c = zoneout_mix(m.keep_cell, c_prev, c_candidate);
  out.h = zoneout_mix(m.keep_hidden, h_prev, h_candidate);
  return out;
}

template <typename acc_t>
struct CellBackward {
  acc_t d_pre_i, d_pre_f, d_pre_g, d_pre_o;  // gradient of the pre-activations
  acc_t dc_prev;                             // total gradient reaching c_{t-1} from this step
  acc_t dh_prev_direct;                      // m_h * dh (the W_hh path is added by a matmul)
};

// Backward of one element. dh, dc: total gradients reaching h_t and c_t. The candidate
// c~ is recomputed from the saved gates and c_{t-1}, so only gates and states are saved.
template <typename acc_t>
ZF_HOST_DEVICE CellBackward<acc_t> cell_backward(acc_t dh, acc_t dc, acc_t i, acc_t f, acc_t g, acc_t o, acc_t c_prev,
                                                 const ElementMasks<acc_t>& m) {
  const acc_t c_candidate = f * c_prev + m.update_scale * (i * g);
  const acc_t tanh_c = zf_tanh(c_candidate);
  const acc_t dh_candidate = (acc_t(1) - m.keep_hidden) * dh;
  const acc_t dc_candidate = (acc_t(1) - m.keep_cell) * dc + dh_candidate * o * (acc_t(1) - tanh_c * tanh_c);
  const acc_t d_update = dc_candidate * m.update_scale;  // gradient of i*g
  CellBackward<acc_t> out;
  out.dc_prev = m.keep_cell * dc + f * dc_candidate;
  out.dh_prev_direct = m.keep_hidden * dh;
  out.d_pre_i = d_update * g * i * (acc_t(1) - i);
  out.d_pre_f = dc_candidate * c_prev * f * (acc_t(1) - f);
  out.d_pre_g = d_update * i * (acc_t(1) - g * g);
  out.d_pre_o = dh_candidate * tanh_c * o * (acc_t(1) - o);
  return out;
}

// ---------------------------------------------------------------------------------------
// GRU and plain-RNN cells (contract sec. 4): the hidden state only, with the LSTM's hidden
// mask m_h (element_masks with zoneout_cell = 0: keep_cell is then 0 and unused) and, for the
// GRU, recurrent dropout on the candidate n (update_scale). Weights and gate rows are
// torch.nn.GRU's / nn.RNN's. Per step the kernels form two products:
//   xp [B, G*H] = x_t W_ih^T + b_ih (all steps at once)   hp [B, G*H] = h_{t-1} W_hh^T + b_hh
// with G = 3 rows r, u (torch's z), n for the GRU and G = 1 for the RNN. The saved "gates"
// are [T, B, 4H] = (r, u, n, hp_n) for the GRU and [T, B, H] = (h~) for the RNN.
// ---------------------------------------------------------------------------------------
enum CellKind : int { kLstm = 0, kGru = 1, kRnnTanh = 2, kRnnRelu = 3 };

// Rows of W_ih / W_hh per hidden unit (G) and saved gate columns per unit.
ZF_HOST_DEVICE int cell_rows(int cell) { return cell == kLstm ? 4 : (cell == kGru ? 3 : 1); }
ZF_HOST_DEVICE int cell_saved(int cell) { return cell == kLstm || cell == kGru ? 4 : 1; }

template <typename acc_t>
struct GruForward {
  acc_t r, u, n, hp_n;  // saved for backward (hp_n = h_{t-1} W_hn^T + b_hn, before the reset)
  acc_t h;              // zoned h_t
};

// Forward of one GRU element from its input parts (x_*: x W_i*^T + b_i*) and recurrent parts
// (hp_*: h W_h*^T + b_h*). b_hn stays inside the reset product, as in nn.GRU.
template <typename acc_t>
ZF_HOST_DEVICE GruForward<acc_t> gru_forward(acc_t x_r, acc_t x_u, acc_t x_n, acc_t hp_r, acc_t hp_u, acc_t hp_n,
                                             acc_t h_prev, const ElementMasks<acc_t>& m) {
  GruForward<acc_t> out;
  out.r = zf_sigmoid(x_r + hp_r);
  out.u = zf_sigmoid(x_u + hp_u);
  out.n = zf_tanh(x_n + out.r * hp_n);
  out.hp_n = hp_n;
  const acc_t h_candidate = (acc_t(1) - out.u) * (m.update_scale * out.n) + out.u * h_prev;
  out.h = zoneout_mix(m.keep_hidden, h_prev, h_candidate);
  return out;
}

template <typename acc_t>
struct GruBackward {
  acc_t d_r, d_u, d_n;  // gradient of the pre-activations; d_n is the input part's (x_n)
  acc_t d_hp_n;         // gradient of hp_n (= d_n * r): the recurrent part's n row
  acc_t dh_prev_direct; // m_h dh + (1 - m_h) u dh (the W_hh path is added by a matmul)
};

// Backward of one GRU element. dh: total gradient reaching h_t.
template <typename acc_t>
ZF_HOST_DEVICE GruBackward<acc_t> gru_backward(acc_t dh, acc_t r, acc_t u, acc_t n, acc_t hp_n, acc_t h_prev,
                                               const ElementMasks<acc_t>& m) {
  const acc_t dh_candidate = (acc_t(1) - m.keep_hidden) * dh;
  const acc_t dn = dh_candidate * (acc_t(1) - u) * m.update_scale;
  const acc_t du = dh_candidate * (h_prev - m.update_scale * n);
  GruBackward<acc_t> out;
  out.d_n = dn * (acc_t(1) - n * n);
  out.d_r = out.d_n * hp_n * r * (acc_t(1) - r);
  out.d_u = du * u * (acc_t(1) - u);
  out.d_hp_n = out.d_n * r;
  out.dh_prev_direct = m.keep_hidden * dh + dh_candidate * u;
  return out;
}

// The plain RNN's activation (nn.RNN's nonlinearity) and its derivative from its output.
template <typename acc_t>
ZF_HOST_DEVICE acc_t rnn_activation(bool relu, acc_t pre) {
  return relu ? (pre > acc_t(0) ? pre : acc_t(0)) : zf_tanh(pre);
}
template <typename acc_t>
ZF_HOST_DEVICE acc_t rnn_activation_grad(bool relu, acc_t activation) {
  return relu ? (activation > acc_t(0) ? acc_t(1) : acc_t(0)) : acc_t(1) - activation * activation;
}

template <typename acc_t>
struct RnnForward {
  acc_t candidate;  // h~ = act(pre), saved for backward
  acc_t h;          // zoned h_t
};

// pre = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh.
template <typename acc_t>
ZF_HOST_DEVICE RnnForward<acc_t> rnn_forward(bool relu, acc_t pre, acc_t h_prev, const ElementMasks<acc_t>& m) {
  RnnForward<acc_t> out;
  out.candidate = rnn_activation(relu, pre);
  out.h = zoneout_mix(m.keep_hidden, h_prev, out.candidate);
  return out;
}

template <typename acc_t>
struct RnnBackward {
  acc_t d_pre;           // gradient of pre (input and recurrent parts alike)
  acc_t dh_prev_direct;  // m_h dh
};

template <typename acc_t>
ZF_HOST_DEVICE RnnBackward<acc_t> rnn_backward(bool relu, acc_t dh, acc_t candidate, const ElementMasks<acc_t>& m) {
  return {(acc_t(1) - m.keep_hidden) * dh * rnn_activation_grad(relu, candidate), m.keep_hidden * dh};
}

// Steps at or past a sequence's length leave its state untouched (nn.LSTM's packed
// semantics, for both directions since t is the position in the input).
ZF_HOST_DEVICE bool step_active(int64_t t, const int64_t* lengths, int64_t b) {
  return lengths == nullptr || t < lengths[b];
}

}  // namespace zoneout
