// lstm_cpu.cpp: one zoneout-LSTM layer direction on the CPU (and the GRU / RNN, further down).
//
// Forward: the input projection of all steps is one matrix product written straight into
// the gates buffer; each step then adds h_{t-1} W_hh^T into its slice and one fused
// element-wise pass turns those pre-activations into gates in place and writes y[t], c_seq[t].
// Backward mirrors it: one fused pass and one product per step, then the weight and input
// gradients as a few large products over all steps. Masks are regenerated from Philox in both
// passes (zoneout_lstm.h), never stored. Two time loops (lstm_cpu.h, cpu_loop): "steps" forms each
// step's product through oneDNN / ATen and runs the element pass with at::parallel_for; "fused"
// (float32) runs the whole sequence in one parallel region, each thread forming its own units'
// columns with the tile kernels (recurrent_tiles.h) and passing one barrier per step, or running its
// own example rows through every step with no barrier (LoopSplit); its loops
// (fused_forward_loop / fused_backward_loop) serve the LSTM, the GRU and the RNN. There the LSTM's
// step forms its input part too, just before the recurrent one (the same FMA chains as a
// projection of all steps, without writing [T, B, 4H] out and reading it back).

// With glibc's vector math library (setup.py defines ZF_USE_LIBMVEC and links -lmvec on
// Linux x86-64), declaring expf/tanhf/exp/tanh as SIMD functions lets the compiler vectorize
// the header's cell math (every sigmoid and tanh) instead of calling scalar libm per element:
// the rows the vector types of vector_math.h do not take (float64, the GRU and RNN, the units
// past the last whole vector). Must come before zoneout_lstm.h, whose zf_exp/zf_tanh call these.
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
#include "cpu/cpu_vendor.h"
#include "cpu/gemm.h"
#include "cpu/setting.h"

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <limits>
#if defined(__unix__)
#include <unistd.h>  // sysconf
#endif
#include <mutex>
#include <type_traits>
#include <vector>

// The element kernels and the vectorized Philox are compiled once per instruction set
// (AVX-512, AVX2, baseline x86-64) and one copy is picked at run time (select_isa below): the
// best the CPU has, or the one ZONEOUT_FUSED_CPU_ISA or the test hook asks for, so every copy
// is tested on any machine that can run it, whatever the best one there is. setup.py builds
// for the baseline ISA.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define ZF_X86_PHILOX 1
#define ZF_TARGET_AVX512 __attribute__((target("avx512f")))
#define ZF_TARGET_AVX2 __attribute__((target("avx2")))
#define ZF_TARGET_AVX2_FMA __attribute__((target("avx2,fma")))
#endif

#include <atomic>
#include <cstdlib>
#include <string>

#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/alloc_cpu.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__GNUC__)
#define ZF_ALWAYS_INLINE inline __attribute__((always_inline))
#define ZF_NOINLINE __attribute__((noinline))
#else
#define ZF_ALWAYS_INLINE inline
#define ZF_NOINLINE
#endif

#include "cpu/recurrent_tiles.h"
#include "cpu/vector_math.h"

#if defined(__GNUC__)
// Inline every call in the function's body, recursively (see vector_math.h).
#define ZF_FLATTEN __attribute__((flatten))
#else
#define ZF_FLATTEN
#endif

namespace zoneout_cpu {
namespace {

using at::Tensor;
using zoneout::ZoneoutParams;

// Elements per parallel_for task: the element work is tens of ns, so this keeps tasks well
// above the threading overhead while still splitting typical batches (B*H of a few
// thousand) across cores.
constexpr int64_t kGrain = 1024;
// Units per chunk: masks are drawn into small stack arrays, then the cell math runs over them. 256
// rather than 64: a row of up to 256 units then draws its Philox words in one call. AVX-512, B=32 T=50
// I=64, chunks set call by call in one process, the fused backward's element pass 64 / 256 (medians of
// 38-56 calls): H=128 1.03, H=256 1.08 and 1.09, H=512 1.09 (128 took most of it at H=256); AVX2 level.
constexpr int64_t kChunk = 256;

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

// ---------------------------------------------------------------------------------------
// Host specialisation of zoneout::philox4x32_10 for runs of consecutive counters.
// Why: the header's scalar Philox, even auto-vectorized by GCC, cost ~7 ns per element and
// was most of forward_row_f32 / backward_row_f32 (22% of a 1-thread fwd+bwd at B=64, H=128).
// Each round needs mulhi and mullo of the same 32x32 product; vpmuludq gives both from one
// 64-bit product (each word in a 64-bit lane, below), so no vpmulld. The header stays
// the definition: the scalar path below calls it for counters whose low word would carry into
// the high word inside a run, and on CPUs without AVX2 / non-x86 builds (a run's last counters,
// short of a vector, take one more vector block, the words past the run dropped).
// Bit-identity is checked by tests/test_cpu.py::test_philox_words_match_header (through the
// zoneout_fused._C._philox_words_cpu hook) and by every element-for-element mask test.
// ---------------------------------------------------------------------------------------
// Words r0, r1, r2 of philox4x32_10(seed, lo + k, hi, c2, c3) for k < n (no carry: the
// caller guarantees lo + n - 1 fits 32 bits).
using PhiloxRunFn = void (*)(uint64_t seed, uint32_t lo, uint32_t hi, uint32_t c2, uint32_t c3, int64_t n,
                             uint32_t* r0, uint32_t* r1, uint32_t* r2);

void philox_run_scalar(uint64_t seed, uint32_t lo, uint32_t hi, uint32_t c2, uint32_t c3, int64_t n, uint32_t* r0,
                       uint32_t* r1, uint32_t* r2) {
  for (int64_t k = 0; k < n; ++k) {
    const zoneout::Philox4 r = zoneout::philox4x32_10(seed, lo + static_cast<uint32_t>(k), hi, c2, c3);
    r0[k] = r.r0;
    r1[k] = r.r1;
    r2[k] = r.r2;
  }
}

#if defined(ZF_X86_PHILOX)
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;

// Each 32-bit word lives in the low half of a 64-bit lane, a register holding consecutive
// counters: vpmuludq reads only those low halves, so one product per lane gives mulhi (>> 32) and
// mullo (the lane itself, its high half ignored by the next multiply) with no blends inside the
// rounds; a narrowing (vpmovqd, or vpermd) per word packs them at the end. Measured (perf, 1 thread,
// B=64 T=50 H=128 fwd+bwd): scalar/auto-vectorized header Philox ~22% of the run; a first AVX-512
// version blending full 32-bit lanes each round 6.9%; this form 3.7%.
// A run's counters differ only in their first word, so round 0's product of the third word and
// its key terms are the same for all (PhiloxRun); the round keys are made ahead, and read from
// memory by the rounds, which leaves the registers to the words: AVX2 then keeps 3 registers of
// counters in flight, 12 words and temporaries in its 16 registers (30.4 ns per 16 counters against
// 35.5 for 2 registers, whose 6-cycle chains of multiply, shift and two xors left the pipes idle; 4
// spilled). AVX-512 (32 registers) runs 4 registers, bound by its multiplies (11.7 ns per 16
// counters, either way). These constants depend on the key and the counters' other words only, so
// each thread keeps the last ones it made (remade when a call brings a new seed, layer or
// direction), as word_bounds keeps its bounds: made per run (per example row), they cost 1.5-2% of
// a B=32 T=50 H=64 or B=64 T=50 H=128 forward.
template <typename V>
struct PhiloxRun {
  V keys[20];        // round r: keys[2r], keys[2r + 1]
  V x0, x1, x2_key;  // after round 0: words 0 and 1, and what word 2 takes besides mulhi(c0 A)
  uint64_t seed = 0;
  uint32_t hi = 0, c2 = 0, c3 = 0;
  bool made = false;
};

#define ZF_PHILOX_KERNELS(SUFFIX, TARGET, V, LANES, REGISTERS, SET1, ADD, MUL, SRL, XOR, XOR3, COUNTING, STORE)    \
  template <int kRegs>                                                                                         \
  TARGET inline void philox_block_##SUFFIX(const PhiloxRun<V>& run, uint32_t lo, uint32_t* r0, uint32_t* r1,    \
                                           uint32_t* r2) {                                                     \
    const V mul_a = SET1(kPhiloxRoundA), mul_b = SET1(kPhiloxRoundB);                                          \
    V x0[kRegs], x1[kRegs], x2[kRegs], x3[kRegs];                                                              \
    for (int q = 0; q < kRegs; ++q) { /* round 0; register q: counters lo + LANES q + lane */                 \
      const V pa = MUL(ADD(SET1(static_cast<long long>(lo) + LANES * q), COUNTING), mul_a);                    \
      x0[q] = run.x0;                                                                                          \
      x1[q] = run.x1;                                                                                          \
      x2[q] = XOR(SRL(pa, 32), run.x2_key);                                                                    \
      x3[q] = pa;                                                                                              \
    }                                                                                                          \
    for (int round = 1; round < 10; ++round) {                                                                 \
      for (int q = 0; q < kRegs; ++q) {                                                                        \
        const V pb = MUL(x2[q], mul_b), pa = MUL(x0[q], mul_a);                                                \
        x0[q] = XOR3(SRL(pb, 32), x1[q], run.keys[2 * round]);                                                 \
        x2[q] = XOR3(SRL(pa, 32), x3[q], run.keys[2 * round + 1]);                                             \
        x1[q] = pb;                                                                                            \
        x3[q] = pa;                                                                                            \
      }                                                                                                        \
    }                                                                                                          \
    for (int q = 0; q < kRegs; ++q) {                                                                          \
      STORE(r0 + LANES * q, x0[q]);                                                                            \
      STORE(r1 + LANES * q, x1[q]);                                                                            \
      STORE(r2 + LANES * q, x2[q]);                                                                            \
    }                                                                                                          \
  }                                                                                                            \
                                                                                                               \
  TARGET void philox_run_##SUFFIX(uint64_t seed, uint32_t lo, uint32_t hi, uint32_t c2, uint32_t c3, int64_t n, \
                                  uint32_t* r0, uint32_t* r1, uint32_t* r2) {                                  \
    thread_local PhiloxRun<V> run;                                                                             \
    if (!run.made || run.seed != seed || run.hi != hi || run.c2 != c2 || run.c3 != c3) {                       \
      uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);                       \
      for (int round = 0; round < 10; ++round, k0 += kPhiloxKeyA, k1 += kPhiloxKeyB) {                         \
        run.keys[2 * round] = SET1(k0);                                                                        \
        run.keys[2 * round + 1] = SET1(k1);                                                                    \
      }                                                                                                        \
      const uint64_t pb = static_cast<uint64_t>(c2) * kPhiloxRoundB;                                           \
      run.x0 = SET1(static_cast<uint32_t>(pb >> 32) ^ hi ^ static_cast<uint32_t>(seed));                       \
      run.x1 = SET1(static_cast<uint32_t>(pb));                                                                \
      run.x2_key = SET1(c3 ^ static_cast<uint32_t>(seed >> 32));                                               \
      run.seed = seed;                                                                                         \
      run.hi = hi;                                                                                             \
      run.c2 = c2;                                                                                             \
      run.c3 = c3;                                                                                             \
      run.made = true;                                                                                         \
    }                                                                                                          \
    int64_t k = 0;                                                                                             \
    for (; k + LANES * REGISTERS <= n; k += LANES * REGISTERS)                                                 \
      philox_block_##SUFFIX<REGISTERS>(run, lo + static_cast<uint32_t>(k), r0 + k, r1 + k, r2 + k);            \
    for (; k + LANES <= n; k += LANES)                                                                         \
      philox_block_##SUFFIX<1>(run, lo + static_cast<uint32_t>(k), r0 + k, r1 + k, r2 + k);                    \
    if (k < n) { /* the last counters: one more block into a vector's worth of words, the rest dropped */    \
      alignas(64) uint32_t t0[LANES], t1[LANES], t2[LANES];                                                    \
      philox_block_##SUFFIX<1>(run, lo + static_cast<uint32_t>(k), t0, t1, t2);                                \
      std::copy_n(t0, n - k, r0 + k);                                                                          \
      std::copy_n(t1, n - k, r1 + k);                                                                          \
      std::copy_n(t2, n - k, r2 + k);                                                                          \
    }                                                                                                          \
  }

ZF_TARGET_AVX512 inline __m512i xor3_512(__m512i a, __m512i b, __m512i c) {
  return _mm512_ternarylogic_epi64(a, b, c, 0x96);
}
ZF_TARGET_AVX512 inline void store_words_512(uint32_t* out, __m512i x) {  // the 8 low halves
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi64_epi32(x));
}
ZF_TARGET_AVX2 inline __m256i xor3_256(__m256i a, __m256i b, __m256i c) {
  return _mm256_xor_si256(_mm256_xor_si256(a, b), c);
}
ZF_TARGET_AVX2 inline void store_words_256(uint32_t* out, __m256i x) {  // the 4 low halves
  const __m256i low_halves = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(x, low_halves)));
}
ZF_TARGET_AVX512 inline __m512i set1_512(long long v) { return _mm512_set1_epi64(v); }
ZF_TARGET_AVX2 inline __m256i set1_256(long long v) { return _mm256_set1_epi64x(v); }

ZF_PHILOX_KERNELS(avx512, ZF_TARGET_AVX512, __m512i, 8, 4, set1_512, _mm512_add_epi64, _mm512_mul_epu32,
                  _mm512_srli_epi64, _mm512_xor_si512, xor3_512, _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7),
                  store_words_512)
ZF_PHILOX_KERNELS(avx2, ZF_TARGET_AVX2, __m256i, 4, 3, set1_256, _mm256_add_epi64, _mm256_mul_epu32,
                  _mm256_srli_epi64, _mm256_xor_si256, xor3_256, _mm256_setr_epi64x(0, 1, 2, 3), store_words_256)
#undef ZF_PHILOX_KERNELS

#endif
// Words of counters (first + k, c2, c3), k < n, with `run` for the carry-free part.
inline void philox_words(uint64_t seed, uint64_t first, uint32_t c2, uint32_t c3, int64_t n, uint32_t* r0,
                         uint32_t* r1, uint32_t* r2, PhiloxRunFn run) {
  const uint32_t lo = static_cast<uint32_t>(first), hi = static_cast<uint32_t>(first >> 32);
  if (n > 0 && static_cast<uint64_t>(lo) + static_cast<uint64_t>(n - 1) <= 0xFFFFFFFFull) {
    run(seed, lo, hi, c2, c3, n, r0, r1, r2);
    return;
  }
  for (int64_t k = 0; k < n; ++k) {  // the low word carries inside the run: the header, per element
    const uint64_t c = first + static_cast<uint64_t>(k);
    const zoneout::Philox4 r =
        zoneout::philox4x32_10(seed, static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), c2, c3);
    r0[k] = r.r0;
    r1[k] = r.r1;
    r2[k] = r.r2;
  }
}

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

// Independent / shared modes (the default): the counters of a chunk are consecutive
// (n_elem = (t B + b) H + j, stream 0), so the words come from philox_words; the masks from them
// by zoneout::element_masks' rule for these two modes (word 0: c, word 1 or 0: h, word 2: dropout),
// each u < z compared as a folded word against its bound (below).
inline void stream0_words(const ZoneoutParams& p, int64_t t, int64_t b, int64_t j0, int64_t n, uint32_t* w0,
                          uint32_t* w1, uint32_t* w2, PhiloxRunFn run) {
  const uint32_t key2 = static_cast<uint32_t>(2 * p.layer + p.direction);
  const uint64_t first = static_cast<uint64_t>((t * p.batch + b) * p.hidden + j0);
  philox_words(p.seed, first, key2, 0u, n, w0, w1, w2, run);
}

// The header maps a Philox word to a uniform u = uint32_to_uniform(word) and keeps a unit where
// u < z. That conversion scales the word "folded" (its bits inverted when the top bit is set), an
// integer in [0, 2^31), by two roundings that never decrease, so u < z holds exactly for the folded
// words up to one bound: the CPU rows compare folded words with it (folded_word_at_most here, and
// select_by_word in vector_math.h on vectors) rather than forming each uniform.
inline bool folded_word_at_most(uint32_t word, int32_t last) {
  const int32_t x = static_cast<int32_t>(word);
  return (x ^ (x >> 31)) <= last;
}

// That bound for z: the largest folded word whose uniform is below z, -1 where there is none; a
// bisection over [0, 2^31) with the header's own uint32_to_uniform.
ZF_NOINLINE int32_t last_word_below(float z) {
  const auto below = [z](int64_t x) { return zoneout::uint32_to_uniform(static_cast<uint32_t>(x)) < z; };
  if (!below(0)) return -1;
  int64_t lo = 0, hi = int64_t(1) << 31;  // below(lo); hi: past the last word or not below
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    (below(mid) ? lo : hi) = mid;
  }
  return static_cast<int32_t>(lo);
}

// The bounds of a call's probabilities (rounded to float, as the header compares them), kept per
// thread for the last probabilities seen: the bisections run once per layer call and thread, not per row.
struct WordBounds {
  float z_cell = -1.0f, z_hidden = -1.0f, p_drop = -1.0f;
  int32_t cell = -1, hidden = -1, dropout = -1;
};

inline const WordBounds& word_bounds(const ZoneoutParams& p) {
  thread_local WordBounds bounds;
  const float z_cell = static_cast<float>(p.zoneout_cell), z_hidden = static_cast<float>(p.zoneout_hidden);
  const float p_drop = static_cast<float>(p.recurrent_dropout);
  if (z_cell != bounds.z_cell || z_hidden != bounds.z_hidden || p_drop != bounds.p_drop) {
    bounds = {z_cell, z_hidden, p_drop, last_word_below(z_cell), last_word_below(z_hidden), last_word_below(p_drop)};
  }
  return bounds;
}

template <typename scalar_t, int kMode>
ZF_ALWAYS_INLINE void draw_masks_stream0(MaskChunk<scalar_t>& out, const ZoneoutParams& p, int64_t t, int64_t b,
                                         int64_t j0, int64_t n, PhiloxRunFn run) {
  uint32_t w0[kChunk], w1[kChunk], w2[kChunk];
  stream0_words(p, t, b, j0, n, w0, w1, w2, run);
  const WordBounds& bound = word_bounds(p);
  const uint32_t* hidden_words = kMode == zoneout::kIndependent ? w1 : w0;
  const bool dropout = p.recurrent_dropout > 0.0;
  const scalar_t kept_scale = zoneout::kept_update_scale<scalar_t>(p.recurrent_dropout);
  for (int64_t k = 0; k < n; ++k) {
    out.keep_cell[k] = folded_word_at_most(w0[k], bound.cell) ? scalar_t(1) : scalar_t(0);
    out.keep_hidden[k] = folded_word_at_most(hidden_words[k], bound.hidden) ? scalar_t(1) : scalar_t(0);
    out.update_scale[k] = dropout && folded_word_at_most(w2[k], bound.dropout) ? scalar_t(0) : kept_scale;
  }
}

