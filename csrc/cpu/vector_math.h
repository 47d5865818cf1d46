// vector_math.h: float32 vector types for the CPU element kernels (lstm_cpu.cpp), so that the
// header's cell math (zoneout_lstm.h: cell_forward, cell_backward, zf_sigmoid, zoneout_mix) runs
// on 16 (AVX-512) or 8 (AVX2) units at a time as written there, with an exp and a tanh of our own
// that the compiler inlines into it. Included by lstm_cpu.cpp only (it defines ZF_X86_PHILOX,
// ZF_TARGET_AVX512 and ZF_TARGET_AVX2_FMA first).
//
// Why: compiled for scalars and vectorized by the compiler, the element pass called glibc's vector
// expf / tanhf per gate, and every call spilled the loop's live vectors to the stack and back (all
// vector registers are caller-saved there).
//
// The kernels that use these types are compiled with __attribute__((flatten)): the header's
// templates and the math below carry no target attribute, so the vector operations inline into
// them only once they are themselves inlined into a caller compiled for the instruction set.
#pragma once

#include <cstdint>
#include <type_traits>

#include "zoneout_lstm.h"

namespace zoneout_cpu {

#if defined(ZF_X86_PHILOX)

// The operations the math needs, per instruction set: arithmetic, fused multiply-adds, min / max,
// rounding to the nearest integer, 2^n of such integers, sign manipulation; and the masks' select by
// Philox word: the vector form of lstm_cpu.cpp's folded_word_at_most (u < z as an integer compare
// of the folded word with its bound, last_word_below; why that is exact is told there).
struct F32x16 {
  static constexpr int kLanes = 16;
  __m512 v;
  F32x16() = default;
  ZF_TARGET_AVX512 F32x16(__m512 raw) : v(raw) {}
  ZF_TARGET_AVX512 F32x16(float s) : v(_mm512_set1_ps(s)) {}
  static ZF_TARGET_AVX512 F32x16 load(const float* p) { return _mm512_loadu_ps(p); }
  ZF_TARGET_AVX512 void store(float* p) const { _mm512_storeu_ps(p, v); }
  friend ZF_TARGET_AVX512 F32x16 operator+(F32x16 a, F32x16 b) { return _mm512_add_ps(a.v, b.v); }
  friend ZF_TARGET_AVX512 F32x16 operator-(F32x16 a, F32x16 b) { return _mm512_sub_ps(a.v, b.v); }
  friend ZF_TARGET_AVX512 F32x16 operator*(F32x16 a, F32x16 b) { return _mm512_mul_ps(a.v, b.v); }
  friend ZF_TARGET_AVX512 F32x16 operator/(F32x16 a, F32x16 b) { return _mm512_div_ps(a.v, b.v); }
  friend ZF_TARGET_AVX512 F32x16 operator-(F32x16 a) {
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MIN)));
  }
  static ZF_TARGET_AVX512 F32x16 fmadd(F32x16 a, F32x16 b, F32x16 c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }
  static ZF_TARGET_AVX512 F32x16 min(F32x16 a, F32x16 b) { return _mm512_min_ps(a.v, b.v); }
  static ZF_TARGET_AVX512 F32x16 max(F32x16 a, F32x16 b) { return _mm512_max_ps(a.v, b.v); }
  static ZF_TARGET_AVX512 F32x16 round(F32x16 a) {
    return _mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // 2^n for integral n in [-126, 127], built in the exponent field.
  static ZF_TARGET_AVX512 F32x16 pow2(F32x16 n) {
    const __m512i biased = _mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23));
  }
  static ZF_TARGET_AVX512 F32x16 abs(F32x16 a) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MAX)));
  }
  // |magnitude| with the sign of `sign`.
  static ZF_TARGET_AVX512 F32x16 copysign(F32x16 magnitude, F32x16 sign) {
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(magnitude.v),
                                                         _mm512_castps_si512(sign.v), _mm512_set1_epi32(INT32_MAX),
                                                         0xE4));  // (c & a) | (~c & b): bitwise select by c
  }
  // Per lane: if_true where folded_word_at_most(word, last) (lstm_cpu.cpp), else if_false.
  static ZF_TARGET_AVX512 F32x16 select_by_word(const uint32_t* words, int32_t last, F32x16 if_true,
                                                F32x16 if_false) {
    const __m512i r = _mm512_loadu_si512(words);
    const __m512i folded = _mm512_xor_si512(r, _mm512_srai_epi32(r, 31));
    return _mm512_mask_blend_ps(_mm512_cmple_epi32_mask(folded, _mm512_set1_epi32(last)), if_false.v, if_true.v);
  }
};

