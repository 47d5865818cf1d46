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

// Steps at or past a sequence's length leave its state untouched (nn.LSTM's packed
// semantics, for both directions since t is the position in the input).
ZF_HOST_DEVICE bool step_active(int64_t t, const int64_t* lengths, int64_t b) {
  return lengths == nullptr || t < lengths[b];
}

}  // namespace zoneout