// Masks of units j0 .. j0+n-1 of example b at step t (n <= kChunk).
template <typename scalar_t>
ZF_ALWAYS_INLINE void chunk_masks(MaskChunk<scalar_t>& out, const ZoneoutParams& p, int64_t t, int64_t b,
                                  int64_t j0, int64_t n, PhiloxRunFn run) {
  if (!p.training) {  // the expectations: one constant for every unit
    const auto m = zoneout::element_masks<scalar_t>(p, t, b, j0);
    std::fill_n(out.keep_cell, n, m.keep_cell);
    std::fill_n(out.keep_hidden, n, m.keep_hidden);
    std::fill_n(out.update_scale, n, m.update_scale);
    return;
  }
  switch (p.mask_mode) {
    case zoneout::kIndependent: draw_masks_stream0<scalar_t, zoneout::kIndependent>(out, p, t, b, j0, n, run); break;
    case zoneout::kShared: draw_masks_stream0<scalar_t, zoneout::kShared>(out, p, t, b, j0, n, run); break;
    case zoneout::kTimestep: draw_masks<scalar_t, zoneout::kTimestep>(out, p, t, b, j0, n); break;
    default: draw_masks<scalar_t, zoneout::kStatic>(out, p, t, b, j0, n); break;
  }
}

// The row kernels below each repeat the same chunk loop (draw a chunk's masks, then the
// element math over it) on purpose: folded into one helper taking the element math as a
// lambda, the element loops stopped vectorizing (the lambda's captured pointers are no longer
// __restrict) and the LSTM's fwd+bwd took 1.7x as long (measured, B=64 T=50 H=128).

// Forward of units [j0, j1) of one active example row. g: the row's pre-activations
// [4H] in, activations out; hp, cp: h_{t-1}, c_{t-1}; yo, co: h_t, c_t.
template <typename scalar_t>
ZF_ALWAYS_INLINE void forward_row(scalar_t* __restrict g, const scalar_t* __restrict hp,
                                  const scalar_t* __restrict cp, scalar_t* __restrict yo, scalar_t* __restrict co,
                                  int64_t t, int64_t b, int64_t j0, int64_t j1, const ZoneoutParams& p,
                                  PhiloxRunFn run) {
  const int64_t hidden = p.hidden;
  MaskChunk<scalar_t> masks;
  for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, j1 - c0);
    chunk_masks(masks, p, t, b, c0, n, run);
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
                                   const ZoneoutParams& p, PhiloxRunFn run) {
  const int64_t hidden = p.hidden;
  MaskChunk<scalar_t> masks;
  for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, j1 - c0);
    chunk_masks(masks, p, t, b, c0, n, run);
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

#if defined(ZF_X86_PHILOX)
// The vector rows (below) cover units [j0, end) of a row's [j0, j1) in whole vectors; the units
// past `end` take the scalar rows: H % lanes of them, the same units for any thread count (each
// thread's range starts at a multiple of the lanes).
template <typename V>
inline int64_t vector_rows_end(int64_t j0, int64_t j1) {
  return j0 + (j1 - j0) / V::kLanes * V::kLanes;
}

// body(j, masks) for units j = j0, j0 + kLanes, ... < end (whole vectors) of example b at step t,
// masks: those of units [j, j + kLanes), drawn a chunk at a time by chunk_masks (every mask mode),
// then read as vectors. (The body can be a lambda here, unlike in the scalar rows above: these are
// vectors already, nothing is left to the vectorizer.)
template <typename V, typename Body>
ZF_ALWAYS_INLINE void for_unit_vectors(const ZoneoutParams& p, int64_t t, int64_t b, int64_t j0, int64_t end,
                                       PhiloxRunFn run, const Body& body) {
  if (p.training && (p.mask_mode == zoneout::kIndependent || p.mask_mode == zoneout::kShared)) {
    // draw_masks_stream0's mapping, in registers (select_by_word): no trip through a mask chunk on
    // the stack (B=64 T=50 H=128, 1 thread: with uniforms formed per word, the masks took a quarter
    // of what zoneout adds to the forward).
    const WordBounds& bound = word_bounds(p);
    const V one(1.0f), zero(0.0f), kept(zoneout::kept_update_scale<float>(p.recurrent_dropout));
    const bool dropout = p.recurrent_dropout > 0.0;
    alignas(64) uint32_t w0[kChunk], w1[kChunk], w2[kChunk];
    const uint32_t* hidden_words = p.mask_mode == zoneout::kIndependent ? w1 : w0;
    for (int64_t c0 = j0; c0 < end; c0 += kChunk) {
      const int64_t n = std::min(kChunk, end - c0);
      stream0_words(p, t, b, c0, n, w0, w1, w2, run);
      for (int64_t k = 0; k < n; k += V::kLanes) {
        body(c0 + k, zoneout::ElementMasks<V>{
                         V::select_by_word(w0 + k, bound.cell, one, zero),
                         V::select_by_word(hidden_words + k, bound.hidden, one, zero),
                         dropout ? V::select_by_word(w2 + k, bound.dropout, zero, kept) : kept});
      }
    }
    return;
  }
  alignas(64) MaskChunk<float> masks;
  for (int64_t c0 = j0; c0 < end; c0 += kChunk) {
    const int64_t n = std::min(kChunk, end - c0);
    chunk_masks(masks, p, t, b, c0, n, run);
    for (int64_t k = 0; k < n; k += V::kLanes) {
      body(c0 + k, zoneout::ElementMasks<V>{V::load(masks.keep_cell + k), V::load(masks.keep_hidden + k),
                                            V::load(masks.update_scale + k)});
    }
  }
}

// body(masks) for the last units [j, j + n) of a row, fewer than a vector (n < V::kLanes): their
// masks as one vector, lanes past n zero. The caller runs the vector element math on copies of the
// units padded to one vector (TailAt), so every unit gets the same math as in the whole vectors.
// Before, the scalar rows ran these units with libm's expm1f and tanhf and the header's scalar
// Philox, slowly: at pMNIST's layer, B=100 T=784 I=1 H=100 (4 units of every 100), the forward took
// 41.4 ms before and 37.4 after, fwd+bwd 122 and 115-118; B=32 T=50 I=64 H=150 fwd+bwd 4.36 and 3.90.
template <typename V, typename Body>
ZF_ALWAYS_INLINE void for_tail_vector(const ZoneoutParams& p, int64_t t, int64_t b, int64_t j, int64_t n,
                                      PhiloxRunFn run, const Body& body) {
  alignas(64) MaskChunk<float> masks;
  chunk_masks(masks, p, t, b, j, n, run);
  std::fill(masks.keep_cell + n, masks.keep_cell + V::kLanes, 0.0f);
  std::fill(masks.keep_hidden + n, masks.keep_hidden + V::kLanes, 0.0f);
  std::fill(masks.update_scale + n, masks.update_scale + V::kLanes, 0.0f);
  body(zoneout::ElementMasks<V>{V::load(masks.keep_cell), V::load(masks.keep_hidden), V::load(masks.update_scale)});
}

// Where a row kernel's element math reads and writes its V::kLanes units (load(ptr) reads them from
// the row at ptr, store(v, ptr) writes them there): at unit j of a whole vector (UnitsAt), or the
// last n < V::kLanes units from j through a zero-padded copy (TailAt).
template <typename V>
struct UnitsAt {
  int64_t j;
  ZF_ALWAYS_INLINE V load(const float* row) const { return V::load(row + j); }
  ZF_ALWAYS_INLINE void store(const V& v, float* row) const { v.store(row + j); }
};
template <typename V>
struct TailAt {
  int64_t j, n;
  ZF_ALWAYS_INLINE V load(const float* row) const {
    alignas(64) float lanes[V::kLanes] = {};
    std::copy_n(row + j, n, lanes);
    return V::load(lanes);
  }
  ZF_ALWAYS_INLINE void store(const V& v, float* row) const {
    alignas(64) float lanes[V::kLanes];
    v.store(lanes);
    std::copy_n(lanes, n, row + j);
  }
};

// The LSTM's element math on the V::kLanes units `at` names (rows as in forward_row / backward_row).
template <typename V, typename At>
ZF_ALWAYS_INLINE void forward_units(const At& at, float* __restrict g, const float* __restrict hp,
                                    const float* __restrict cp, float* __restrict yo, float* __restrict co,
                                    int64_t hidden, const zoneout::ElementMasks<V>& m) {
  const auto r = zoneout::cell_forward<V>(at.load(g), at.load(g + hidden), at.load(g + 2 * hidden),
                                          at.load(g + 3 * hidden), at.load(cp), at.load(hp), m);
  at.store(r.i, g);
  at.store(r.f, g + hidden);
  at.store(r.g, g + 2 * hidden);
  at.store(r.o, g + 3 * hidden);
  at.store(r.h, yo);
  at.store(r.c, co);
}

template <typename V, typename At>
ZF_ALWAYS_INLINE void backward_units(const At& at, const float* __restrict g, const float* __restrict gy,
                                     const float* __restrict cp, float* __restrict dh, float* __restrict dc,
                                     float* __restrict dp, int64_t hidden, const zoneout::ElementMasks<V>& m) {
  const auto r = zoneout::cell_backward<V>(at.load(gy) + at.load(dh), at.load(dc), at.load(g), at.load(g + hidden),
                                           at.load(g + 2 * hidden), at.load(g + 3 * hidden), at.load(cp), m);
  at.store(r.d_pre_i, dp);
  at.store(r.d_pre_f, dp + hidden);
  at.store(r.d_pre_g, dp + 2 * hidden);
  at.store(r.d_pre_o, dp + 3 * hidden);
  at.store(r.dh_prev_direct, dh);
  at.store(r.dc_prev, dc);
}

// forward_row and backward_row for float32 on the vector types of vector_math.h: the same
// cell_forward / cell_backward, V::kLanes units at a time, each written once for the whole vectors and
// the last units of a row (UnitsAt, TailAt; for_tail_vector).
template <typename V>
ZF_ALWAYS_INLINE void forward_row_vector(float* __restrict g, const float* __restrict hp,
                                         const float* __restrict cp, float* __restrict yo, float* __restrict co,
                                         int64_t t, int64_t b, int64_t j0, int64_t j1, const ZoneoutParams& p,
                                         PhiloxRunFn run) {
  const int64_t hidden = p.hidden, end = vector_rows_end<V>(j0, j1);
  for_unit_vectors<V>(p, t, b, j0, end, run, [&](int64_t j, const zoneout::ElementMasks<V>& m) {
    forward_units(UnitsAt<V>{j}, g, hp, cp, yo, co, hidden, m);
  });
  if (end < j1) {
    for_tail_vector<V>(p, t, b, end, j1 - end, run, [&](const zoneout::ElementMasks<V>& m) {
      forward_units(TailAt<V>{end, j1 - end}, g, hp, cp, yo, co, hidden, m);
    });
  }
}

template <typename V>
ZF_ALWAYS_INLINE void backward_row_vector(const float* __restrict g, const float* __restrict gy,
                                          const float* __restrict cp, float* __restrict dh, float* __restrict dc,
                                          float* __restrict dp, int64_t t, int64_t b, int64_t j0, int64_t j1,
                                          const ZoneoutParams& p, PhiloxRunFn run) {
  const int64_t hidden = p.hidden, end = vector_rows_end<V>(j0, j1);
  for_unit_vectors<V>(p, t, b, j0, end, run, [&](int64_t j, const zoneout::ElementMasks<V>& m) {
    backward_units(UnitsAt<V>{j}, g, gy, cp, dh, dc, dp, hidden, m);
  });
  if (end < j1) {
    for_tail_vector<V>(p, t, b, end, j1 - end, run, [&](const zoneout::ElementMasks<V>& m) {
      backward_units(TailAt<V>{end, j1 - end}, g, gy, cp, dh, dc, dp, hidden, m);
    });
  }
}
#endif

// GRU forward of units [j0, j1) of one active example row. xp, hp: the row's input and
// recurrent parts [3H] (r, u, n; biases included); g: the row's saved gates [4H] out
// (r, u, n, hp_n); yo: h_t.
template <typename scalar_t>
ZF_ALWAYS_INLINE void gru_forward_row(const scalar_t* __restrict xp, const scalar_t* __restrict hp,
                                      const scalar_t* __restrict h_prev, scalar_t* __restrict g,
                                      scalar_t* __restrict yo, int64_t t, int64_t b, int64_t j0, int64_t j1,
                                      const ZoneoutParams& p, PhiloxRunFn run) {
  const int64_t hidden = p.hidden;
  MaskChunk<scalar_t> masks;
  for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, j1 - c0);
    chunk_masks(masks, p, t, b, c0, n, run);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t j = c0 + k;
      const auto r = zoneout::gru_forward<scalar_t>(xp[j], xp[hidden + j], xp[2 * hidden + j], hp[j],
                                                    hp[hidden + j], hp[2 * hidden + j], h_prev[j], masks[k]);
      g[j] = r.r;
      g[hidden + j] = r.u;
      g[2 * hidden + j] = r.n;
      g[3 * hidden + j] = r.hp_n;
      yo[j] = r.h;
    }
  }
}

// GRU backward of units [j0, j1) of one active example row. dh as in backward_row; dx, dhh:
// the row's gradients of the input part (d_r, d_u, d_n) and of the recurrent part
// (d_r, d_u, d_hp_n) [3H].
template <typename scalar_t>
ZF_ALWAYS_INLINE void gru_backward_row(const scalar_t* __restrict g, const scalar_t* __restrict gy,
                                       const scalar_t* __restrict h_prev, scalar_t* __restrict dh,
                                       scalar_t* __restrict dx, scalar_t* __restrict dhh, int64_t t, int64_t b,
                                       int64_t j0, int64_t j1, const ZoneoutParams& p, PhiloxRunFn run) {
  const int64_t hidden = p.hidden;
  MaskChunk<scalar_t> masks;
  for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, j1 - c0);
    chunk_masks(masks, p, t, b, c0, n, run);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t j = c0 + k;
      const auto r = zoneout::gru_backward<scalar_t>(gy[j] + dh[j], g[j], g[hidden + j], g[2 * hidden + j],
                                                     g[3 * hidden + j], h_prev[j], masks[k]);
      dx[j] = dhh[j] = r.d_r;
      dx[hidden + j] = dhh[hidden + j] = r.d_u;
      dx[2 * hidden + j] = r.d_n;
      dhh[2 * hidden + j] = r.d_hp_n;
      dh[j] = r.dh_prev_direct;
    }
  }
}

// RNN forward of units [j0, j1) of one active example row: g holds the pre-activations [H]
// in and the candidates h~ out.
template <typename scalar_t, bool kRelu>
ZF_ALWAYS_INLINE void rnn_forward_row(scalar_t* __restrict g, const scalar_t* __restrict h_prev,
                                      scalar_t* __restrict yo, int64_t t, int64_t b, int64_t j0, int64_t j1,
                                      const ZoneoutParams& p, PhiloxRunFn run) {
  MaskChunk<scalar_t> masks;
  for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, j1 - c0);
    chunk_masks(masks, p, t, b, c0, n, run);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t j = c0 + k;
      const auto r = zoneout::rnn_forward<scalar_t>(kRelu, g[j], h_prev[j], masks[k]);
      g[j] = r.candidate;
      yo[j] = r.h;
    }
  }
}

// RNN backward of units [j0, j1) of one active example row; dp: the pre-activation gradient.
template <typename scalar_t, bool kRelu>
ZF_ALWAYS_INLINE void rnn_backward_row(const scalar_t* __restrict g, const scalar_t* __restrict gy,
                                       scalar_t* __restrict dh, scalar_t* __restrict dp, int64_t t, int64_t b,
                                       int64_t j0, int64_t j1, const ZoneoutParams& p, PhiloxRunFn run) {
  MaskChunk<scalar_t> masks;
  for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, j1 - c0);
    chunk_masks(masks, p, t, b, c0, n, run);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t j = c0 + k;
      const auto r = zoneout::rnn_backward<scalar_t>(kRelu, gy[j] + dh[j], g[j], masks[k]);
      dp[j] = r.d_pre;
      dh[j] = r.dh_prev_direct;
    }
  }
}

// ---------------------------------------------------------------------------------------
// One copy of the row kernels per instruction set, gathered in a table (CpuKernels); the
// copies differ only in what the compiler may use (FMA contraction, vector width, libmvec
// variants), so their results agree to rounding, and their masks bit for bit.
// ---------------------------------------------------------------------------------------
#define ZF_ROW_ARGS int64_t t, int64_t b, int64_t j0, int64_t j1, const ZoneoutParams& p
template <typename scalar_t>
struct RowKernels {
  void (*lstm_forward)(scalar_t* g, const scalar_t* hp, const scalar_t* cp, scalar_t* yo, scalar_t* co, ZF_ROW_ARGS);
  void (*lstm_backward)(const scalar_t* g, const scalar_t* gy, const scalar_t* cp, scalar_t* dh, scalar_t* dc,
                        scalar_t* dp, ZF_ROW_ARGS);
  void (*gru_forward)(const scalar_t* xp, const scalar_t* hp, const scalar_t* h_prev, scalar_t* g, scalar_t* yo,
                      ZF_ROW_ARGS);
  void (*gru_backward)(const scalar_t* g, const scalar_t* gy, const scalar_t* h_prev, scalar_t* dh, scalar_t* dx,
                       scalar_t* dhh, ZF_ROW_ARGS);
  void (*rnn_forward[2])(scalar_t* g, const scalar_t* h_prev, scalar_t* yo, ZF_ROW_ARGS);  // [tanh, relu]
  void (*rnn_backward[2])(const scalar_t* g, const scalar_t* gy, scalar_t* dh, scalar_t* dp, ZF_ROW_ARGS);
};

struct CpuKernels {
  PhiloxRunFn philox_run;
  RowKernels<float> f32;
  RowKernels<double> f64;
  const RowKernels<float>& rows(const float*) const { return f32; }
  const RowKernels<double>& rows(const double*) const { return f64; }
};