struct F32x8 {
  static constexpr int kLanes = 8;
  __m256 v;
  F32x8() = default;
  ZF_TARGET_AVX2_FMA F32x8(__m256 raw) : v(raw) {}
  ZF_TARGET_AVX2_FMA F32x8(float s) : v(_mm256_set1_ps(s)) {}
  static ZF_TARGET_AVX2_FMA F32x8 load(const float* p) { return _mm256_loadu_ps(p); }
  ZF_TARGET_AVX2_FMA void store(float* p) const { _mm256_storeu_ps(p, v); }
  friend ZF_TARGET_AVX2_FMA F32x8 operator+(F32x8 a, F32x8 b) { return _mm256_add_ps(a.v, b.v); }
  friend ZF_TARGET_AVX2_FMA F32x8 operator-(F32x8 a, F32x8 b) { return _mm256_sub_ps(a.v, b.v); }
  friend ZF_TARGET_AVX2_FMA F32x8 operator*(F32x8 a, F32x8 b) { return _mm256_mul_ps(a.v, b.v); }
  friend ZF_TARGET_AVX2_FMA F32x8 operator/(F32x8 a, F32x8 b) { return _mm256_div_ps(a.v, b.v); }
  friend ZF_TARGET_AVX2_FMA F32x8 operator-(F32x8 a) { return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)); }
  static ZF_TARGET_AVX2_FMA F32x8 fmadd(F32x8 a, F32x8 b, F32x8 c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
  static ZF_TARGET_AVX2_FMA F32x8 min(F32x8 a, F32x8 b) { return _mm256_min_ps(a.v, b.v); }
  static ZF_TARGET_AVX2_FMA F32x8 max(F32x8 a, F32x8 b) { return _mm256_max_ps(a.v, b.v); }
  static ZF_TARGET_AVX2_FMA F32x8 round(F32x8 a) {
    return _mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static ZF_TARGET_AVX2_FMA F32x8 pow2(F32x8 n) {
    const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  }
  static ZF_TARGET_AVX2_FMA F32x8 abs(F32x8 a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v); }
  static ZF_TARGET_AVX2_FMA F32x8 copysign(F32x8 magnitude, F32x8 sign) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    return _mm256_or_ps(_mm256_andnot_ps(sign_bit, magnitude.v), _mm256_and_ps(sign_bit, sign.v));
  }
  static ZF_TARGET_AVX2_FMA F32x8 select_by_word(const uint32_t* words, int32_t last, F32x8 if_true, F32x8 if_false) {
    const __m256i r = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words));
    const __m256i folded = _mm256_xor_si256(r, _mm256_srai_epi32(r, 31));
    const __m256 above = _mm256_castsi256_ps(_mm256_cmpgt_epi32(folded, _mm256_set1_epi32(last)));
    return _mm256_blendv_ps(if_true.v, if_false.v, above);
  }
};

template <typename V>
inline constexpr bool kIsVector = std::is_same_v<V, F32x16> || std::is_same_v<V, F32x8>;

// e^x as 2^n (1 + q), q = e^r - 1, x = n ln 2 + r, |r| <= ln(2) / 2; q = r + r^2 P(r) with Cephes'
// expf polynomial. x is clamped to [-87.34, 88.38], where 2^n is a normal float (n in [-126, 127]):
// e^x there spans 1.2e-38 .. 2.4e38, all a sigmoid or a tanh needs.
template <typename V>
struct ExpParts {
  V pow2n, q;
};

template <typename V, std::enable_if_t<kIsVector<V>, int> = 0>
inline ExpParts<V> exp_parts(V x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln 2 = hi + lo, hi exact in 9 bits
  constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                           4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  x = V::min(V(88.3762626f), V::max(V(-87.3365479f), x));  // x second: a NaN passes through (min/max return it)
  const V n = V::round(x * V(kLog2e));
  const V r = V::fmadd(n, V(-kLn2Lo), V::fmadd(n, V(-kLn2Hi), x));
  V poly = kP[0];
  for (int i = 1; i < 6; ++i) poly = V::fmadd(poly, r, V(kP[i]));
  return {V::pow2(n), V::fmadd(poly, r * r, r)};
}

// Found by argument-dependent lookup from zoneout_lstm.h's zf_sigmoid / cell_forward / cell_backward.
template <typename V, std::enable_if_t<kIsVector<V>, int> = 0>
inline V zf_exp(V x) {
  const ExpParts<V> e = exp_parts(x);
  return V::fmadd(e.pow2n, e.q, e.pow2n);
}

// tanh|x| = -m / (2 + m) with m = e^(-2|x|) - 1 = (2^n - 1) + 2^n q in (-1, 0]: where n = 0
// (|x| < ln(2) / 4) m is q itself, so there is no cancellation near 0.
template <typename V, std::enable_if_t<kIsVector<V>, int> = 0>
inline V zf_tanh(V x) {
  const ExpParts<V> e = exp_parts(V(-2.0f) * V::abs(x));
  const V m = V::fmadd(e.pow2n, e.q, e.pow2n - V(1.0f));
  return V::copysign(-m / (V(2.0f) + m), x);
}

#endif  // ZF_X86_PHILOX

}  // namespace zoneout_cpu