// Wrappers compiled for one instruction set: the row kernels inline into them.
// VECTOR: the float32 vector type of vector_math.h for the LSTM rows, or void (none: the compiler
// vectorizes the scalar code).
#define ZF_ROW_KERNELS(SUFFIX, TARGET, PHILOX_RUN, VECTOR)                                                           \
  template <typename scalar_t>                                                                                      \
  TARGET ZF_FLATTEN void lstm_forward_##SUFFIX(scalar_t* g, const scalar_t* hp, const scalar_t* cp, scalar_t* yo,  \
                                               scalar_t* co, ZF_ROW_ARGS) {                                         \
    if constexpr (std::is_same_v<scalar_t, float> && !std::is_void_v<VECTOR>) {                                    \
      forward_row_vector<VECTOR>(g, hp, cp, yo, co, t, b, j0, j1, p, PHILOX_RUN);                                   \
    } else {                                                                                                        \
      forward_row<scalar_t>(g, hp, cp, yo, co, t, b, j0, j1, p, PHILOX_RUN);                                        \
    }                                                                                                               \
  }                                                                                                                 \
  template <typename scalar_t>                                                                                      \
  TARGET ZF_FLATTEN void lstm_backward_##SUFFIX(const scalar_t* g, const scalar_t* gy, const scalar_t* cp,         \
                                                scalar_t* dh, scalar_t* dc, scalar_t* dp, ZF_ROW_ARGS) {            \
    if constexpr (std::is_same_v<scalar_t, float> && !std::is_void_v<VECTOR>) {                                    \
      backward_row_vector<VECTOR>(g, gy, cp, dh, dc, dp, t, b, j0, j1, p, PHILOX_RUN);                              \
    } else {                                                                                                        \
      backward_row<scalar_t>(g, gy, cp, dh, dc, dp, t, b, j0, j1, p, PHILOX_RUN);                                   \
    }                                                                                                               \
  }                                                                                                                 \
  template <typename scalar_t>                                                                                      \
  TARGET void gru_forward_##SUFFIX(const scalar_t* xp, const scalar_t* hp, const scalar_t* h_prev, scalar_t* g,    \
                                   scalar_t* yo, ZF_ROW_ARGS) {                                                     \
    gru_forward_row<scalar_t>(xp, hp, h_prev, g, yo, t, b, j0, j1, p, PHILOX_RUN);                                  \
  }                                                                                                                 \
  template <typename scalar_t>                                                                                      \
  TARGET void gru_backward_##SUFFIX(const scalar_t* g, const scalar_t* gy, const scalar_t* h_prev, scalar_t* dh,   \
                                    scalar_t* dx, scalar_t* dhh, ZF_ROW_ARGS) {                                     \
    gru_backward_row<scalar_t>(g, gy, h_prev, dh, dx, dhh, t, b, j0, j1, p, PHILOX_RUN);                            \
  }                                                                                                                 \
  template <typename scalar_t, bool kRelu>                                                                          \
  TARGET void rnn_forward_##SUFFIX(scalar_t* g, const scalar_t* h_prev, scalar_t* yo, ZF_ROW_ARGS) {                \
    rnn_forward_row<scalar_t, kRelu>(g, h_prev, yo, t, b, j0, j1, p, PHILOX_RUN);                                   \
  }                                                                                                                 \
  template <typename scalar_t, bool kRelu>                                                                          \
  TARGET void rnn_backward_##SUFFIX(const scalar_t* g, const scalar_t* gy, scalar_t* dh, scalar_t* dp,             \
                                    ZF_ROW_ARGS) {                                                                  \
    rnn_backward_row<scalar_t, kRelu>(g, gy, dh, dp, t, b, j0, j1, p, PHILOX_RUN);                                  \
  }                                                                                                                 \
  template <typename scalar_t>                                                                                      \
  constexpr RowKernels<scalar_t> row_kernels_##SUFFIX() {                                                           \
    return {lstm_forward_##SUFFIX<scalar_t>,                                                                        \
            lstm_backward_##SUFFIX<scalar_t>,                                                                       \
            gru_forward_##SUFFIX<scalar_t>,                                                                         \
            gru_backward_##SUFFIX<scalar_t>,                                                                        \
            {rnn_forward_##SUFFIX<scalar_t, false>, rnn_forward_##SUFFIX<scalar_t, true>},                          \
            {rnn_backward_##SUFFIX<scalar_t, false>, rnn_backward_##SUFFIX<scalar_t, true>}};                       \
  }                                                                                                                 \
  constexpr CpuKernels kKernels_##SUFFIX = {PHILOX_RUN, row_kernels_##SUFFIX<float>(), row_kernels_##SUFFIX<double>()};

#define ZF_NO_TARGET
ZF_ROW_KERNELS(scalar, ZF_NO_TARGET, philox_run_scalar, void)
#if defined(ZF_X86_PHILOX)
ZF_ROW_KERNELS(avx2, ZF_TARGET_AVX2_FMA, philox_run_avx2, F32x8)
ZF_ROW_KERNELS(avx512, ZF_TARGET_AVX512, philox_run_avx512, F32x16)
#endif
#undef ZF_ROW_KERNELS
#undef ZF_NO_TARGET
#undef ZF_ROW_ARGS

bool isa_supported(int64_t isa) {
#if defined(ZF_X86_PHILOX)
  __builtin_cpu_init();
  switch (isa) {
    case kIsaScalar: return true;
    case kIsaAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");  // every AVX2 x86 has both
    case kIsaAvx512: return __builtin_cpu_supports("avx512f");
    default: return false;
  }
#else
  return isa == kIsaScalar;
#endif
}

const CpuKernels& kernels_for(int64_t isa) {
#if defined(ZF_X86_PHILOX)
  if (isa == kIsaAvx512) return kKernels_avx512;
  if (isa == kIsaAvx2) return kKernels_avx2;
#endif
  return kKernels_scalar;
}

int64_t best_isa() {
  for (int64_t isa = kIsaAvx512; isa > kIsaScalar; --isa)
    if (isa_supported(isa)) return isa;
  return kIsaScalar;
}

// ZONEOUT_FUSED_CPU_ISA = auto | scalar | avx2 | avx512; a value this CPU cannot run is
// reported by the first kernel call (a Python RuntimeError), not at load.
std::string environment_isa_error;
int64_t isa_from_environment() {
  const char* value = std::getenv("ZONEOUT_FUSED_CPU_ISA");
  if (value == nullptr || std::string(value).empty() || std::string(value) == "auto") return best_isa();
  for (int64_t isa = kIsaScalar; isa <= kIsaAvx512; ++isa) {
    if (std::string(value) != isa_name(isa)) continue;
    if (isa_supported(isa)) return isa;
    environment_isa_error = std::string("ZONEOUT_FUSED_CPU_ISA=") + value + ": this CPU (or build) cannot run it";
    return best_isa();
  }
  environment_isa_error =
      std::string("ZONEOUT_FUSED_CPU_ISA=") + value + " is not one of auto, scalar, avx2, avx512";
  return best_isa();
}

std::atomic<int64_t> active_isa{isa_from_environment()};

const CpuKernels& active_kernels() {
  TORCH_CHECK(environment_isa_error.empty(), environment_isa_error);
  return kernels_for(active_isa.load(std::memory_order_relaxed));
}

// Runs active(b, j0, j1) on the row segments of the step's [B, H] elements whose sequence is
// still running at position t and inactive(b, j0, j1) on the others, in parallel.
template <typename Active, typename Inactive>
void for_step_rows(const ZoneoutParams& p, const int64_t* lengths, int64_t t, const Active& active,
                   const Inactive& inactive) {
  const int64_t hidden = p.hidden;
  at::parallel_for(0, p.batch * hidden, kGrain, [&](int64_t begin, int64_t end) {
    for_row_segments(begin, end, hidden, [&](int64_t b, int64_t j0, int64_t j1) {
      if (zoneout::step_active(t, lengths, b)) {
        active(b, j0, j1);
      } else {
        inactive(b, j0, j1);
      }
    });
  });
}

// Past a sequence's end the state is copied through (copy_row), its saved gates and
// pre-activation gradients are zero (zero_columns: `columns` blocks of H per row), and the
// gradient reaching h_t passes on to h_{t-1} (add_row).
template <typename scalar_t>
inline void copy_row(scalar_t* out, const scalar_t* in, int64_t j0, int64_t j1) {
  std::copy(in + j0, in + j1, out + j0);
}

template <typename scalar_t>
inline void zero_columns(scalar_t* row, int64_t columns, int64_t hidden, int64_t j0, int64_t j1) {
  for (int64_t q = 0; q < columns; ++q) std::fill(row + q * hidden + j0, row + q * hidden + j1, scalar_t(0));
}

template <typename scalar_t>
inline void add_row(scalar_t* out, const scalar_t* in, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) out[j] += in[j];
}

// Buffers alive only during a call: the backward passes' pre-activation gradients (as large as the
// saved gates) and the fused loop's packed weights. Fresh per call, their release let glibc trim the
// heap, so the next call faulted every page in again (measured, B=32 T=50 I=H=64 fwd+bwd through
// the module: ~900 page faults and 2.7 ms per call, against 0.3 and 1.6 ms with the buffer kept;
// nn.LSTM: 0 and 1.4 ms; packing a 2048 x 512 weight: 0.6 ms, nearly all page faults). So each
// thread keeps one buffer per slot, of up to kScratchBytes (larger ones are allocated per call:
// there the faults are a small part of the time). A slot holds one buffer in use at a time, which
// must not outlive the call.
enum ScratchSlot {
  kScratchGradients = 0,
  kScratchRecurrentGradients = 1,
  kScratchPanels = 2,
  kScratchInputPanels = 3,
  kScratchSlots = 4
};
constexpr int64_t kScratchBytes = int64_t(64) << 20;

Tensor (&thread_scratch())[kScratchSlots] {
  thread_local Tensor buffers[kScratchSlots];
  return buffers;
}

Tensor scratch(ScratchSlot slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor(&buffers)[kScratchSlots] = thread_scratch();
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes > kScratchBytes) return at::empty(sizes, options);
  Tensor& buffer = buffers[slot];
  if (!buffer.defined() || buffer.numel() < bytes) buffer = at::empty({bytes}, options.dtype(at::kByte));
  return buffer.narrow(0, 0, bytes).view(options.dtype().toScalarType()).view(sizes);
}

// The forwards' large outputs (y, and the c_seq and gates kept for backward) live until autograd
// frees the graph. Allocated fresh, the pages of each call's buffers faulted in again on first
// write (glibc returns the freed top of its heap to the system): B=32 T=50 I=64 H=128, 120 faults
// a call, a fifth of the forward in a loop over one model (nn.LSTM's allocations happened not to
// fault there). So buffers of at least kPooledMinBytes come from a pool their tensors' deleter
// returns them to, which keeps up to kPoolBytes of them (beyond that a freed buffer goes back to
// the system); a request takes a pooled buffer of exactly its size (rounded up to kPoolRound) if
// there is one, the last freed first.
constexpr size_t kPoolBytes = size_t(64) << 20, kPooledMinBytes = size_t(256) << 10, kPoolRound = size_t(64) << 10;

struct BufferPool {
  std::mutex mutex;
  std::vector<std::pair<size_t, void*>> buffers;  // (bytes, buffer), free for the taking
  size_t bytes = 0;
};

BufferPool& buffer_pool() {
  static BufferPool* pool = new BufferPool();  // never destroyed: tensors may outlive the statics
  return *pool;
}

void return_to_pool(void* buffer, size_t bytes) {
  BufferPool& pool = buffer_pool();
  {
    std::lock_guard<std::mutex> lock(pool.mutex);
    if (pool.bytes + bytes <= kPoolBytes) {
      pool.buffers.emplace_back(bytes, buffer);
      pool.bytes += bytes;
      return;
    }
  }
  c10::free_cpu(buffer);
}

Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t wanted = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (wanted < kPooledMinBytes) return at::empty(sizes, options);
  const size_t bytes = (wanted + kPoolRound - 1) / kPoolRound * kPoolRound;
  void* buffer = nullptr;
  {
    BufferPool& pool = buffer_pool();
    std::lock_guard<std::mutex> lock(pool.mutex);
    for (auto it = pool.buffers.rbegin(); it != pool.buffers.rend(); ++it) {  // the last freed: warmest
      if (it->first == bytes) {
        buffer = it->second;
        pool.bytes -= bytes;
        pool.buffers.erase(std::next(it).base());
        break;
      }
    }
  }
  if (buffer == nullptr) buffer = c10::alloc_cpu(bytes);  // (at::empty's aligned allocation)
  return at::from_blob(buffer, sizes, [bytes](void* data) { return_to_pool(data, bytes); }, options);
}

}  // namespace

int64_t pooled_bytes() {
  BufferPool& pool = buffer_pool();
  std::lock_guard<std::mutex> lock(pool.mutex);
  return static_cast<int64_t>(pool.bytes);
}

void empty_cache() {
  for (Tensor& buffer : thread_scratch()) buffer.reset();
  BufferPool& pool = buffer_pool();
  std::lock_guard<std::mutex> lock(pool.mutex);
  for (const auto& entry : pool.buffers) c10::free_cpu(entry.second);
  pool.buffers.clear();
  pool.bytes = 0;
}

namespace {

// How grad W_hh = sum over steps of d_rec[t]^T h_{t-1} pairs rows (d_rec: [T, B, G*H], the gradient
// of h_{t-1} W_hh^T (+ b_hh)): h_{t-1} of step t is y of the previously processed step, h0 for the
// first one. So d_rec[first] pairs with h0, and the other T-1 steps of d_rec, from d_start, with T-1
// steps of y from y_start (direction 0: d_rec[1:] with y[:-1]; direction 1: d_rec[:-1] with y[1:]).
struct RecurrentPairing {
  int64_t first, d_start, y_start;
};

inline RecurrentPairing recurrent_pairing(int64_t steps, int direction) {
  return {step_position(0, steps, direction), direction == 0 ? 1 : 0, direction == 0 ? 0 : 1};
}

// grad W_hh straight from views (no operand copy), by oneDNN / ATen.
Tensor recurrent_weight_grad(const Tensor& d_rec, const Tensor& y, const Tensor& h0, int direction) {
  const int64_t steps = d_rec.size(0), batch = d_rec.size(1), rows = d_rec.size(2), hidden = h0.size(1);
  const RecurrentPairing pairing = recurrent_pairing(steps, direction);
  Tensor grad_w_hh = transposed_product(d_rec[pairing.first], h0);
  if (steps > 1) {
    const int64_t count = (steps - 1) * batch;
    const Tensor d_rest = d_rec.narrow(0, pairing.d_start, steps - 1).reshape({count, rows});
    const Tensor h_rest = y.narrow(0, pairing.y_start, steps - 1).view({count, hidden});
    grad_w_hh.add_(transposed_product(d_rest, h_rest));
  }
  return grad_w_hh;
}

// One LSTM step's fused element-wise forward: gates_t holds the pre-activations [B, 4H] and is
// overwritten with the activations; writes y[t] and c_seq[t].
template <typename scalar_t>
void forward_pointwise(scalar_t* gates_t, const scalar_t* h_prev, const scalar_t* c_prev, scalar_t* y_t,
                       scalar_t* c_t, const int64_t* lengths, int64_t t, const ZoneoutParams& p,
                       const CpuKernels& kernels) {
  const int64_t hidden = p.hidden;
  const auto row = kernels.rows(gates_t).lstm_forward;
  for_step_rows(
      p, lengths, t,
      [&](int64_t b, int64_t j0, int64_t j1) {
        row(gates_t + b * 4 * hidden, h_prev + b * hidden, c_prev + b * hidden, y_t + b * hidden, c_t + b * hidden,
            t, b, j0, j1, p);
      },
      [&](int64_t b, int64_t j0, int64_t j1) {
        copy_row(y_t + b * hidden, h_prev + b * hidden, j0, j1);
        copy_row(c_t + b * hidden, c_prev + b * hidden, j0, j1);
        zero_columns(gates_t + b * 4 * hidden, 4, hidden, j0, j1);
      });
}

// One LSTM step's fused element-wise backward (see backward_row for dh and dc).
template <typename scalar_t>
void backward_pointwise(const scalar_t* grad_y_t, const scalar_t* gates_t, const scalar_t* c_prev, scalar_t* dh,
                        scalar_t* dc, scalar_t* d_pre_t, const int64_t* lengths, int64_t t, const ZoneoutParams& p,
                        const CpuKernels& kernels) {
  const int64_t hidden = p.hidden;
  const auto row = kernels.rows(d_pre_t).lstm_backward;
  for_step_rows(
      p, lengths, t,
      [&](int64_t b, int64_t j0, int64_t j1) {
        row(gates_t + b * 4 * hidden, grad_y_t + b * hidden, c_prev + b * hidden, dh + b * hidden, dc + b * hidden,
            d_pre_t + b * 4 * hidden, t, b, j0, j1, p);
      },
      [&](int64_t b, int64_t j0, int64_t j1) {
        add_row(dh + b * hidden, grad_y_t + b * hidden, j0, j1);
        zero_columns(d_pre_t + b * 4 * hidden, 4, hidden, j0, j1);
      });
}


// ---------------------------------------------------------------------------------------
// The fused time loop (float32, avx2 / avx512): one parallel region for the whole sequence.
// Split by units, each thread owns a range of units, in tiles of one vector of units; per step it
// forms the recurrent product's columns of its units (recurrent_tiles.h, from a weight packed once
// per call) straight into the buffer its element pass then reads, so a step costs one barrier
// instead of an ATen/oneDNN call, an accumulation pass and two fork/joins. Forward, step t:
// products (read all of h_{t-1}) -> element pass (writes the thread's units of h_t) -> barrier.
// Backward, step t: element pass (writes the thread's units of d_pre_t) -> barrier -> products
// (read all of d_pre_t, write the thread's units of dh); the next element pass reads only those.
// Split by rows, each thread takes the same steps for its example rows and every unit, and reads
// and writes only its rows: no barrier (LoopSplit, loop_split).
// ---------------------------------------------------------------------------------------
const TileKernels& tile_kernels(int64_t isa) {
#if defined(ZF_X86_PHILOX)
  static const TileKernels avx512 = tile_kernels_avx512(), avx2 = tile_kernels_avx2();
  if (isa == kIsaAvx512) return avx512;
  if (isa == kIsaAvx2) return avx2;
#endif
  static const TileKernels none;
  return none;
}

NamedSetting<3> loop_setting("ZONEOUT_FUSED_CPU_LOOP", "loop", {"steps", "fused", "auto"});  // kLoop*

int64_t loop_choice() { return loop_setting.get(); }

// Above this hidden size "auto" runs the per-step forward: there oneDNN's products beat the tile
// kernels' (measured, 2 threads, AVX-512, T=30 I=256, forward ms fused / steps: B=32 H=512 8.9 /
// 8.9, H=768 18.3 / 16.5, H=1024 31.2 / 28.1; B=128 H=768 49.8 / 42.3), while the fused backward
// stays ahead (B=32 H=1024 63.8 / 70.0; B=128 H=768 104.9 / 105.8).
constexpr int64_t kAutoFusedForwardMaxHidden = 512;

// The tile kernels the fused loop runs for a float32 sequence of `steps` steps (its forward pass
// if `forward`), or nullptr where it does not apply (steps loop chosen, or "auto" and a forward
// above kAutoFusedForwardMaxHidden; another dtype; no tile kernels for the active instruction set;
// a single step: packing the weight would cost more than it saves).
const TileKernels* fused_loop_kernels(const Tensor& x, int64_t steps, int64_t hidden, bool forward) {
  const int64_t loop = loop_choice();
  if (loop == kLoopSteps || (loop == kLoopAuto && forward && hidden > kAutoFusedForwardMaxHidden)) return nullptr;
  if (x.scalar_type() != at::kFloat || steps < 2) return nullptr;
  const TileKernels& tiles = tile_kernels(active_isa.load(std::memory_order_relaxed));
  return tiles.lanes > 0 ? &tiles : nullptr;
}

// Packing loops for the panels below (float32, contiguous w): a thread per group of tiles. They
// replaced a pad + permute + copy through ATen (31 us for a 128 x 512 weight, 3% of the forward).

// w [G*H, K] as the forward products' panels: per tile of `lanes` units, [K][G][lanes] (rows
// q*H + j of w for the tile's units j; zero past H).
Tensor forward_panels(const Tensor& w, int64_t gate_rows, const TileKernels& kernels,
                      ScratchSlot slot = kScratchPanels) {
  const int64_t lanes = kernels.lanes;
  const int64_t hidden = w.size(0) / gate_rows, depth = w.size(1), tiles = (hidden + lanes - 1) / lanes;
  Tensor panels = scratch(slot, {tiles, depth, gate_rows, lanes}, w.options());
  const float* src = w.data_ptr<float>();
  float* out = panels.data_ptr<float>();
  const int64_t k_stride = gate_rows * lanes;
  at::parallel_for(0, tiles, 1, [&](int64_t first, int64_t last) {
    // Square blocks of `lanes` units x `lanes` depth steps, transposed in registers; the edges
    // (units past H: zeros; the last depth steps) a float at a time.
    for (int64_t u = first; u < last; ++u)
      for (int64_t q = 0; q < gate_rows; ++q) {
        const int64_t j0 = u * lanes, units = std::min(lanes, hidden - j0);
        const float* rows = src + (q * hidden + j0) * depth;
        float* dst = out + u * depth * k_stride + q * lanes;
        int64_t k0 = 0;
        if (units == lanes)
          for (; k0 + lanes <= depth; k0 += lanes) kernels.transpose(rows + k0, depth, dst + k0 * k_stride, k_stride);
        for (int64_t k = k0; k < depth; ++k)
          for (int64_t v = 0; v < lanes; ++v) dst[k * k_stride + v] = v < units ? rows[v * depth + k] : 0.0f;
      }
  });
  return panels;
}

// w [R, H] as the backward products' panels (dh += d_pre w): per group of `units` units,
// [R][units] (columns j of w for the group's units; zero past H).
Tensor backward_panels(const Tensor& w, int64_t units) {
  const int64_t rows = w.size(0), hidden = w.size(1), groups = (hidden + units - 1) / units;
  Tensor panels = scratch(kScratchPanels, {groups, rows, units}, w.options());
  const float* src = w.data_ptr<float>();
  float* out = panels.data_ptr<float>();
  at::parallel_for(0, groups, 1, [&](int64_t first, int64_t last) {
    for (int64_t g = first; g < last; ++g) {
      const int64_t j0 = g * units, n = std::min(units, hidden - j0);
      for (int64_t r = 0; r < rows; ++r) {
        float* dst = out + (g * rows + r) * units;
        std::copy_n(src + r * hidden + j0, n, dst);
        std::fill(dst + n, dst + units, 0.0f);
      }
    }
  });
  return panels;
}

// Runs body(first, last) on each thread of one parallel region, `tiles` items (unit tiles, row blocks,
// example rows) split evenly; body may call step_barrier() (every thread the same number of times).
template <typename Body>
void fused_region(int64_t tiles, const Body& body) {
#if defined(_OPENMP)
  const int64_t wanted = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
#pragma omp parallel num_threads(static_cast<int>(wanted))
  {
    // The team may be smaller than asked (e.g. called from inside another parallel region).
    const int64_t team = omp_get_num_threads(), id = omp_get_thread_num();
    body(tiles * id / team, tiles * (id + 1) / team);
  }
#else
  body(int64_t(0), tiles);
#endif
}

// The calling thread's index in the fused_region team (0 outside one): its slot in buffers made
// before the region for each thread (fused_region_threads of them).
inline int64_t region_thread() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int64_t fused_region_threads() { return std::max<int64_t>(1, at::get_num_threads()); }

inline void step_barrier() {
#if defined(_OPENMP)
#pragma omp barrier
#endif
}

// What one thread of a fused time loop owns of the [B, H] state: rows [b0, b1) x units [j0, j1), the
// units being tiles [first, last) of the loop's panels (`units` units each).
struct LoopPart {
  int64_t b0, b1, j0, j1, first, last;
  int64_t rows() const { return b1 - b0; }
};

// How a fused time loop shares a step between threads (lstm_cpu.h, kSplit*). By units: each thread
// forms its units' columns for every example row, and a barrier per step makes h_t (or the step's
// gradients) whole before any thread's next products read it. By rows: each thread runs its own
// example rows through every step, all units; rows never meet inside a recurrence, so there is no
// barrier and nothing crosses cores, but each thread reads every panel each step. Either way each
// output is the same FMA chains, so the bits do not depend on the split.
enum class LoopSplit { kUnits, kRows };

NamedSetting<3> split_setting("ZONEOUT_FUSED_CPU_SPLIT", "split", {"units", "rows", "auto"});  // kSplit*

int64_t split_choice() { return split_setting.get(); }

// A cache's size in bytes from glibc's sysconf (from cpuid) for `name` (_SC_LEVEL1_DCACHE_SIZE, ...), or
// `unknown` where it has none (0 or -1).
int64_t sysconf_bytes(int name, int64_t unknown) {
  const long bytes = sysconf(name);
  return bytes > 0 ? int64_t(bytes) : unknown;
}

// The L1 data cache's size in bytes, 0 where unknown.
int64_t l1_data_bytes() {
#if defined(_SC_LEVEL1_DCACHE_SIZE)
  static const int64_t bytes = sysconf_bytes(_SC_LEVEL1_DCACHE_SIZE, 0);
  return bytes;
#else
  return 0;
#endif
}

// A core's L2 size in bytes; where unknown, 1 MB, the smallest L2 of the Xeons with AVX-512 (Skylake-SP).
int64_t l2_cache_bytes() {
  constexpr int64_t kUnknown = int64_t(1) << 20;
#if defined(_SC_LEVEL2_CACHE_SIZE)
  static const int64_t bytes = sysconf_bytes(_SC_LEVEL2_CACHE_SIZE, kUnknown);
  return bytes;
#else
  return kUnknown;
#endif
}

// "auto" splits by rows where the loop's panels (`panel_bytes`, all of them) come to at most
// TileKernels::row_split_bytes per row of a thread, and each thread has at least 2 rows; one thread
// runs by units (no barrier to save, and the backward's bias sums stay inside its loop). 2 threads,
// B=32 T=50 I=64, interleaved with nn.LSTM, ratios to it by rows / by units, fwd+bwd: AVX-512 H=64
// 1.21-1.22 / 1.08-1.15, H=512 0.98-0.99 / 0.96-0.97; B=64 T=50 I=32 H=128 fwd 0.93-0.95 / 0.89-0.91,
// B=32 T=100 I=64 H=256 fwd+bwd 1.00-1.02 / 0.98-0.99; AVX2 B=32 T=50 H=128 1.05-1.07 / 0.91 and
// B=32 T=100 H=256 0.95-0.99 / 0.90-0.97. Where a thread has few rows for large panels the split by
// units is faster: AVX-512 B=12 T=50 H=512 fwd+bwd 11.2-11.6 ms against 11.8, B=20 T=35 I=H=1500 3%,
// B=4 H=256 1.22 against 1.73, B=20 and B=24 T=50 I=64 H=512 1.5-3% (10 and 12 rows a thread); AVX2
// (whose 4-vector tiles hold 3 rows, so the panels are read twice as often) B=32 T=100 H=256 forward
// 2-4%, hence its lower bound (at B=32 H=512 level either way). AVX-512's bound, 320 KB, takes B=32
// T=50 I=64 H=512 (295 KB a row forward, 256 KB backward) to rows: in one process, the split set call
// by call, forward 1-5% and fwd+bwd 2-7% faster by rows in every one of 5 and 4 runs; B=20 H=384 and
// B=12 H=256, which it also moves, were level (within 2%).
//
// Split by rows, every thread reads all the panels every step, from L3 where they overflow a core's L2.
// The bounds above were measured on a Zen 5, whose L3 (within the core's CCX) fed that fast enough. An
// Intel Xeon's mesh L3 does not. On a 2-vCPU Xeon (2 MB L2 a core), B=32 T=50 I=64, interleaved with
// nn.LSTM in a balanced order, ratios to it by units / by rows (forward panels' size): H=512 (4.7 MB)
// fwd 0.93-1.00 / 0.92-0.97, fwd+bwd 0.92-0.96 / 0.89-0.93; H=384 (2.75 MB) fwd 1.08-1.21 / 0.98-1.12,
// fwd+bwd 1.03-1.05 / 0.99-1.01; H=320 (1.97 MB) fwd 1.07-1.12 / 1.03-1.06, fwd+bwd 0.97-1.02 /
// 0.94-0.99; H=288 (1.62 MB) level; H=256 (1.31 MB) by rows ahead, fwd 1.15 against 1.06 (T=100: 1.12
// against 1.08). So on Intel CPUs the panels must also come to at most 3/4 of a core's L2, the rest
// left to the states and gates the loop reads beside them.
// l2_panel_limit: the most bytes of panels a thread's loop counts on L2 keeping, past which they stream
// from a slow L3 (unbounded where that was not seen: AMD, other CPUs).
int64_t l2_panel_limit() {
  return intel_cpu() ? l2_cache_bytes() * 3 / 4 : std::numeric_limits<int64_t>::max();
}

// TileKernels::row_split_bytes, but on a Zen 4 AVX2's bound is AVX-512's: there the split by rows was
// ahead under AVX2 at every size tried. Zen 4, AVX2, B=32 T=50 I=64, interleaved in one process, "auto"
// as before / by rows per round (24 rounds): H=512 fwd+bwd 1.04-1.12, forward 1.01-1.11 (median 1.07);
// H=384 fwd+bwd 1.04-1.18, forward 1.03-1.17 (1.09); B=32 T=100 H=256 forward 1.03-1.25 (1.17; its
// backward already split by rows); the GRU, B=32 T=50 I=64, fwd+bwd 1.01-1.18 (1.05) at H=512 and
// 1.01-1.16 (1.07) at H=384.
int64_t row_split_bound(const TileKernels& tiles) {
  return zen4_cpu() ? std::max(tiles.row_split_bytes, tile_kernels(kIsaAvx512).row_split_bytes) : tiles.row_split_bytes;
}

LoopSplit loop_split(const TileKernels& tiles, int64_t batch, int64_t panel_bytes) {
  const int64_t choice = split_choice();
  if (choice != kSplitAuto) return choice == kSplitRows ? LoopSplit::kRows : LoopSplit::kUnits;
  const int64_t threads = fused_region_threads(), rows = batch / threads;
  const bool rows_pay = panel_bytes <= rows * row_split_bound(tiles) && panel_bytes <= l2_panel_limit();
  return threads > 1 && rows >= 2 && rows_pay ? LoopSplit::kRows : LoopSplit::kUnits;
}

// Runs body(part) on each thread of one parallel region: the `tiles` tiles of `units` units split
// evenly by units, or the `batch` rows by rows. Only a split by units may call step_barrier().
template <typename Body>
void fused_loop_region(LoopSplit split, int64_t batch, int64_t hidden, int64_t units, const Body& body) {
  const int64_t tiles = (hidden + units - 1) / units;
  if (split == LoopSplit::kRows) {
    fused_region(batch, [&](int64_t b0, int64_t b1) { body(LoopPart{b0, b1, 0, hidden, 0, tiles}); });
    return;
  }
  fused_region(tiles, [&](int64_t first, int64_t last) {
    body(LoopPart{0, batch, std::min(hidden, first * units), std::min(hidden, last * units), first, last});
  });
}

// How the V vectors of a panel's columns map to a row of the products' destination: the forward
// panels hold one tile of units in each of its G gate rows (vectors at q * H, the same units), the
// backward ones V adjacent tiles of units (vectors at q * lanes, the next units).
struct PanelLayout {
  int64_t vectors;
  bool gate_rows;
  int64_t units(int64_t lanes) const { return gate_rows ? lanes : vectors * lanes; }
  int64_t vector_offset(int64_t q, int64_t lanes, int64_t hidden) const { return q * (gate_rows ? hidden : lanes); }
  int64_t vector_first_unit(int64_t q, int64_t lanes) const { return gate_rows ? 0 : q * lanes; }
};

// Sums over a long depth are formed as partial sums, each one FMA chain, added in order: in one chain
// each, the sums of 4H = 6000 products at H = 1500 (word-PTB's size) erred past the three-way rule
// against the float32 reference (the input gradient by 3.50e-6 against a bound of 3.19e-6 in the
// bench's check; tests/test_cpu.py's gradient of h0, from the fused backward's per-step products, by
// 2.2e-5 against 1.3e-5). The fused loop's products add one every kSumSteps steps (so at H <= 512
// the forward's stay single chains and the backward's are 2-4 parts), tiled_product one a depth
// chunk (at most kMaxChunkSteps steps).
constexpr int64_t kSumSteps = 512;
constexpr int64_t kMaxChunkSteps = 1024;

// "auto" (lstm_cpu.h, cpu_panels): forward panels of at least TileKernels::split_panel_bytes (measured on a
// Zen 5) are formed half their vectors at a time, but never on a Zen 4, and on an Intel CPU as
// TileKernels::intel_half_panels says (AVX2 only). Presumably on a Zen 4 the half tiles' relief of L2 counts
// for less (a 16-lane FMA holds its FMA pipes two cycles, so the panel streams at half the bytes a cycle)
// than their extra broadcasts, one per 2 FMAs instead of per 4. Zen 4, AVX-512, the split set call by call
// in one process, forward as split / whole, per round: B=32 T=50 I=64 H=512 1.04-1.09 (median 1.055; 25.7 ms
// against 24.1, 30 rounds), B=16 1.12 in the medians (21.3 / 19.0), B=64 T=20 1.07 (22.1 / 20.7); the
// backward does not use them. Nor AVX-512 on Intel CPUs: a 2-vCPU Xeon (48 KB of L1, 2 MB of L2 a core),
// the same way, split / whole per round (lower quartile, median, upper; 10-12 rounds): B=32 T=50 I=64 H=512
// 1.03, 1.05, 1.07, B=16 1.06, 1.08, 1.08, B=64 T=20 1.03, 1.05, 1.06, B=32 T=50 I=512 H=512 1.04, 1.06,
// 1.07.
NamedSetting<3> panels_setting("ZONEOUT_FUSED_CPU_PANELS", "panels", {"whole", "half", "auto"});  // kPanels*

// The bytes of a tile's panel from which the forward forms it in halves; 0: never. "half" takes every
// size, so that tests run that path on any CPU.
int64_t split_panel_threshold(const TileKernels& tiles) {
  const int64_t choice = panels_setting.get();
  if (choice != kPanelsAuto) return choice == kPanelsHalf ? 1 : 0;
  if (zen4_cpu()) return 0;
  if (intel_cpu()) return tiles.intel_half_panels ? l1_data_bytes() * 7 / 8 : 0;  // 0 where L1 is unknown
  return tiles.split_panel_bytes;
}

// Depth steps ahead at which a tile product asks L1 for its panel (TileOperands::prefetch_ahead), for a
// panel of `panel_bytes`; 0: none. Each row block of a tile reads the whole panel, and one well past L1's
// size comes from L2 every time; on Intel CPUs the hardware prefetchers did not keep the products fed from
// there. 2-vCPU Xeon (48 KB of L1, 2 MB of L2 a core), in one process, the prefetches set call by call,
// without / with them (8 steps ahead) per round (lower quartile, median, upper; 8-12 rounds): AVX-512
// forward B=32 T=100 I=64 H=256 (80 KB panels) 1.03, 1.03, 1.06, B=32 T=50 H=512 (147 KB) 1.01, 1.03, 1.03;
// AVX2 H=512 forward (74 KB) 1.02, 1.03, 1.04, fwd+bwd (its backward's panels 192 KB) 1.01, 1.01, 1.03;
// AVX-512 H=512 fwd+bwd (16 steps ahead, the backward's panels 256 KB) 1.01, 1.03, 1.06. Panels little past
// L1 lost: 64 KB (the backward's at AVX2 H=256 and AVX-512 H=128) fwd+bwd 0.97, 0.98, 1.00 and 0.99, 0.99,
// 1.02; within L1 (40 KB, AVX2 H=256 forward) 0.96-0.98. Hence from 1.5 times L1. Not measured on a Zen.
constexpr int64_t kPanelPrefetchSteps = 8;
int64_t panel_prefetch_steps(int64_t panel_bytes) {
  const int64_t l1 = l1_data_bytes();
  return intel_cpu() && l1 > 0 && 2 * panel_bytes > 3 * l1 ? kPanelPrefetchSteps : 0;
}

// The tile product o (`rows` rows, `vectors` vectors) over `depth` steps: its first kSumSteps steps
// as o says, each further kSumSteps formed apart and added (TileKernels::product_add).
inline void product_in_sums(const TileKernels& tiles, int64_t vectors, int64_t rows, const TileOperands& o,
                            int64_t depth) {
  tiles.get(vectors, rows)(o, std::min(depth, kSumSteps));
  for (int64_t k0 = kSumSteps; k0 < depth; k0 += kSumSteps) {
    TileOperands part = o;
    part.a += k0 * o.ldk;
    part.panel += k0 * o.ldp;
    part.lead.depth = 0;
    if (o.prefetch != nullptr) part.prefetch += k0 * o.ldp;
    tiles.get(vectors, rows, /*add=*/true)(part, std::min(kSumSteps, depth - k0));
  }
}

// Whether a step of a fused loop takes a thread's panels last first (tile_products): on every other step
// (alternate_step: processed step s odd), so that a step begins with the panels the last one ended with,
// where the thread's panels come to more than past_bytes (alternate_order_bound). A loop over panels that
// overflow L2 in one order every step finds none of them there (each was evicted before its turn came
// again: they stream from L3, step after step); alternating, a step finds there the ones the last step
// read most recently, all but the overflow. On a 2-vCPU Xeon (2 MB of L2 a core), B=32 T=50 I=64 H=512
// (2.4 MB of forward panels a thread), in one process, the order set call by call, one order / alternating
// per round (lower quartile, median, upper; 10-14 rounds): AVX2 forward 1.028, 1.034, 1.035, fwd+bwd
// 1.008, 1.031, 1.044; AVX-512 forward 1.029, 1.040, 1.060, fwd+bwd 1.005, 1.017, 1.027. Where the panels
// stay in L2 it does not pay: AVX2 B=32 T=50 H=256 forward 0.960, 0.974, 1.003 and T=100 0.968, 0.977, 0.984
// (16 rounds; why, not found); AVX-512 T=100 H=256 0.985, 1.005, 1.013, B=64 T=50 I=32 H=128 0.982, 0.992,
// 1.022. Hence "auto" alternates past l2_panel_limit (never on a Zen, where it was not measured).
struct PanelOrder {
  bool alternate_step = false;
  int64_t past_bytes = 0;
};

inline bool alternate_step(int64_t s) { return s % 2 == 1; }

NamedSetting<3> order_setting("ZONEOUT_FUSED_CPU_ORDER", "order", {"same", "alternate", "auto"});  // kOrder*

// PanelOrder::past_bytes for the fused loops of this call: "same" never alternates, "alternate" at every
// size (so that tests run that order on any CPU). Read before a parallel region: the setting may throw.
int64_t alternate_order_bound() {
  const int64_t choice = order_setting.get();
  if (choice == kOrderSame) return std::numeric_limits<int64_t>::max();
  return choice == kOrderAlternate ? 0 : l2_panel_limit();
}

// dst[b * row_stride + ...] += a[b] times the panels [first, last), for every row b < batch: the
// recurrent product's columns of those panels' units. Panels whose units all lie below H are
// accumulated in place; the last one, past H, through a zero-padded copy. With `start` (one
// row laid out like dst's), dst's columns are set to start + the product: dst's contents unread.
// With `lead` (its panel: panels laid out like `panels`, lead->depth steps each), each chain runs
// through lead's rows times its panels first (TileOperands::lead). Gate-row panels of an even number of
// vectors and at least `split_bytes` (0: none) are formed half their vectors at a time: the caller reads
// split_panel_threshold before its parallel region (the setting it reads may throw, which no OpenMP
// region may let out). `order`: whether the panels go last first (see PanelOrder); each tile's outputs
// are its own chains, so the order leaves the bits as they are.
inline void tile_products(const TileKernels& tiles, const float* a, int64_t lda, int64_t depth, const float* panels,
                          int64_t first, int64_t last, PanelLayout layout, int64_t split_bytes, int64_t hidden,
                          int64_t batch, float* dst, int64_t row_stride, const float* start = nullptr,
                          const LeadSegment* lead = nullptr, PanelOrder order = {}) {
  const int64_t lanes = tiles.lanes, vectors = layout.vectors;
  const int64_t units = layout.units(lanes), ldc_vector = layout.vector_offset(1, lanes, hidden);
  const int64_t panel_bytes = depth * vectors * lanes * int64_t(sizeof(float));
  const bool split_panel = layout.gate_rows && vectors % 2 == 0 && split_bytes > 0 && panel_bytes >= split_bytes;
  const int64_t split = split_panel ? 2 : 1;
  const int64_t prefetch_ahead = panel_prefetch_steps(panel_bytes);
  const int64_t part = vectors / split;  // vectors per product: see TileKernels::split_panel_bytes
  const RowBlocks blocks(batch, tiles.max_rows[part - 1]);
  alignas(64) float padded[kMaxTileRows * kMaxTileVectors * kMaxTileLanes];
  const int64_t lead_depth = lead != nullptr ? lead->depth : 0;
  // Where this thread's forward panels stream from L3 every step (past l2_panel_limit), each tile's
  // first row block asks L2 for the next tile's panel as it goes (TileOperands::prefetch), so that the
  // later blocks and that tile find theirs there. On a 2-vCPU Xeon, in a model of the forward's products
  // (B=32, H=512, 4.7 MB of panels a thread, two processes at once) 98-104 GFLOP/s a core against 88-91;
  // the layer, B=32 T=50 I=64 H=512 forward, in alternating processes, 24.7-27.4 ms against 26.5-29.2
  // (lower quartiles). The backward's panels (runs of units, 256 KB a tile there) measured level, so
  // they are left to the hardware prefetchers.
  const int64_t thread_panel_bytes = (last - first) * (depth + lead_depth) * vectors * lanes * int64_t(sizeof(float));
  const bool prefetch_next = layout.gate_rows && thread_panel_bytes > l2_panel_limit();
  const bool descending = order.alternate_step && thread_panel_bytes > order.past_bytes;
  const int64_t count = last - first, next = descending ? -1 : 1;
  for (int64_t nth = 0; nth < count; ++nth) {  // the nth panel taken
    const int64_t u = descending ? last - 1 - nth : first + nth;
    const float* panel = panels + u * depth * vectors * lanes;
    const float* lead_panel = lead_depth > 0 ? lead->panel + u * lead_depth * vectors * lanes : nullptr;
    const int64_t j0 = u * units;
    for (int64_t i = 0; i < blocks.count; ++i) {  // the panel is reused across row blocks (L1 or L2)
      const int64_t b0 = blocks.start(i), rows = blocks.rows(i);
      float* out = dst + b0 * row_stride + j0;
      // The lead segment of vectors [v0, v0 + part) of this block's rows.
      const auto lead_of = [&](int64_t v0) {
        return lead_depth > 0 ? LeadSegment{lead->a + b0 * lead->lda, lead->lda, lead_panel + v0 * lanes, lead_depth}
                              : LeadSegment{nullptr, 0, nullptr, 0};
      };
      const float* next_panel =
          prefetch_next && i == 0 && nth + 1 < count ? panel + next * depth * vectors * lanes : nullptr;
      if (j0 + units <= hidden) {
        for (int64_t h = 0; h < split; ++h) {
          const int64_t v0 = h * part;
          product_in_sums(tiles, part, rows,
                          {a + b0 * lda, lda, 1, panel + v0 * lanes, vectors * lanes, out + v0 * ldc_vector,
                           row_stride, ldc_vector, start != nullptr ? start + j0 + v0 * ldc_vector : nullptr,
                           lead_of(v0), next_panel != nullptr ? next_panel + v0 * lanes : nullptr, prefetch_ahead},
                          depth);
        }
        continue;
      }
      std::fill_n(padded, rows * vectors * lanes, 0.0f);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t q = 0; q < vectors; ++q) {
          const int64_t n = std::clamp<int64_t>(hidden - j0 - layout.vector_first_unit(q, lanes), 0, lanes);
          const int64_t offset = layout.vector_offset(q, lanes, hidden);
          std::copy_n(start != nullptr ? start + j0 + offset : out + r * row_stride + offset, n,
                      padded + (r * vectors + q) * lanes);
        }
      // Where a panel's vectors are runs of units (the backward's), the last one's product spans only
      // the vectors that hold units below H: at H = 100 the backward's last panel (32 units) had 4.
      const int64_t used = layout.gate_rows ? part : std::min(part, (hidden - j0 + lanes - 1) / lanes);
      for (int64_t h = 0; h < split; ++h) {
        const int64_t v0 = h * part;
        product_in_sums(tiles, used, rows,
                        {a + b0 * lda, lda, 1, panel + v0 * lanes, vectors * lanes, padded + v0 * lanes,
                         vectors * lanes, lanes, nullptr, lead_of(v0), nullptr, prefetch_ahead},
                        depth);
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t q = 0; q < vectors; ++q) {
          const int64_t n = std::clamp<int64_t>(hidden - j0 - layout.vector_first_unit(q, lanes), 0, lanes);
          std::copy_n(padded + (r * vectors + q) * lanes, n,
                      out + r * row_stride + layout.vector_offset(q, lanes, hidden));
        }
    }
  }
}

// out[j] += the sum over rows r < count, in order, of src[r * row_stride + j], for j in [j0, j1) (j0 a
// multiple of the lanes): whole vectors as a product of a row of ones with the rows (each sum one FMA
// chain, 1 * x + s being x + s), the units past them one by one.
inline void add_column_sums(const TileKernels& tiles, const float* src, int64_t count, int64_t row_stride,
                            int64_t j0, int64_t j1, float* out) {
  static const float kOne = 1.0f;
  const int64_t lanes = tiles.lanes;
  int64_t j = j0;
  while (j + lanes <= j1) {
    const int64_t vectors = std::min<int64_t>(kMaxTileVectors, (j1 - j) / lanes);
    tiles.get(vectors, 1)(TileOperands{&kOne, 0, 0, src + j, row_stride, out + j, 0, lanes}, count);
    j += vectors * lanes;
  }
  for (; j < j1; ++j) {
    float sum = out[j];
    for (int64_t r = 0; r < count; ++r) sum += src[r * row_stride + j];
    out[j] = sum;
  }
}

// A fused backward loop's bias gradients: the thread that writes an example row of a step's
// pre-activation gradients ([B, width]) adds it, still in its caches, into that row's sums (add), so
// each row's sums run over the steps in the loop's order; after the loop the rows' sums are added in
// row order (total). Every sum's order is so the same for any thread count and split. Before, the
// LSTM split by rows, and the GRU and RNN always, summed the steps' gradients in a pass after the
// loop that read [T, B, G*H] back from memory: for the LSTM 0.37 ms (AVX-512) and 0.5 ms (AVX2) of a
// 2-thread B=32 T=100 H=256 backward of 11 and 22; the GRU's backward there took 10.5 ms, now 10.2.
class BiasSums {
 public:
  BiasSums(int64_t batch, int64_t width)
      : sums_(at::zeros({batch, width}, at::TensorOptions().dtype(at::kFloat))), width_(width) {}
  // Units [j0, j1) of each block of `hidden` of example row b's gradients `d` (width floats).
  void add(const TileKernels& tiles, int64_t b, const float* d, int64_t hidden, int64_t j0, int64_t j1) const {
    float* row = sums_.data_ptr<float>() + b * width_;
    for (int64_t q = 0; q < width_; q += hidden) tiles.add(row + q + j0, d + q + j0, j1 - j0);
  }
  // [width]: the rows' sums added, row 0 first.
  Tensor total(const TileKernels& tiles) const {
    Tensor out = at::zeros({width_}, sums_.options());
    const int64_t lanes = tiles.lanes, batch = sums_.size(0);
    at::parallel_for(0, (width_ + lanes - 1) / lanes, 1, [&](int64_t first, int64_t last) {
      add_column_sums(tiles, sums_.data_ptr<float>(), batch, width_, first * lanes, std::min(width_, last * lanes),
                      out.data_ptr<float>());
    });
    return out;
  }

 private:
  Tensor sums_;
  int64_t width_;
};

// The row the chains of an input part start from (tile_products' `start`): the bias, or a row of
// zeros kept in `zeros` where there is none.
inline const float* bias_or_zeros(const float* bias, int64_t width, std::vector<float>& zeros) {
  if (bias != nullptr) return bias;
  zeros.assign(width, 0.0f);
  return zeros.data();
}

// One run of depth steps of a tiled_product: steps m < count of a (element n of step m at
// a[n * a_row + m * a_depth]) paired with rows m of b (C floats each, `ldb` apart).
struct GradientRun {
  const float* a;
  const float* b;
  int64_t count;
};

// Panels (here: rows of x or h) are read in depth chunks of at most this many bytes (with the lines of a
// they meet: see tiled_product), each across all of a thread's row blocks, so the chunk stays in L1 while
// it is reused.
constexpr int64_t kPanelChunkBytes = 32 << 10;
constexpr int64_t kL2PanelChunkBytes = 256 << 10;
// A tiled_product's output of at most this many bytes is taken to stay in the caches from one depth
// chunk to the next (see tiled_product; all threads' parts together, so that the chunks, and the
// sums' bits, do not depend on the thread count).
constexpr int64_t kCachedOutputBytes = 8 << 20;
// A tiled_product's output of at most this many bytes takes panel chunks of kSmallOutputChunkBytes
// (past L1, in the thread's copied panels): a small output (the weight gradients at small H or I) is
// a short pass per chunk, so the chunks' fixed costs (a tile call per row block and column tile, the
// panel copy) weigh more than reading the panel from L2. Backward, AVX-512, in one process with the
// chunk set call by call: pMNIST's layer (B=100 T=784 I=1 H=100) 79.5 ms against 85.2, B=32 T=50 I=64
// H=64 0.62 against 0.65, B=64 T=50 I=32 H=128 3.68 against 3.79 (its W_ih gradient; with the bound
// at 256 KB, which takes its W_hh gradient too, 3.55, but B=32 T=100 H=256's W_ih gradient, also
// 256 KB, then lost 1.5%); AVX2 level to 3.6% less.
constexpr int64_t kSmallOutputBytes = 128 << 10;
constexpr int64_t kSmallOutputChunkBytes = 64 << 10;
// Where a thread's rows of a in a chunk are packed (see tiled_product), in groups of at most this many
// bytes, each reused from L2 across every column tile.
constexpr int64_t kPackedRowsBytes = 256 << 10;

// A thread's rows of a in a chunk are packed past this many bytes: TileKernels::pack_rows_bytes, measured
// on a Zen 5 (48 KB of L1 a core, 12 ways); past 64 KB on Intel CPUs, and for AVX-512 (16-lane tiles) on
// CPUs with at most 32 KB of L1, as a Zen 4 (8 ways). Read in place, a row block's depth steps lie G*H
// floats apart (8 KB at H = 512), all in one of L1's sets.
// On a 2-vCPU Xeon, AVX-512, backward alone, alternating processes (lower quartiles), packed / as before:
// B=32 T=50 I=64 H=512 (512 KB a thread) 42.6-43.2 ms / 44.1-45.8, B=32 T=100 H=256 (256 KB) 22.9-23.0 /
// 25.7-25.8, B=64 T=50 I=32 H=128 6.5-6.9 / 7.1-7.3, H=384 2-4% faster; B=32 T=50 H=64 (64 KB) 1.6-1.9 /
// 1.5-1.6, so not there. AVX2 (packing past 256 KB) level at H=64 (175 KB) and H=512.
// On a 2-vCPU Zen 4 (32 KB of L1, 8 ways), the packing set call by call in one process, 40 rounds, the
// weight gradients' time as before / packed, per round: AVX-512 B=32 T=50 I=64 H=512 1.03-1.16 (median
// 1.07; 26.6 ms against 24.6), B=32 T=100 H=256 1.02-1.22 (1.07; 14.6 against 13.3); AVX2, whose default
// packs past 256 KB, 0.84-1.02 (0.985) and 0.88-1.09 (0.96), so it keeps that.
int64_t pack_rows_threshold(const TileKernels& tiles) {
  const int64_t l1 = l1_data_bytes();
  const bool small_l1_avx512 = tiles.lanes == 16 && l1 > 0 && l1 <= (32 << 10);
  return intel_cpu() || small_l1_avx512 ? std::min<int64_t>(tiles.pack_rows_bytes, 64 << 10) : tiles.pack_rows_bytes;
}

// A depth chunk of a tiled_product: its first step's a and b, its steps, and whether it is the
// product's first (whose sums are stored in out rather than added to it).
struct DepthChunk {
  const float* a;
  const float* b;
  int64_t depth;
  bool from_zeros;
};

// The runs cut into chunks of at most `chunk` depth steps, in order.
std::vector<DepthChunk> depth_chunks(const std::vector<GradientRun>& runs, int64_t chunk, int64_t a_depth,
                                     int64_t ldb) {
  std::vector<DepthChunk> chunks;
  for (const GradientRun& run : runs) {
    for (int64_t k0 = 0; k0 < run.count; k0 += chunk) {
      chunks.push_back({run.a + k0 * a_depth, run.b + k0 * ldb, std::min(chunk, run.count - k0), chunks.empty()});
    }
  }
  return chunks;
}

// The panel of one column tile (`depth` rows of b from `panel`, `valid` of its `width` columns) as
// the tile kernels read it, with its row stride: in place, or copied adjacent into panel_copy where
// `copy` or where the tile is narrower than `width` (then zero-padded).
inline std::pair<const float*, int64_t> column_tile_panel(const float* panel, int64_t ldb, int64_t depth,
                                                          int64_t width, int64_t valid, bool copy,
                                                          float* panel_copy) {
  if (valid == width && !copy) return {panel, ldb};
  if (valid < width) std::fill_n(panel_copy, depth * width, 0.0f);
  for (int64_t k = 0; k < depth; ++k) std::copy_n(panel + k * ldb, valid, panel_copy + k * width);
  return {panel_copy, width};
}

// One row block's tile (op.c: `rows` rows, `valid` of `width` columns) over a depth chunk: its
// sums, one chain each from zero, stored in op.c where `from_zeros`, else added to it; a tile
// narrower than `width` (the last column tile) is formed in tile_copy, zero-padded, and copied back.
inline void multiply_tile(const TileKernels& tiles, int64_t vectors, int64_t rows, TileOperands op, int64_t depth,
                          int64_t width, int64_t valid, bool from_zeros, float* tile_copy) {
  alignas(64) static const float zero_start[kMaxTileVectors * kMaxTileLanes] = {};
  if (from_zeros) op.start = zero_start;
  const TileProductFn product = tiles.get(vectors, rows, /*add=*/!from_zeros);
  if (valid == width) {
    product(op, depth);
    return;
  }
  float* const c = op.c;
  const int64_t ldc = op.ldc_row;
  std::fill_n(tile_copy, rows * width, 0.0f);
  if (!from_zeros) {
    for (int64_t r = 0; r < rows; ++r) std::copy_n(c + r * ldc, valid, tile_copy + r * width);
  }
  op.c = tile_copy;
  op.ldc_row = width;
  product(op, depth);
  for (int64_t r = 0; r < rows; ++r) std::copy_n(tile_copy + r * width, valid, c + r * ldc);
}

// out [N, C] = the sum over the runs' depth steps m, in order, of a[:, m] b[m]^T (an outer
// product), formed by the tile kernels in parallel over blocks of N: each output the sum, in order,
// of one FMA chain per depth chunk (see kSumSteps; the chunks, and so the bits, are the same for any
// thread count). Weight gradients: a = the pre-activation gradients read as
// their transpose (a_row 1, a_depth G*H), b = the layer's inputs or previous states; oneDNN forms
// those from a copy of b transposed, made per call (x^T and h^T: ~0.1-0.3 ms of a B=32 T=50 H=128
// fwd+bwd), the tile kernels broadcast a's columns, read in place or from a packed copy (below). The
// input gradient: a = the pre-activation gradients (a_row G*H, a_depth 1), b = W_ih.
Tensor tiled_product(const TileKernels& tiles, const std::vector<GradientRun>& runs, int64_t n, int64_t a_row,
                     int64_t a_depth, int64_t cols, int64_t ldb, int64_t max_vectors = kMaxTileVectors) {
  // Not zero-filled: each tile's first chunk stores its sums rather than adding them to out, so
  // out is written once, by the thread that owns its rows (a fill first cost 0.47 ms a call for an
  // encoder's [3200, 512] input gradient, written and read back from memory).
  Tensor out = at::empty({n, cols}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  // Column tiles of up to max_vectors vectors; narrower where all of out is (I = 32 in 2 vectors of 16
  // rather than 4 half-zero ones).
  const int64_t lanes = tiles.lanes, vectors = std::min<int64_t>(max_vectors, (cols + lanes - 1) / lanes);
  const int64_t width = vectors * lanes;
  // Depth steps a pass: panel chunks of L1 size, reused across the row blocks. Where a is read along
  // its rows (a_depth 1: the input gradient, b the small weight), a chunk may fill L2 instead, so that
  // each row of a streams through in long runs: in L1 chunks (128 steps) they were read 512 bytes at a
  // time, one chunk after another (B=32 T=100 H=256, 2 threads: 1.14-1.49 ms, L2 chunks 0.95-1.12).
  // Also where I is no multiple of the width, the last tile's panel zero-padded in its copy (below):
  // char-PTB's fwd+bwd (B=32 T=20 I=H=1000, interleaved) 1.8-2.4% faster than in L1 chunks.
  // And where out is too large to stay in the caches between chunks (the weight gradients at large
  // H: each chunk reads and writes all of out), so that it is read fewer times. fwd+bwd, interleaved,
  // 2 threads: B=20 T=35 I=H=1500 (word-PTB's layer) 209.9 ms against 224.1 in L1 chunks, two such
  // layers 406 against 438, B=64 T=20 I=H=2000 612 against 687; char-PTB (16 MB) level; where out
  // stays in L2 (B=32 T=50 H=512, 4 MB) L2 chunks were 1-2% slower. At most kMaxChunkSteps steps.
  const bool large_out = n * cols * int64_t(sizeof(float)) > kCachedOutputBytes;
  const bool small_out = n * cols * int64_t(sizeof(float)) <= kSmallOutputBytes;
  const int64_t chunk_bytes = a_depth == 1 || large_out ? kL2PanelChunkBytes
                              : small_out                ? kSmallOutputChunkBytes
                                                         : kPanelChunkBytes;
  // In an L1 chunk of the weight gradients a row block reads a cache line of a at every depth step
  // beside the panel's row (a's rows of a depth step lie together, packed or in place; its depth steps
  // far apart), so those lines count too: AVX2's 3-vector panel rows are 96 bytes, and 32 KB of them
  // (341 steps) with 21 KB of a's lines overflowed a 48 KB L1. 2-vCPU Xeon, in one process, the rule set
  // call by call, the weight gradients' median time before / with a's lines counted: AVX2 B=32 T=50 I=64
  // H=512 25.05 / 23.13 ms (341 / 204 steps), B=32 T=100 H=256 13.47 / 12.20, B=64 T=50 I=32 H=128 level;
  // AVX-512 (128 / 102 steps) 14.90 / 14.65, 8.09 / 7.91, 2.31 / 2.24, the 1x256 encoder's 18.24 / 17.79.
  // fwd+bwd, one against the other per round (lower quartile, median, upper; 10 rounds): AVX2 H=512 1.009,
  // 1.016, 1.032, B=32 T=100 H=256 1.026, 1.031, 1.054; AVX-512 B=32 T=100 H=256 1.010, 1.013, 1.026, H=512
  // and the encoder level. Not measured on a Zen (on a Zen 4, 32 KB of L1, 16 KB chunks once ran 3-5% slower
  // than 32 KB ones; these are 25.5 KB of panel there under AVX-512).
  const int64_t a_line_bytes =
      a_depth > 1 && chunk_bytes == kPanelChunkBytes ? kLineFloats * int64_t(sizeof(float)) : 0;
  const int64_t chunk = std::min(kMaxChunkSteps, chunk_bytes / (width * int64_t(sizeof(float)) + a_line_bytes));
  // Panel rows further apart than the panel is wide (the weight gradients' h and x rows, H or I floats
  // apart) are copied to be adjacent first, per chunk: a chunk's rows 1 KB apart (H = 256) fell into a
  // quarter of L1's sets, too few ways to keep the chunk there while the row blocks reuse it.
  // So are an L2 chunk's (the input gradient's W_ih, I > width): read in place, a column tile's
  // rows lay I floats apart, 1024 of them over 2 MB at I = 512, a new page every two rows for each
  // row block (B=32 T=100 I=512 H=256, interleaved: backward 24.3 ms against 25.2, the input
  // gradient 7.1-7.3 against 7.6-8.1; the bidirectional encoder's fwd+bwd 2.1-2.6% faster).
  const bool copy_panels = ldb != width;
  const int64_t max_rows = tiles.max_rows[vectors - 1];
  const RowBlocks blocks(n, max_rows);
  // Where a is read across its rows (a_row 1: the weight gradients, a the pre-activation gradients,
  // rows G*H floats apart) and a thread's rows of a chunk exceed pack_rows_threshold, they
  // are copied first, a group of row blocks at a time, each depth step's rows ld_packed floats apart:
  // read in place, a block's depth steps lay 4-8 KB apart (H >= 256), in one or two of L1's sets, and
  // a thread's chunk of them did not stay in L2 for the next column tile.
  const int64_t group_blocks = std::max<int64_t>(1, kPackedRowsBytes / (chunk * max_rows * int64_t(sizeof(float))));
  const int64_t pack_bytes = pack_rows_threshold(tiles);
  const bool may_pack = a_row == 1 && a_depth > 1 && n * chunk * int64_t(sizeof(float)) > pack_bytes;
  const int64_t packed_floats = (group_blocks * max_rows + 32) * chunk;  // ld_packed's rounding included
  const Tensor packs = may_pack ? pooled_empty({fused_region_threads(), packed_floats},
                                                at::TensorOptions().dtype(at::kFloat))
                                : Tensor();
  // Each thread's copied panels: an L1 chunk's fit on its stack, an L2 chunk's are made here.
  const int64_t panel_floats = chunk * width;
  const bool large_panels = panel_floats > int64_t(kPanelChunkBytes / sizeof(float));
  const Tensor panels = large_panels && copy_panels ? pooled_empty({fused_region_threads(), panel_floats},
                                                                   at::TensorOptions().dtype(at::kFloat))
                                                    : Tensor();
  const std::vector<DepthChunk> chunks = depth_chunks(runs, chunk, a_depth, ldb);
  if (chunks.empty()) return out.zero_();  // no depth steps: a sum of nothing
  fused_region(blocks.count, [&](int64_t first, int64_t last) {
    // Copied panels (an L1 chunk's on the stack, an L2 chunk's in this thread's part of `panels`),
    // and the last column tile's tiles, zero-padded to `width` (on the stack: nothing inside the
    // parallel region allocates, or may throw).
    alignas(64) float small_panel_copy[kPanelChunkBytes / sizeof(float)];
    alignas(64) float tile_copy[kMaxTileRows * kMaxTileVectors * kMaxTileLanes];
    float* const panel_copy = panels.defined() ? panels.data_ptr<float>() + region_thread() * panel_floats
                                               : small_panel_copy;
    const int64_t thread_rows = blocks.start(last) - blocks.start(first);
    float* const packed = may_pack ? packs.data_ptr<float>() + region_thread() * packed_floats : nullptr;
    // A chunk of depth steps, then every column tile: a's part in the chunk is read from memory once
    // and from the caches for the other column tiles.
    for (const DepthChunk& part : chunks) {
      const bool pack = may_pack && thread_rows * part.depth * int64_t(sizeof(float)) > pack_bytes;
      const int64_t group = pack ? group_blocks : std::max<int64_t>(1, last - first);
      for (int64_t g0 = first; g0 < last; g0 += group) {
        const int64_t g1 = std::min(last, g0 + group), group_r0 = blocks.start(g0);
        const int64_t group_rows = blocks.start(g1) - group_r0;
        // ld_packed: an odd number of cache lines, so that a block's depth steps spread over all of
        // L1's sets.
        const int64_t ld_packed = ((group_rows + 15) / 16 | 1) * 16;
        if (pack) {
          for (int64_t k = 0; k < part.depth; ++k) {
            std::copy_n(part.a + k * a_depth + group_r0, group_rows, packed + k * ld_packed);
          }
        }
        for (int64_t c0 = 0; c0 < cols; c0 += width) {
          const int64_t valid = std::min(width, cols - c0);
          // The last column tile in as few vectors as cover it: a 64-float tile for I = 200's last 8
          // columns did 8 times the work they need.
          const int64_t tile_vectors = std::min(vectors, (valid + lanes - 1) / lanes);
          const int64_t tile_width = tile_vectors * lanes;
          const auto [panel, ldp] =
              column_tile_panel(part.b + c0, ldb, part.depth, tile_width, valid, copy_panels, panel_copy);
          for (int64_t block = g0; block < g1; ++block) {
            const int64_t r0 = blocks.start(block);
            TileOperands op{part.a + r0 * a_row, a_row, a_depth, panel, ldp, o + r0 * cols + c0, cols, lanes};
            if (pack) {
              op.a = packed + (r0 - group_r0);
              op.ldk = ld_packed;
            }
            multiply_tile(tiles, tile_vectors, blocks.rows(block), op, part.depth, tile_width, valid,
                          part.from_zeros, tile_copy);
          }
        }
      }
    }
  });
  return out;
}

// The runs of grad W_hh for the tile kernels (the pairing of recurrent_pairing).
std::vector<GradientRun> recurrent_gradient_runs(const float* d_rec, int64_t rows, const float* y, const float* h0,
                                                 int64_t steps, int64_t batch, int64_t hidden, int direction) {
  const RecurrentPairing pairing = recurrent_pairing(steps, direction);
  std::vector<GradientRun> runs{{d_rec + pairing.first * batch * rows, h0, batch}};
  if (steps > 1) {
    runs.push_back({d_rec + pairing.d_start * batch * rows, y + pairing.y_start * batch * hidden,
                    (steps - 1) * batch});
  }
  return runs;
}

// (grad W_ih, grad W_hh) of a layer direction from the gradients of its input part d_in and of its
// recurrent part d_rec ([T, B, G*H]; the same tensor for the LSTM): by the tile kernels where the
// fused loop applies (`tiles`), else by oneDNN / ATen.
std::pair<Tensor, Tensor> weight_gradients(const TileKernels* tiles, const Tensor& d_in, const Tensor& d_rec,
                                           const Tensor& x, const Tensor& y, const Tensor& h0, int direction) {
  const int64_t steps = x.size(0), batch = x.size(1), input = x.size(2), hidden = h0.size(1), rows = d_in.size(2);
  if (tiles == nullptr) {
    return {transposed_product(d_in.view({steps * batch, rows}), x.view({steps * batch, input})),
            recurrent_weight_grad(d_rec, y, h0, direction)};
  }
  const float* d_rec_p = d_rec.data_ptr<float>();
  const int64_t vectors = tiles->weight_gradient_vectors;
  return {tiled_product(*tiles, {{d_in.data_ptr<float>(), x.data_ptr<float>(), steps * batch}}, rows, 1, rows, input,
                        input, vectors),
          tiled_product(*tiles,
                        recurrent_gradient_runs(d_rec_p, rows, y.data_ptr<float>(), h0.data_ptr<float>(), steps, batch,
                                                hidden, direction),
                        rows, 1, rows, hidden, hidden, vectors)};
}

// grad_x [T, B, I] = d_in [T, B, G*H] W_ih: by the tile kernels where the fused loop applies
// (`tiles`: W_ih in copied column tiles, no output copy), else by oneDNN / ATen.
Tensor input_gradient(const TileKernels* tiles, const Tensor& d_in, const Tensor& w_ih) {
  const int64_t steps = d_in.size(0), batch = d_in.size(1), rows = d_in.size(2), input = w_ih.size(1);
  if (tiles == nullptr) return product(d_in.view({steps * batch, rows}), w_ih).view({steps, batch, input});
  return tiled_product(*tiles, {{d_in.data_ptr<float>(), w_ih.data_ptr<float>(), rows}}, steps * batch, rows, 1, input,
                       input, tiles->input_gradient_vectors)
      .view({steps, batch, input});
}

// Asks the caches for units [j0, j1) of `blocks` blocks of H floats in each row of `base` (rows
// `row_stride` apart): what the next step reads that was written long before (the forward's input
// projection, the activations saved for backward), fetched while this step's products run. A
// thread's runs are short (its units of each row), so the hardware prefetchers miss them: before,
// backward's element pass stalled on its first loads of each row.
// kForWrite: rows the step will write (prefetchw), so the write does not wait for the line either.
template <bool kForWrite = false>
inline void prefetch_units(const float* base, const LoopPart& part, int64_t row_stride, int64_t blocks,
                           int64_t hidden) {
  constexpr int64_t kLine = 64 / sizeof(float);
  for (int64_t b = part.b0; b < part.b1; ++b)
    for (int64_t q = 0; q < blocks; ++q)
      for (int64_t j = part.j0; j < part.j1; j += kLine)
        __builtin_prefetch(base + b * row_stride + q * hidden + j, kForWrite ? 1 : 0);
}

// A per-step buffer of a fused forward: step t's rows at base + t * step_stride, `blocks` blocks of H
// floats in each example row, rows `row_stride` apart; for_write where the step writes them.
struct StepRows {
  const float* base;
  int64_t step_stride, row_stride, blocks;
  bool for_write;
};

// Asks for a thread's part of step t's rows of each buffer (prefetch_units). The forward's outputs
// (gates, h, c) are buffers last touched a call ago, each step's rows short runs per thread, so the
// first writes of a step waited on the caches: fetched a step ahead, while the step's products run,
// the forward took 8-12% less at B=64 T=50 I=32 H=128 and B=32 T=50 I=64 H=64 called back to back
// (AVX-512, 2 threads); level within noise at H=256-512, on AVX2, for the GRU and RNN, and after other
// work had evicted the buffers (measured in one process, the prefetch toggled call by call).
inline void prefetch_step(std::initializer_list<StepRows> rows, int64_t t, const LoopPart& part, int64_t hidden) {
  for (const StepRows& r : rows) {
    const float* base = r.base + t * r.step_stride;
    if (r.for_write) {
      prefetch_units<true>(base, part, r.row_stride, r.blocks, hidden);
    } else {
      prefetch_units(base, part, r.row_stride, r.blocks, hidden);
    }
  }
}

// The input part x_t W_ih^T + bias of a step, formed in the fused loop by the same threads on the same
// units, in the same chains as the recurrent part, just before it (TileOperands::lead). A separate
// projection of all steps first wrote [T, B, 4H] out and the loop read it back: forward 4% slower at
// B=32 T=100 H=256 and at B=64 T=50 H=128 (same-phase A/B, 2 threads; equal at B=32 T=50 H=256). But see
// input_part_in_loop: wide inputs.
struct StepInput {
  const float* x;  // [T, B, I]
  const Tensor* w_ih;
  const float* bias;  // [G*H] or null
};

// Whether the fused LSTM forward forms each step's input part in its loop (StepInput) rather than as one
// projection of all steps first (input_projection, the gates buffer then holding it): the same chains, so
// the same bits, where the input is at most kSumSteps wide (past it the projection's products would split
// the chains into partial sums). On Intel CPUs, once the input part's panels come to half a core's L2 a
// thread, the projection first: there, in one process, the choice set call by call, in the loop / first
// per round (lower quartile, median, upper; 6-10 rounds), 2 vCPUs of a Xeon (2 MB of L2 a core): AVX-512
// B=32 T=100 I=512 H=256 bidirectional (the 1x256 encoder; 1 MB of input panels a thread) forward 1.02,
// 1.03, 1.03; 1.01, 1.04, 1.06; 1.05, 1.06, 1.09 (three runs), fwd+bwd 1.01, 1.04, 1.05; AVX2 1.08, 1.08,
// 1.10; B=32 T=50
// I=512 H=512 (2 MB) 1.02, 1.04, 1.05, AVX2 1.00, 1.00, 1.04. Below the bound the loop stays: I=256 H=256
// (0.5 MB; the 2x256 encoder's first layer) 0.97, 1.00, 1.02; I=64 H=512 0.95, 0.95, 0.97 (AVX2 0.94, 0.95,
// 0.96), I=64 H=256 0.97, 0.99, 1.01 (T=100: 1.00, 1.02, 1.04), B=64 T=50 I=32 H=128 0.92, 0.95, 0.98, I=64
// H=64 0.91, 0.95, 0.99.
// A Zen was measured only at small inputs (the loop 0-5% ahead there). "loop" and "first"
// (ZONEOUT_FUSED_CPU_INPUT, lstm_cpu.h) choose either way, so that tests run both on any CPU.
NamedSetting<3> input_setting("ZONEOUT_FUSED_CPU_INPUT", "input", {"loop", "first", "auto"});  // kInput*

bool input_part_in_loop(int64_t input_size, int64_t gate_width) {
  const int64_t choice = input_setting.get();
  if (choice == kInputLoop || input_size > kSumSteps) return true;
  if (choice == kInputFirst) return false;
  if (!intel_cpu()) return true;
  const int64_t bytes_per_thread = input_size * gate_width * int64_t(sizeof(float)) / fused_region_threads();
  return bytes_per_thread < l2_cache_bytes() / 2;
}

// The fused forward of a recurrent cell with G gate rows: per step, the thread's part (rows x units)
// of h_{t-1} W_hh^T added to destination(s, t, part) (rows `row_stride` apart: the input projection, or
// b_hh; with `input`, whatever it holds is replaced by the step's input part first), then
// element(s, t, h_prev, part) on the same part, which then asks for its part of the next step's
// `step_rows` (prefetch_step); split by units, then one barrier (h_t complete before any thread's next
// products read it).
template <typename Destination, typename Element>
void fused_forward_loop(const TileKernels& tiles, const Tensor& w_hh, int64_t gate_rows, int64_t steps,
                        const ZoneoutParams& p, const float* h0, const float* y, int64_t row_stride,
                        const Destination& destination, const Element& element,
                        std::initializer_list<StepRows> step_rows, const StepInput* input = nullptr) {
  const int64_t batch = p.batch, hidden = p.hidden, state = batch * hidden, lanes = tiles.lanes;
  const int64_t depth = hidden + (input != nullptr ? input->w_ih->size(1) : 0);
  const LoopSplit split = loop_split(tiles, batch, gate_rows * hidden * depth * int64_t(sizeof(float)));
  const Tensor panels = forward_panels(w_hh, gate_rows, tiles);
  const float* panels_p = panels.data_ptr<float>();
  const Tensor input_panels = input != nullptr ? forward_panels(*input->w_ih, gate_rows, tiles, kScratchInputPanels)
                                               : Tensor();
  const float* input_panels_p = input != nullptr ? input_panels.data_ptr<float>() : nullptr;
  const int64_t input_size = input != nullptr ? input->w_ih->size(1) : 0;
  std::vector<float> zeros;
  const float* start = input != nullptr ? bias_or_zeros(input->bias, gate_rows * hidden, zeros) : nullptr;
  const PanelLayout layout{gate_rows, true};
  const int64_t split_bytes = split_panel_threshold(tiles);
  const int64_t order_bound = alternate_order_bound();
  fused_loop_region(split, batch, hidden, lanes, [&](const LoopPart& part) {
    const int64_t b0 = part.b0;
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = step_position(s, steps, p.direction);
      const float* hp = s == 0 ? h0 : y + step_position(s - 1, steps, p.direction) * state;
      float* dst = destination(s, t, part) + b0 * row_stride;
      // The step's input part (if any) first, in the same chains (TileOperands::lead).
      const LeadSegment lead{input != nullptr ? input->x + (t * batch + b0) * input_size : nullptr, input_size,
                             input_panels_p, input_size};
      tile_products(tiles, hp + b0 * hidden, hidden, hidden, panels_p, part.first, part.last, layout, split_bytes,
                    hidden, part.rows(), dst, row_stride, start, input != nullptr ? &lead : nullptr,
                    PanelOrder{alternate_step(s), order_bound});
      if (part.j0 < part.j1) {
        element(s, t, hp, part);
        if (s + 1 < steps) prefetch_step(step_rows, step_position(s + 1, steps, p.direction), part, hidden);
      }
      if (split == LoopSplit::kUnits) step_barrier();
    }
  });
}

// out [rows, G*H] = x [rows, K] w^T + bias ([G*H] or null): the input projection of every step by
// the tile kernels, in parallel over chunks of rows.
void tiled_projection(const TileKernels& tiles, const float* x, int64_t rows, int64_t depth, const Tensor& w,
                      const float* bias, int64_t gate_rows, float* out) {
  const int64_t lanes = tiles.lanes, hidden = w.size(0) / gate_rows, width = gate_rows * hidden;
  const Tensor panels = forward_panels(w, gate_rows, tiles);
  const float* panels_p = panels.data_ptr<float>();
  const int64_t unit_tiles = (hidden + lanes - 1) / lanes;
  // The products start from the bias (not from a copy of it in every row: that pass wrote the
  // whole [rows, G*H] output once more).
  std::vector<float> zeros;
  const float* start = bias_or_zeros(bias, width, zeros);
  constexpr int64_t kRowChunk = 48;  // rows a task: whole tiles (6, 8 or 16 rows for 4, 3, 1 gate rows)
  const int64_t split_bytes = split_panel_threshold(tiles);
  at::parallel_for(0, (rows + kRowChunk - 1) / kRowChunk, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const int64_t r0 = c * kRowChunk, n = std::min(kRowChunk, rows - r0);
      tile_products(tiles, x + r0 * depth, depth, depth, panels_p, 0, unit_tiles, PanelLayout{gate_rows, true},
                    split_bytes, hidden, n, out + r0 * width, width, start);
    }
  });
}

// x [T, B, K] w^T + bias as a [T, B, G*H] tensor: the input projection of every step, by the tile
// kernels into a pooled buffer where the fused loop runs (about as fast as oneDNN's product at
// these shapes, whose output would be a fresh allocation: see pooled_empty), else by oneDNN / ATen.
Tensor input_projection(const TileKernels* tiles, const Tensor& x, const Tensor& w, const Tensor& bias,
                        int64_t gate_rows) {
  const int64_t steps = x.size(0), batch = x.size(1), input = x.size(2), width = w.size(0);
  if (tiles == nullptr) return linear_product(x.view({steps * batch, input}), w, bias).view({steps, batch, width});
  Tensor out = pooled_empty({steps, batch, width}, x.options());
  tiled_projection(*tiles, x.data_ptr<float>(), steps * batch, input, w, bias.defined() ? bias.data_ptr<float>() : nullptr,
                   gate_rows, out.data_ptr<float>());
  return out;
}

// Backward panels span this many vectors of adjacent units: with one, each row's broadcast fed one
// FMA, so the products were bound by loads. Two, or three from TileKernels::wide_backward_hidden. The
// sums, and so the bits, are the same either way.
int64_t backward_panel_vectors(const TileKernels& tiles, int64_t hidden) {
  return tiles.wide_backward_hidden > 0 && hidden >= tiles.wide_backward_hidden ? 3 : 2;
}

// The split of a fused backward loop, whose panels are W_hh's.
LoopSplit backward_split(const TileKernels& tiles, int64_t batch, const Tensor& w_hh) {
  return loop_split(tiles, batch, w_hh.numel() * int64_t(sizeof(float)));
}

// The fused backward of a recurrent cell: per processed step, last first, element(s, t, part) on the
// thread's part (it writes its gradients of h_{t-1} W_hh^T's pre-activations into d_rec(t), rows
// `row_stride` apart, and leaves in dh the direct part of the gradient reaching h_{t-1}); split by
// units one barrier (d_rec(t) complete); then dh[part] += d_rec(t)[part's rows] W_hh[:, part's units].
template <typename Gradients, typename Element>
void fused_backward_loop(const TileKernels& tiles, const Tensor& w_hh, int64_t steps, const ZoneoutParams& p,
                         LoopSplit split, float* dh, int64_t row_stride, const Gradients& d_rec,
                         const Element& element) {
  const int64_t batch = p.batch, hidden = p.hidden, lanes = tiles.lanes;
  const PanelLayout layout{backward_panel_vectors(tiles, hidden), false};
  const int64_t units = layout.units(lanes);
  const Tensor panels = backward_panels(w_hh, units);
  const float* panels_p = panels.data_ptr<float>();
  const int64_t order_bound = alternate_order_bound();
  fused_loop_region(split, batch, hidden, units, [&](const LoopPart& part) {
    for (int64_t s = steps - 1; s >= 0; --s) {
      const int64_t t = step_position(s, steps, p.direction);
      if (part.j0 < part.j1) element(s, t, part);
      if (split == LoopSplit::kUnits) step_barrier();
      tile_products(tiles, d_rec(t) + part.b0 * row_stride, row_stride, row_stride, panels_p, part.first, part.last,
                    layout, /*split_bytes=*/0, hidden, part.rows(), dh + part.b0 * hidden, hidden, nullptr, nullptr,
                    PanelOrder{alternate_step(s), order_bound});  // runs of units
    }
  });
}

void fused_forward(const TileKernels& tiles, float* gates, float* y, float* c_seq, const float* h0, const float* c0,
                   const StepInput* input, const Tensor& w_hh, const int64_t* lengths, int64_t steps,
                   const ZoneoutParams& p, const CpuKernels& kernels) {
  const int64_t batch = p.batch, hidden = p.hidden, state = batch * hidden;
  const auto row = kernels.f32.lstm_forward;
  fused_forward_loop(
      tiles, w_hh, 4, steps, p, h0, y, 4 * hidden,
      [&](int64_t, int64_t t, const LoopPart&) { return gates + t * 4 * state; },
      [&](int64_t s, int64_t t, const float* hp, const LoopPart& part) {
        const int64_t j0 = part.j0, j1 = part.j1;
        const float* cp = s == 0 ? c0 : c_seq + step_position(s - 1, steps, p.direction) * state;
        float* g_t = gates + t * 4 * state;
        float* y_t = y + t * state;
        float* c_t = c_seq + t * state;
        for (int64_t b = part.b0; b < part.b1; ++b) {
          const int64_t bh = b * hidden;
          if (zoneout::step_active(t, lengths, b)) {
            row(g_t + 4 * bh, hp + bh, cp + bh, y_t + bh, c_t + bh, t, b, j0, j1, p);
          } else {
            copy_row(y_t + bh, hp + bh, j0, j1);
            copy_row(c_t + bh, cp + bh, j0, j1);
            zero_columns(g_t + 4 * bh, 4, hidden, j0, j1);
          }
        }
      },
      {{gates, 4 * state, 4 * hidden, 4, true}, {y, state, hidden, 1, true}, {c_seq, state, hidden, 1, true}}, input);
}

// The LSTM's fused backward: d_pre and the gradients reaching h_0 and c_0 (dh, dc), and the bias
// gradient's row sums (bias_sums). Those are two short chains, over the steps and then over the rows:
// one chain over all T*B rows lost too much (B=32 T=100 H=256: 12-14x the float32 reference's
// error, past the bench's three-way check); a chain of B, then one of T, as before BiasSums,
// 1.7-3.3x over 5 seeds; of T, then of B, 2.1-2.5x (B=16 T=400 H=64: 1.9-2.9x against 2.3-3.7x).
void fused_backward(const TileKernels& tiles, const float* grad_y, const float* gates, const float* c_seq,
                    const float* c0, float* dh, float* dc, float* d_pre, const BiasSums& bias_sums, const Tensor& w_hh,
                    const int64_t* lengths, int64_t steps, const ZoneoutParams& p, const CpuKernels& kernels) {
  const int64_t batch = p.batch, hidden = p.hidden, state = batch * hidden;
  const auto row = kernels.f32.lstm_backward;
  fused_backward_loop(
      tiles, w_hh, steps, p, backward_split(tiles, batch, w_hh), dh, 4 * hidden,
      [&](int64_t t) { return d_pre + t * 4 * state; },
      [&](int64_t s, int64_t t, const LoopPart& part) {
        const int64_t j0 = part.j0, j1 = part.j1;
        const float* cp = s == 0 ? c0 : c_seq + step_position(s - 1, steps, p.direction) * state;
        const float* gy_t = grad_y + t * state;
        const float* g_t = gates + t * 4 * state;
        float* dp_t = d_pre + t * 4 * state;
        for (int64_t b = part.b0; b < part.b1; ++b) {
          const int64_t bh = b * hidden;
          if (zoneout::step_active(t, lengths, b)) {
            row(g_t + 4 * bh, gy_t + bh, cp + bh, dh + bh, dc + bh, dp_t + 4 * bh, t, b, j0, j1, p);
            bias_sums.add(tiles, b, dp_t + 4 * bh, hidden, j0, j1);
          } else {
            add_row(dh + bh, gy_t + bh, j0, j1);
            zero_columns(dp_t + 4 * bh, 4, hidden, j0, j1);
          }
        }
        if (s > 0) {  // what the next element pass reads, fetched during the barrier and the products
          const int64_t t_next = step_position(s - 1, steps, p.direction);
          prefetch_units(gates + t_next * 4 * state, part, 4 * hidden, 4, hidden);
          prefetch_units(grad_y + t_next * state, part, hidden, 1, hidden);
          if (s > 1) prefetch_units(c_seq + step_position(s - 2, steps, p.direction) * state, part, hidden, 1, hidden);
        }
      });
}

// The GRU's and the RNN's fused loops (their per-step paths: gru_rnn_layer_forward/_backward).
// GRU forward: the products go into one [B, 3H] buffer, started from b_hh (b_hn stays inside the
// reset product), which only the thread's own units' columns are ever read from; RNN: onto the gates
// (x_t W_ih^T + both biases).
void fused_gru_rnn_forward(const TileKernels& tiles, int64_t cell, const float* x_proj, float* gates, float* y,
                           const float* h0, const Tensor& w_hh, const Tensor& b_hh, const int64_t* lengths,
                           int64_t steps, const ZoneoutParams& p, const CpuKernels& kernels) {
  const int64_t batch = p.batch, hidden = p.hidden, state = batch * hidden;
  const bool gru = cell == zoneout::kGru;
  const int64_t gate_rows = zoneout::cell_rows(static_cast<int>(cell)), rows = gate_rows * hidden;
  const int64_t saved = zoneout::cell_saved(static_cast<int>(cell)) * hidden;
  const Tensor recurrent = gru ? at::empty({batch, rows}, w_hh.options()) : Tensor();
  float* hh = gru ? recurrent.data_ptr<float>() : nullptr;
  const float* bias = b_hh.defined() ? b_hh.data_ptr<float>() : nullptr;
  const auto& row = kernels.f32;
  const auto rnn_row = row.rnn_forward[cell == zoneout::kRnnRelu ? 1 : 0];
  fused_forward_loop(
      tiles, w_hh, gate_rows, steps, p, h0, y, rows,
      [&](int64_t, int64_t t, const LoopPart& part) {
        if (!gru) return gates + t * state;  // the RNN's products add to its pre-activations
        for (int64_t b = part.b0; b < part.b1; ++b)
          for (int64_t q = 0; q < gate_rows; ++q) {
            float* dst = hh + b * rows + q * hidden;
            if (bias != nullptr) {
              std::copy(bias + q * hidden + part.j0, bias + q * hidden + part.j1, dst + part.j0);
            } else {
              std::fill(dst + part.j0, dst + part.j1, 0.0f);
            }
          }
        return hh;
      },
      [&](int64_t, int64_t t, const float* hp, const LoopPart& part) {
        const int64_t j0 = part.j0, j1 = part.j1;
        float* y_t = y + t * state;
        float* g_t = gates + t * batch * saved;
        const float* xp_t = x_proj + t * batch * rows;
        for (int64_t b = part.b0; b < part.b1; ++b) {
          const int64_t bh = b * hidden;
          if (!zoneout::step_active(t, lengths, b)) {
            copy_row(y_t + bh, hp + bh, j0, j1);
            zero_columns(g_t + b * saved, saved / hidden, hidden, j0, j1);
          } else if (gru) {
            row.gru_forward(xp_t + b * rows, hh + b * rows, hp + bh, g_t + b * saved, y_t + bh, t, b, j0, j1, p);
          } else {
            rnn_row(g_t + bh, hp + bh, y_t + bh, t, b, j0, j1, p);
          }
        }
      },
      {{gates, batch * saved, saved, saved / hidden, true},
       {y, state, hidden, 1, true},
       {x_proj, batch * rows, rows, gru ? gate_rows : 0, false}});  // the RNN's x_proj is its gates
}

// GRU / RNN backward: d_x, d_h as in gru_rnn_layer_backward (the same buffer for the RNN).
void fused_gru_rnn_backward(const TileKernels& tiles, int64_t cell, const float* grad_y, const float* gates,
                            const float* y, const float* h0, float* dh, float* d_x, float* d_h,
                            const BiasSums& input_sums, const BiasSums& recurrent_sums, const Tensor& w_hh,
                            const int64_t* lengths, int64_t steps, const ZoneoutParams& p, const CpuKernels& kernels) {
  const int64_t batch = p.batch, hidden = p.hidden, state = batch * hidden;
  const bool gru = cell == zoneout::kGru;
  const int64_t rows = zoneout::cell_rows(static_cast<int>(cell)) * hidden;
  const int64_t saved = zoneout::cell_saved(static_cast<int>(cell)) * hidden;
  const auto& row = kernels.f32;
  const auto rnn_row = row.rnn_backward[cell == zoneout::kRnnRelu ? 1 : 0];
  fused_backward_loop(
      tiles, w_hh, steps, p, backward_split(tiles, batch, w_hh), dh, rows,
      [&](int64_t t) { return d_h + t * batch * rows; },
      [&](int64_t s, int64_t t, const LoopPart& part) {
        const int64_t j0 = part.j0, j1 = part.j1;
        const float* hp = s == 0 ? h0 : y + step_position(s - 1, steps, p.direction) * state;
        const float* gy_t = grad_y + t * state;
        const float* g_t = gates + t * batch * saved;
        float* dx_t = d_x + t * batch * rows;
        float* dhh_t = d_h + t * batch * rows;
        for (int64_t b = part.b0; b < part.b1; ++b) {
          const int64_t bh = b * hidden;
          if (!zoneout::step_active(t, lengths, b)) {
            add_row(dh + bh, gy_t + bh, j0, j1);
            zero_columns(dx_t + b * rows, rows / hidden, hidden, j0, j1);
            if (gru) zero_columns(dhh_t + b * rows, rows / hidden, hidden, j0, j1);
          } else if (gru) {
            row.gru_backward(g_t + b * saved, gy_t + bh, hp + bh, dh + bh, dx_t + b * rows, dhh_t + b * rows, t, b,
                             j0, j1, p);
            input_sums.add(tiles, b, dx_t + b * rows, hidden, j0, j1);
            recurrent_sums.add(tiles, b, dhh_t + b * rows, hidden, j0, j1);
          } else {
            rnn_row(g_t + bh, gy_t + bh, dh + bh, dx_t + bh, t, b, j0, j1, p);
            input_sums.add(tiles, b, dx_t + bh, hidden, j0, j1);
          }
        }
      });
}

}  // namespace

const char* isa_name(int64_t isa) {
  switch (isa) {
    case kIsaScalar: return "scalar";
    case kIsaAvx2: return "avx2";
    case kIsaAvx512: return "avx512";
    default: return "unknown";
  }
}

bool cpu_isa_supported(int64_t isa) { return isa_supported(isa); }

int64_t cpu_isa() { return active_isa.load(); }

int64_t set_cpu_isa(int64_t isa) {
  TORCH_CHECK(isa >= kIsaScalar && isa <= kIsaAvx512, "isa must be 0 (scalar), 1 (avx2) or 2 (avx512), got ", isa);
  TORCH_CHECK(isa_supported(isa), "this CPU (or build) cannot run the ", isa_name(isa), " kernels");
  return active_isa.exchange(isa);
}

int64_t cpu_loop() { return loop_choice(); }

int64_t set_cpu_loop(int64_t loop) { return loop_setting.set(loop); }

int64_t cpu_split() { return split_choice(); }

int64_t set_cpu_split(int64_t split) { return split_setting.set(split); }

int64_t cpu_panels() { return panels_setting.get(); }

int64_t set_cpu_panels(int64_t panels) { return panels_setting.set(panels); }

int64_t cpu_input() { return input_setting.get(); }

int64_t set_cpu_input(int64_t input) { return input_setting.set(input); }

int64_t cpu_order() { return order_setting.get(); }

int64_t set_cpu_order(int64_t order) { return order_setting.set(order); }

bool philox_words_test_hook(uint64_t seed, uint64_t first, uint32_t c2, uint32_t c3, int64_t n, uint32_t* r0,
                            uint32_t* r1, uint32_t* r2, int64_t isa) {
  if (isa < 0) isa = active_isa.load();
  if (!isa_supported(isa)) return false;
  const PhiloxRunFn run = kernels_for(isa).philox_run;
  for (int64_t k0 = 0; k0 < n; k0 += kChunk) {  // the chunking draw_masks_stream0 uses
    const int64_t m = std::min(kChunk, n - k0);
    philox_words(seed, first + static_cast<uint64_t>(k0), c2, c3, m, r0 + k0, r1 + k0, r2 + k0, run);
  }
  return true;
}

#if defined(ZF_X86_PHILOX)
// out[k] = f(x[k]) for whole vectors of V (n a multiple of its lanes); f: 0 exp, 1 tanh, 2 sigmoid.
template <typename V>
ZF_ALWAYS_INLINE void vector_math(const float* x, float* out, int64_t n, int64_t f) {
  for (int64_t k = 0; k < n; k += V::kLanes) {
    const V v = V::load(x + k);
    (f == 0 ? zf_exp(v) : f == 1 ? zf_tanh(v) : zoneout::zf_sigmoid(v)).store(out + k);
  }
}
ZF_TARGET_AVX512 ZF_FLATTEN void vector_math_avx512(const float* x, float* out, int64_t n, int64_t f) {
  vector_math<F32x16>(x, out, n, f);
}
ZF_TARGET_AVX2_FMA ZF_FLATTEN void vector_math_avx2(const float* x, float* out, int64_t n, int64_t f) {
  vector_math<F32x8>(x, out, n, f);
}

// out[k] = 1 where the mask rows keep a unit whose Philox word is words[k], else 0, by select_by_word.
template <typename V>
ZF_ALWAYS_INLINE void keep_by_word(const uint32_t* words, float* out, int64_t n, int32_t last) {
  for (int64_t k = 0; k < n; k += V::kLanes) V::select_by_word(words + k, last, V(1.0f), V(0.0f)).store(out + k);
}
ZF_TARGET_AVX512 ZF_FLATTEN void keep_by_word_avx512(const uint32_t* words, float* out, int64_t n, int32_t last) {
  keep_by_word<F32x16>(words, out, n, last);
}
ZF_TARGET_AVX2_FMA ZF_FLATTEN void keep_by_word_avx2(const uint32_t* words, float* out, int64_t n, int32_t last) {
  keep_by_word<F32x8>(words, out, n, last);
}

// A test hook's vector form for isa (its AVX-512 or AVX2 copy) called with args; false where isa
// has none here.
template <typename... Args>
bool call_vector_form(int64_t isa, void (*avx512)(Args...), void (*avx2)(Args...), Args... args) {
  if (!isa_supported(isa) || (isa != kIsaAvx512 && isa != kIsaAvx2)) return false;
  (isa == kIsaAvx512 ? avx512 : avx2)(args...);
  return true;
}
#endif

bool keep_by_word_test_hook(const uint32_t* words, float* out, int64_t n, double z, int64_t isa) {
  if (!isa_supported(isa) || n % 16 != 0) return false;
  const int32_t last = last_word_below(static_cast<float>(z));
#if defined(ZF_X86_PHILOX)
  if (call_vector_form(isa, keep_by_word_avx512, keep_by_word_avx2, words, out, n, last)) return true;
#endif
  for (int64_t k = 0; k < n; ++k) out[k] = folded_word_at_most(words[k], last) ? 1.0f : 0.0f;
  return true;
}

bool vector_math_test_hook(const float* x, float* out, int64_t n, int64_t function, int64_t isa) {
#if defined(ZF_X86_PHILOX)
  return n % 16 == 0 && call_vector_form(isa, vector_math_avx512, vector_math_avx2, x, out, n, function);
#else
  return false;
#endif
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_forward(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                                         const Tensor& w_ih, const Tensor& w_hh, const Tensor& bias,
                                                         const Tensor& lengths, const zoneout::ZoneoutParams& params) {
  // The internal views and products below are not for autograd: skip its bookkeeping.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t steps = x.size(0), batch = x.size(1), hidden = w_hh.size(1);
  const int direction = params.direction;
  const CpuKernels& kernels = active_kernels();
  const int64_t* len = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  const TileKernels* tiles = fused_loop_kernels(x, steps, hidden, /*forward=*/true);
  Tensor y = pooled_empty({steps, batch, hidden}, x.options());
  Tensor c_seq = pooled_empty({steps, batch, hidden}, x.options());
  if (tiles != nullptr) {  // the fused loop forms each step's input part itself
    const bool in_loop = input_part_in_loop(x.size(2), 4 * hidden);
    Tensor gates = in_loop ? pooled_empty({steps, batch, 4 * hidden}, x.options()) : input_projection(tiles, x, w_ih, bias, 4);
    const StepInput input{x.data_ptr<float>(), &w_ih, bias.defined() ? bias.data_ptr<float>() : nullptr};
    fused_forward(*tiles, gates.data_ptr<float>(), y.data_ptr<float>(), c_seq.data_ptr<float>(), h0.data_ptr<float>(),
                  c0.data_ptr<float>(), in_loop ? &input : nullptr, w_hh, len, steps, params, kernels);
    return {y, c_seq[step_position(steps - 1, steps, direction)].clone(), c_seq, gates};
  }
  // Input projection of every step at once: the buffer where the pre-activations live.
  Tensor gates = input_projection(tiles, x, w_ih, bias, 4);
  const Tensor w_rec = steps > 1 ? prepare_weight(w_hh, batch) : w_hh;  // packed once, used every step

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "zoneout_cpu_layer_forward", [&] {
    // Raw pointers per step: only the GEMM's operands are Tensor views (each select costs
    // about a microsecond of dispatch, per step).
    scalar_t* y_p = y.data_ptr<scalar_t>();
    scalar_t* c_p = c_seq.data_ptr<scalar_t>();
    scalar_t* g_p = gates.data_ptr<scalar_t>();
    const int64_t state = batch * hidden;
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = step_position(s, steps, direction);
      const int64_t t_prev = s == 0 ? -1 : step_position(s - 1, steps, direction);
      const Tensor h_prev = t_prev < 0 ? h0 : y[t_prev];
      const scalar_t* c_prev = t_prev < 0 ? c0.data_ptr<scalar_t>() : c_p + t_prev * state;
      Tensor gates_t = gates[t];
      add_linear_product_(gates_t, h_prev, w_rec);  // the step's one GEMM, accumulated onto x_t W_ih^T + b
      forward_pointwise<scalar_t>(g_p + t * 4 * state, h_prev.data_ptr<scalar_t>(), c_prev, y_p + t * state,
                                  c_p + t * state, len, t, params, kernels);
    }
  });
  Tensor c_n = c_seq[step_position(steps - 1, steps, direction)].clone();
  return {y, c_n, c_seq, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_backward(
    const Tensor& grad_y, const Tensor& grad_c_n, const Tensor& x, const Tensor& h0, const Tensor& c0,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& lengths, const Tensor& y, const Tensor& c_seq,
    const Tensor& gates, const zoneout::ZoneoutParams& params) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in layer_forward
  const int64_t steps = x.size(0), batch = x.size(1), hidden = w_hh.size(1);
  const int direction = params.direction;
  const int64_t* len = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;

  Tensor d_pre = scratch(kScratchGradients, {steps, batch, 4 * hidden}, x.options());
  Tensor dh = at::zeros({batch, hidden}, x.options());  // h_n's gradient is already in grad_y
  Tensor dc = grad_c_n.clone();
  const CpuKernels& kernels = active_kernels();
  const TileKernels* tiles = fused_loop_kernels(x, steps, hidden, /*forward=*/false);
  Tensor grad_bias;
  if (tiles != nullptr) {
    const BiasSums bias_sums(batch, 4 * hidden);
    fused_backward(*tiles, grad_y.data_ptr<float>(), gates.data_ptr<float>(), c_seq.data_ptr<float>(),
                   c0.data_ptr<float>(), dh.data_ptr<float>(), dc.data_ptr<float>(), d_pre.data_ptr<float>(),
                   bias_sums, w_hh, len, steps, params, kernels);
    grad_bias = bias_sums.total(*tiles);
  } else {
    // [H, 4H]: dh += d_pre_t W_hh is a product with W_hh's transpose (packed once and used every
    // step of a sequence; a one-step call reads it as a view).
    const Tensor w_hh_t = steps > 1 ? prepare_weight(w_hh.t().contiguous(), batch) : w_hh.t();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "zoneout_cpu_layer_backward", [&] {
      const scalar_t* gy_p = grad_y.data_ptr<scalar_t>();
      const scalar_t* g_p = gates.data_ptr<scalar_t>();
      const scalar_t* c_p = c_seq.data_ptr<scalar_t>();
      const int64_t state = batch * hidden;
      for (int64_t s = steps - 1; s >= 0; --s) {  // processed steps, last first
        const int64_t t = step_position(s, steps, direction);
        const scalar_t* c_prev = s == 0 ? c0.data_ptr<scalar_t>() : c_p + step_position(s - 1, steps, direction) * state;
        Tensor d_pre_t = d_pre[t];
        backward_pointwise<scalar_t>(gy_p + t * state, g_p + t * 4 * state, c_prev, dh.data_ptr<scalar_t>(),
                                     dc.data_ptr<scalar_t>(), d_pre_t.data_ptr<scalar_t>(), len, t, params, kernels);
        add_linear_product_(dh, d_pre_t, w_hh_t);  // the step's one GEMM: the W_hh path to h_{t-1}
      }
    });
  }

  // Weight and input gradients: large products over all steps.
  const Tensor d_pre_2d = d_pre.view({steps * batch, 4 * hidden});
  const Tensor grad_x = input_gradient(tiles, d_pre, w_ih);
  const auto [grad_w_ih, grad_w_hh] = weight_gradients(tiles, d_pre, d_pre, x, y, h0, direction);
  if (!grad_bias.defined()) grad_bias = d_pre_2d.sum(0);
  return {grad_x, dh, dc, grad_w_ih, grad_w_hh, grad_bias};
}

// ---------------------------------------------------------------------------------------
// GRU and plain RNN (contract sec. 4). Forward: the input part of every step is one product
// (for the RNN written straight into the gates buffer, both biases included); each step adds
// the recurrent part (one GEMM: for the GRU into a [B, 3H] buffer with b_hh, as b_hn stays
// inside the reset product; for the RNN onto the gates) and one fused element-wise pass makes
// the gates and y[t]. Backward: one fused pass and one GEMM per step, then the products over
// all steps. The GRU keeps two pre-activation gradients, of the input part and of the
// recurrent part (they differ in the n row: d_hp_n = d_n * r); the RNN's are one. The fused time
// loop of float32 sequences runs the same steps (fused_gru_rnn_forward / _backward).
// ---------------------------------------------------------------------------------------
namespace {

Tensor optional_sum(const Tensor& a, const Tensor& b) {
  if (a.defined() && b.defined()) return a + b;
  return a.defined() ? a : b;
}


}  // namespace

std::tuple<Tensor, Tensor> gru_rnn_layer_forward(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                                 const Tensor& w_hh, const Tensor& b_ih, const Tensor& b_hh,
                                                 const Tensor& lengths, int64_t cell,
                                                 const zoneout::ZoneoutParams& params) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in layer_forward
  const int64_t steps = x.size(0), batch = x.size(1), hidden = h0.size(1);
  const bool gru = cell == zoneout::kGru;
  const int64_t rows = zoneout::cell_rows(static_cast<int>(cell)) * hidden;
  const int64_t saved = zoneout::cell_saved(static_cast<int>(cell)) * hidden;
  const TileKernels* tiles = fused_loop_kernels(x, steps, hidden, /*forward=*/true);
  Tensor y = pooled_empty({steps, batch, hidden}, x.options());
  // The input part of every step: the GRU's in its own buffer, the RNN's as the buffer where
  // its pre-activations accumulate (with both biases: they are simply summed there).
  const Tensor x_proj = input_projection(tiles, x, w_ih, gru ? b_ih : optional_sum(b_ih, b_hh), rows / hidden);
  Tensor gates = gru ? pooled_empty({steps, batch, saved}, x.options()) : x_proj;
  const int64_t* len = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  const int direction = params.direction;
  const CpuKernels& kernels = active_kernels();
  if (tiles != nullptr) {
    fused_gru_rnn_forward(*tiles, cell, x_proj.data_ptr<float>(), gates.data_ptr<float>(), y.data_ptr<float>(),
                          h0.data_ptr<float>(), w_hh, b_hh, len, steps, params, kernels);
    return {y, gates};
  }
  const Tensor w_rec = steps > 1 ? prepare_weight(w_hh, batch) : w_hh;  // packed once, used every step

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "zoneout_cpu_gru_rnn_layer_forward", [&] {
    scalar_t* y_p = y.data_ptr<scalar_t>();
    scalar_t* g_p = gates.data_ptr<scalar_t>();
    const scalar_t* xp_p = x_proj.data_ptr<scalar_t>();
    const auto& row = kernels.rows(y_p);
    const auto rnn_row = row.rnn_forward[cell == zoneout::kRnnRelu ? 1 : 0];
    const int64_t state = batch * hidden;
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = step_position(s, steps, direction);
      const int64_t t_prev = s == 0 ? -1 : step_position(s - 1, steps, direction);
      const Tensor h_prev = t_prev < 0 ? h0 : y[t_prev];
      const scalar_t* hp = h_prev.data_ptr<scalar_t>();
      scalar_t* y_t = y_p + t * state;
      scalar_t* g_t = g_p + t * batch * saved;
      if (gru) {
        const Tensor h_proj = linear_product(h_prev, w_rec, b_hh);  // the step's one GEMM, b_hh included
        const scalar_t* xp_t = xp_p + t * batch * rows;
        const scalar_t* hh = h_proj.data_ptr<scalar_t>();
        for_step_rows(
            params, len, t,
            [&](int64_t b, int64_t j0, int64_t j1) {
              row.gru_forward(xp_t + b * rows, hh + b * rows, hp + b * hidden, g_t + b * saved, y_t + b * hidden, t,
                              b, j0, j1, params);
            },
            [&](int64_t b, int64_t j0, int64_t j1) {
              copy_row(y_t + b * hidden, hp + b * hidden, j0, j1);
              zero_columns(g_t + b * saved, 4, hidden, j0, j1);
            });
      } else {
        Tensor gates_t = gates[t];
        add_linear_product_(gates_t, h_prev, w_rec);  // onto x_t W_ih^T + b_ih + b_hh
        for_step_rows(
            params, len, t,
            [&](int64_t b, int64_t j0, int64_t j1) {
              rnn_row(g_t + b * hidden, hp + b * hidden, y_t + b * hidden, t, b, j0, j1, params);
            },
            [&](int64_t b, int64_t j0, int64_t j1) {
              copy_row(y_t + b * hidden, hp + b * hidden, j0, j1);
              zero_columns(g_t + b * hidden, 1, hidden, j0, j1);
            });
      }
    }
  });
  return {y, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_rnn_layer_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh,
    const Tensor& lengths, const Tensor& y, const Tensor& gates, int64_t cell, const zoneout::ZoneoutParams& params) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in layer_forward
  const int64_t steps = x.size(0), batch = x.size(1), hidden = h0.size(1);
  const bool gru = cell == zoneout::kGru;
  const int64_t rows = zoneout::cell_rows(static_cast<int>(cell)) * hidden;
  const int64_t saved = zoneout::cell_saved(static_cast<int>(cell)) * hidden;
  const int direction = params.direction;
  const int64_t* len = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  Tensor d_x = scratch(kScratchGradients, {steps, batch, rows}, x.options());  // gradient of the input part
  Tensor d_h = gru ? scratch(kScratchRecurrentGradients, {steps, batch, rows}, x.options()) : d_x;  // ... of the recurrent part
  Tensor dh = at::zeros({batch, hidden}, x.options());  // h_n's gradient is already in grad_y
  const CpuKernels& kernels = active_kernels();
  const TileKernels* tiles = fused_loop_kernels(x, steps, hidden, /*forward=*/false);
  Tensor grad_b_ih, grad_b_hh;
  if (tiles != nullptr) {
    const BiasSums input_sums(batch, rows), recurrent_sums(gru ? batch : 0, rows);
    fused_gru_rnn_backward(*tiles, cell, grad_y.data_ptr<float>(), gates.data_ptr<float>(), y.data_ptr<float>(),
                           h0.data_ptr<float>(), dh.data_ptr<float>(), d_x.data_ptr<float>(), d_h.data_ptr<float>(),
                           input_sums, recurrent_sums, w_hh, len, steps, params, kernels);
    grad_b_ih = input_sums.total(*tiles);
    if (gru) grad_b_hh = recurrent_sums.total(*tiles);
  } else {
    const Tensor w_hh_t = steps > 1 ? prepare_weight(w_hh.t().contiguous(), batch) : w_hh.t();

    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "zoneout_cpu_gru_rnn_layer_backward", [&] {
      const scalar_t* gy_p = grad_y.data_ptr<scalar_t>();
      const scalar_t* g_p = gates.data_ptr<scalar_t>();
      const scalar_t* y_p = y.data_ptr<scalar_t>();
      scalar_t* dx_p = d_x.data_ptr<scalar_t>();
      scalar_t* dhh_p = d_h.data_ptr<scalar_t>();
      scalar_t* dh_p = dh.data_ptr<scalar_t>();
      const auto& row = kernels.rows(dh_p);
      const auto rnn_row = row.rnn_backward[cell == zoneout::kRnnRelu ? 1 : 0];
      const int64_t state = batch * hidden;
      for (int64_t s = steps - 1; s >= 0; --s) {  // processed steps, last first
        const int64_t t = step_position(s, steps, direction);
        const scalar_t* hp = s == 0 ? h0.data_ptr<scalar_t>() : y_p + step_position(s - 1, steps, direction) * state;
        const scalar_t* gy_t = gy_p + t * state;
        const scalar_t* g_t = g_p + t * batch * saved;
        scalar_t* dx_t = dx_p + t * batch * rows;
        scalar_t* dhh_t = dhh_p + t * batch * rows;
        for_step_rows(
            params, len, t,
            [&](int64_t b, int64_t j0, int64_t j1) {
              if (gru) {
                row.gru_backward(g_t + b * saved, gy_t + b * hidden, hp + b * hidden, dh_p + b * hidden,
                                 dx_t + b * rows, dhh_t + b * rows, t, b, j0, j1, params);
              } else {
                rnn_row(g_t + b * hidden, gy_t + b * hidden, dh_p + b * hidden, dx_t + b * hidden, t, b, j0, j1,
                        params);
              }
            },
            [&](int64_t b, int64_t j0, int64_t j1) {
              add_row(dh_p + b * hidden, gy_t + b * hidden, j0, j1);
              zero_columns(dx_t + b * rows, rows / hidden, hidden, j0, j1);
              if (gru) zero_columns(dhh_t + b * rows, rows / hidden, hidden, j0, j1);
            });
        add_linear_product_(dh, d_h[t], w_hh_t);  // the step's one GEMM: the W_hh path to h_{t-1}
      }
    });
  }

  const Tensor d_x_2d = d_x.view({steps * batch, rows});
  const Tensor grad_x = input_gradient(tiles, d_x, w_ih);
  const auto [grad_w_ih, grad_w_hh] = weight_gradients(tiles, d_x, d_h, x, y, h0, direction);
  if (!grad_b_ih.defined()) grad_b_ih = d_x_2d.sum(0);
  if (!grad_b_hh.defined()) grad_b_hh = gru ? d_h.view({steps * batch, rows}).sum(0) : grad_b_ih.clone();
  return {grad_x, dh, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
}

}  // namespace zoneout_cpu
