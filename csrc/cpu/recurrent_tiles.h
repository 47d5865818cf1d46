// recurrent_tiles.h: register-blocked float32 products for the fused CPU time loop
// (lstm_cpu.cpp, "fused" loop): a few rows of a state times a panel of a recurrent weight packed
// for one thread's units, kept in vector registers for the whole depth. Included by lstm_cpu.cpp
// only (it defines ZF_TARGET_AVX2 / ZF_TARGET_AVX512 and ZF_ALWAYS_INLINE first).
//
// Why our own products: at a sequence layer's per-step shapes (e.g. [32,128]x[128,512]) the
// product is tens of microseconds, and an ATen or oneDNN call around it (dispatch, a fresh output,
// the accumulation pass, a fork/join of threads) costs as much again; here each thread forms only
// its part (its units' columns, or its example rows), straight into the buffer its element pass reads
// next, inside one parallel region for the whole sequence. Every output is one FMA chain over the
// depth in order, or over a long depth partial sums of fixed spans added in order (lstm_cpu.cpp's
// kSumSteps), so results do not depend on the thread count or the part.
#pragma once

#include <cstdint>
#include <utility>

namespace zoneout_cpu {

// The most rows one product covers for a panel of `vectors` vectors: rows x vectors accumulators
// plus the panel's vectors and a broadcast stay within the register file (16 vector registers
// for AVX2, 32 for AVX-512: more rows per panel load there).
constexpr int tile_rows(int registers, int vectors) {
  return registers == 32 ? (vectors >= 4 ? 6 : vectors == 3 ? 8 : vectors == 2 ? 12 : 16)
                         : (vectors >= 4 ? 3 : vectors == 3 ? 4 : vectors == 2 ? 6 : 8);
}

// Whether a tile's panel vectors fit in registers beside its accumulators and a broadcast. Then the
// product pins them there: left to itself, GCC folds a panel vector used by 3 rows or fewer into
// each FMA as a memory operand, one load per FMA, and such tiles ran at half the FMA rate (1-3 row
// AVX-512 tiles 95-111 GFLOP/s a core, pinned 2-3 rows 173-227, against 239-245 for 4-6 rows).
// AVX2's 4-vector tiles keep 3 rows, unpinned (17 registers): 2 pinned rows ran the forward's
// product a little faster (114 GFLOP/s against 108) but a fwd+bwd 10% slower (B=32 T=50 H=256,
// the weight gradients).
constexpr bool pin_panel(int registers, int rows, int vectors) { return rows * vectors + vectors + 1 <= registers; }

// Rows per block when `batch` rows are cut into the fewest blocks of at most `max_rows`, as evenly
// as possible (block i covers [block_start(i), block_start(i + 1))): no short last block, whose
// few rows per panel load would run it at half the rate (B = 32 in 6-row tiles: 6+6+6+6+6+2 ran
// the product at 222 GFLOP/s a core, 6+6+5+5+5+5 at 245).
struct RowBlocks {
  int64_t count, total;
  RowBlocks(int64_t total_rows, int64_t max_rows) : count((total_rows + max_rows - 1) / max_rows), total(total_rows) {}
  int64_t start(int64_t i) const { return total * i / count; }
  int64_t rows(int64_t i) const { return start(i + 1) - start(i); }
};
constexpr int kMaxTileVectors = 4;
constexpr int kLineFloats = 16;  // a 64-byte cache line
constexpr int kMaxTileRows = 16;
constexpr int kMaxTileLanes = 16;

// A segment of a product's depth that comes first, from operands of its own (TileOperands::lead).
struct LeadSegment {
  const float* a;      // rows lda apart, depth steps ldk apart (TileOperands' ldk)
  int64_t lda;
  const float* panel;  // depth steps ldp apart (TileOperands' ldp)
  int64_t depth;
};

// The operands of one tile product: rows r < kRows of a (element k at a[r * lda + k * ldk]), a
// panel of V vectors per depth step k (at panel[k * ldp + v * lanes]), and the destination tile
// (c[r * ldc_row + v * ldc_vector + l]); `start`, when set, is one row (start[v * ldc_vector + l])
// that every row's chains start from instead of c's contents (a bias: c need not be written first).
// `lead` (depth > 0) is a segment the chains run through before a and panel: the LSTM's input part
// x_t W_ih^T before the recurrent h_{t-1} W_hh^T, one chain through both (the bits of the two as
// separate products, the first stored and read back, without that store and a second pass).
struct TileOperands {
  const float* a;
  int64_t lda, ldk;
  const float* panel;
  int64_t ldp;
  float* c;
  int64_t ldc_row, ldc_vector;
  const float* start = nullptr;
  LeadSegment lead = {nullptr, 0, nullptr, 0};
  // Where set, a panel laid out like `panel` that the product asks L2 for as it goes, depth step k's
  // vectors at step k (_MM_HINT_T1): the next tile's, while it comes from L3 (lstm_cpu.cpp's
  // tile_products).
  const float* prefetch = nullptr;
  // Where > 0, the product asks L1 for its own panel this many depth steps ahead as it goes (_MM_HINT_T0),
  // in the recurrent segment: for a panel past L1's size, read from L2 by every row block (lstm_cpu.cpp's
  // panel_prefetch_steps).
  int64_t prefetch_ahead = 0;
};

// c[r][v][l] = (start ? start[v][l] : c[r][v][l]) + the sum over k < depth, in order (one FMA
// chain), of a[r][k] * panel[k][v][l], for r < rows, v < V, l < lanes, that chain first running
// through lead's depth steps likewise. The adding form (TileKernels::product_add) forms the sum from
// zero and then adds it to c[r][v][l] (`start` and `lead` unread): a partial sum, so that a long sum is
// not one chain (see lstm_cpu.cpp's kSumSteps).
using TileProductFn = void (*)(const TileOperands& o, int64_t depth);

// dst[k * ldd + v] = src[v * lds + k] for v, k < lanes: a square block of a weight turned into
// rows of a panel (forward_panels), in registers.
using TransposeFn = void (*)(const float* src, int64_t lds, float* dst, int64_t ldd);

// out[k] += in[k] for k < n.
using AddFn = void (*)(float* out, const float* in, int64_t n);

struct TileKernels {
  int64_t lanes = 0;  // floats per vector; 0 where this instruction set has no tile kernels
  TransposeFn transpose = nullptr;
  AddFn add = nullptr;
  // Where a thread's rows of the pre-activation gradients in one depth chunk of the weight gradients
  // exceed this many bytes, tiled_product packs them first (lstm_cpu.cpp). fwd+bwd backward, 2
  // threads: AVX2 (256-step chunks) B=32 T=100 H=256 20.9-21.4 ms against 23.9-24.2 unpacked and
  // 21.4-21.7 by oneDNN; AVX-512 (128-step chunks) B=32 T=35 I=H=1000 87.8 against 89.9, but B=32 T=50
  // H=512 (512 KB a thread) 19.2 against 18.8, so from past 512 KB only.
  int64_t pack_rows_bytes = 0;
  // Column tiles of the input gradient (d_pre W_ih) span at most this many vectors: AVX2's 4-vector
  // tiles hold 3 rows, unpinned (see pin_panel); its pinned 2-vector tiles of 6 rows formed B=32 T=50
  // I=256 H=512's input gradient in 7.0-7.2 ms against 8.1-8.5.
  int64_t input_gradient_vectors = 0;
  // Column tiles of the weight gradients (d_pre^T x, d_pre^T h) span at most this many vectors. AVX2's
  // 4-vector tiles, unpinned, make 15 loads per 12 FMAs (3 broadcasts, and 12 panel loads folded into
  // the FMAs), more than CPUs with two loads a cycle (Haswell to Skylake, Zen 2) serve in the 6 cycles
  // of 12 FMAs; its 3-vector tiles of 4 rows, pinned, make 7. On this Zen 5 (four loads a cycle)
  // they measured level or a little faster: backward, in one process, the tiles set call by call, B=32
  // T=50 I=64 H=64 / H=512 4% / 1.3% less, B=32 T=100 H=256 and the 1x256 encoder 0.8-0.9%, B=64 T=50
  // H=128 0.8% more.
  int64_t weight_gradient_vectors = 0;
  // Forward panels (one tile of units in each gate row) of at least this many bytes (0: none) are
  // formed half their vectors at a time, in twice the rows: a panel past L1's size is read from L2
  // once per row block, and half-width tiles of 12 rows read half as much of it per FMA. AVX-512,
  // B=32 T=50 I=64 H=512 forward (a 128 KB panel per tile of units): 9.9-10.5 ms against 10.8-10.9;
  // at H=256 (64 KB) and below no faster. AVX2 (6-row half tiles): 19.7-19.8 against 19.0-19.3 at
  // H=512, so never. Measured on a Zen 5; on Intel CPUs see intel_half_panels.
  int64_t split_panel_bytes = 0;
  // Whether on Intel CPUs the forward forms panels past 7/8 of L1 in halves (lstm_cpu.cpp,
  // split_panel_threshold), instead of split_panel_bytes. 2-vCPU Xeon (48 KB of L1), B=32 T=50 I=64, the
  // choice set call by call in one process, whole / half per round (lower quartile, median, upper; 10
  // rounds): AVX2 forward H=288 (45 KB panels) 1.05, 1.07, 1.09, H=320 1.09, 1.10, 1.11, H=384 1.05, 1.05,
  // 1.07, H=512 1.03, 1.04, 1.06 (B=16 1.08, 1.09, 1.12), fwd+bwd 1.00-1.03, 1.02-1.04, 1.03-1.06 (two
  // runs); the 1x256 encoder (I=512) 1.06, 1.08, 1.08; at H=256 (40 KB) 0.98, 0.99, 1.01 (T=100 0.98, 0.99,
  // 0.99). AVX-512's whole 4-vector tiles were ahead at every size there (lstm_cpu.cpp, panels_setting).
  bool intel_half_panels = false;
  // A fused time loop splits a step between threads by example rows rather than by units (lstm_cpu.cpp,
  // LoopSplit) where its panels come to at most this many bytes per row of a thread.
  int64_t row_split_bytes = 0;
  // From this hidden size (0: never) the fused backward's panels span 3 vectors of units, not 2
  // (lstm_cpu.cpp, backward_panel_vectors). AVX2: its 3-vector tiles of 4 rows, pinned (see pin_panel),
  // make 7 loads per 12 FMAs against 8 for 2 vectors of 6 rows. Zen 5, AVX2, B=32 T=50 I=64, the choice
  // set call by call in one process, the backward loop's time as 2 vectors / 3 (median of 14-30 calls
  // each): H=320 1.05, H=384 1.06 and 1.09, H=512 1.07 and 1.04, B=16 H=512 1.03, B=64 T=20 H=512 1.00;
  // fwd+bwd (per-round medians) LSTM H=512 1.02, GRU H=512 and H=384 1.03. Below, level: H=256 1.02 and
  // 1.01, B=32 T=100 H=256 1.00, B=64 T=50 I=32 H=128 0.98-1.00 (24-unit panels leave up to 12% of a last
  // panel padding there). AVX-512 measured level or mixed with 3 (H=256 0.99, H=384 1.05, H=512 1.01).
  int64_t wide_backward_hidden = 0;
  int64_t max_rows[kMaxTileVectors] = {};  // [V - 1]: tile_rows for this register file
  // product[V - 1][rows - 1]: V = 1..kMaxTileVectors, rows = 1..max_rows[V - 1]; product_add: the
  // adding form.
  TileProductFn product[kMaxTileVectors][kMaxTileRows] = {};
  TileProductFn product_add[kMaxTileVectors][kMaxTileRows] = {};
  TileProductFn get(int64_t vectors, int64_t rows, bool add = false) const {
    return (add ? product_add : product)[vectors - 1][rows - 1];
  }
};

#if defined(ZF_X86_PHILOX)
// One body for both instruction sets; the vector type and intrinsics and the target differ.
// (kAdd, the adding form, is a template argument: a run-time choice between the two starts and ends
// left GCC keeping the accumulators or the panel vectors on the stack inside the depth loop.)
#define ZF_TILE_PRODUCT(NAME, TARGET, V, LANES, REGISTERS, SET1, ZERO, LOAD, FMA, ADD, STORE)              \
  template <int kRows, int kVectors, bool kAdd>                                                           \
  TARGET void NAME(const TileOperands& o, int64_t depth) {                                                \
    constexpr bool kPin = pin_panel(REGISTERS, kRows, kVectors);                                          \
    V acc[kRows][kVectors];                                                                               \
    const float* c0 = o.start != nullptr ? o.start : o.c;                                                 \
    const int64_t ldc0 = o.start != nullptr ? 0 : o.ldc_row;                                              \
    for (int r = 0; r < kRows; ++r)                                                                       \
      for (int v = 0; v < kVectors; ++v) {                                                                \
        if constexpr (kAdd) {                                                                             \
          acc[r][v] = ZERO();                                                                             \
        } else {                                                                                          \
          acc[r][v] = LOAD(c0 + r * ldc0 + v * o.ldc_vector);                                             \
        }                                                                                                 \
      }                                                                                                   \
    const bool lead = !kAdd && o.lead.depth > 0;                                                          \
    for (int segment = lead ? 0 : 1; segment < 2; ++segment) {                                            \
      const float* a_k = segment == 0 ? o.lead.a : o.a;                                                   \
      const float* w_k = segment == 0 ? o.lead.panel : o.panel;                                           \
      const int64_t lda = segment == 0 ? o.lead.lda : o.lda, steps = segment == 0 ? o.lead.depth : depth; \
      const float* prefetch_k = segment == 1 ? o.prefetch : nullptr;                                      \
      const float* ahead_k = segment == 1 && o.prefetch_ahead > 0 ? w_k + o.prefetch_ahead * o.ldp : nullptr; \
      for (int64_t k = 0; k < steps; ++k, a_k += o.ldk, w_k += o.ldp) {                                  \
        if (prefetch_k != nullptr) {                                                                      \
          for (int l = 0; l < kVectors * LANES; l += kLineFloats)                                         \
            _mm_prefetch(reinterpret_cast<const char*>(prefetch_k + l), _MM_HINT_T1);                     \
          prefetch_k += o.ldp;                                                                            \
        }                                                                                                 \
        if (ahead_k != nullptr) {                                                                         \
          for (int l = 0; l < kVectors * LANES; l += kLineFloats)                                         \
            _mm_prefetch(reinterpret_cast<const char*>(ahead_k + l), _MM_HINT_T0);                        \
          ahead_k += o.ldp;                                                                               \
        }                                                                                                 \
        V w[kVectors];                                                                                    \
        for (int v = 0; v < kVectors; ++v) {                                                              \
          w[v] = LOAD(w_k + v * LANES);                                                                   \
          if constexpr (kPin) asm("" : "+v"(w[v])); /* in a register from here: see pin_panel */          \
        }                                                                                                 \
        for (int r = 0; r < kRows; ++r) {                                                                 \
          const V a_rk = SET1(a_k[r * lda]);                                                              \
          for (int v = 0; v < kVectors; ++v) acc[r][v] = FMA(a_rk, w[v], acc[r][v]);                      \
        }                                                                                                 \
      }                                                                                                   \
    }                                                                                                     \
    for (int r = 0; r < kRows; ++r)                                                                       \
      for (int v = 0; v < kVectors; ++v) {                                                                \
        float* c = o.c + r * o.ldc_row + v * o.ldc_vector;                                                \
        if constexpr (kAdd) {                                                                             \
          STORE(c, ADD(LOAD(c), acc[r][v]));                                                              \
        } else {                                                                                          \
          STORE(c, acc[r][v]);                                                                            \
        }                                                                                                 \
      }                                                                                                   \
  }

ZF_TILE_PRODUCT(tile_product_avx512, ZF_TARGET_AVX512, __m512, 16, 32, _mm512_set1_ps, _mm512_setzero_ps,
                _mm512_loadu_ps, _mm512_fmadd_ps, _mm512_add_ps, _mm512_storeu_ps)
ZF_TILE_PRODUCT(tile_product_avx2, ZF_TARGET_AVX2_FMA, __m256, 8, 16, _mm256_set1_ps, _mm256_setzero_ps,
                _mm256_loadu_ps, _mm256_fmadd_ps, _mm256_add_ps, _mm256_storeu_ps)
#undef ZF_TILE_PRODUCT

// 16 x 16: pairs of rows interleaved by 1, 2, then 4 and 8 floats (128-bit lanes).
ZF_TARGET_AVX512 inline void transpose_avx512(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)
    for (int j = 0; j < 2; ++j) {
      const __m512d a = _mm512_castps_pd(t[i + j]), b = _mm512_castps_pd(t[i + j + 2]);
      r[i + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[i + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  for (int h = 0; h < 16; h += 8)
    for (int j = 0; j < 4; ++j) {
      t[h + j] = _mm512_shuffle_f32x4(r[h + j], r[h + j + 4], 0x88);
      t[h + j + 4] = _mm512_shuffle_f32x4(r[h + j], r[h + j + 4], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    _mm512_storeu_ps(dst + j * ldd, _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88));
    _mm512_storeu_ps(dst + (j + 8) * ldd, _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD));
  }
}

// 8 x 8: pairs of rows interleaved by 1, then 2 floats, then 128-bit halves exchanged.
ZF_TARGET_AVX2_FMA inline void transpose_avx2(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4)
    for (int j = 0; j < 2; ++j) {
      r[i + 2 * j] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], 0x44);
      r[i + 2 * j + 1] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], 0xEE);
    }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(dst + j * ldd, _mm256_permute2f128_ps(r[j], r[j + 4], 0x20));
    _mm256_storeu_ps(dst + (j + 4) * ldd, _mm256_permute2f128_ps(r[j], r[j + 4], 0x31));
  }
}

#define ZF_ADD(NAME, TARGET, LANES, LOAD, ADD, STORE)                            \
  TARGET inline void NAME(float* out, const float* in, int64_t n) {              \
    int64_t k = 0;                                                               \
    for (; k + LANES <= n; k += LANES) STORE(out + k, ADD(LOAD(out + k), LOAD(in + k))); \
    for (; k < n; ++k) out[k] += in[k];                                          \
  }
ZF_ADD(add_avx512, ZF_TARGET_AVX512, 16, _mm512_loadu_ps, _mm512_add_ps, _mm512_storeu_ps)
ZF_ADD(add_avx2, ZF_TARGET_AVX2_FMA, 8, _mm256_loadu_ps, _mm256_add_ps, _mm256_storeu_ps)
#undef ZF_ADD

// The table of one instruction set's instantiations.
#define ZF_TILE_TABLE(NAME, FN, TRANSPOSE, ADD_FN, PACK_ROWS_BYTES, INPUT_GRADIENT_VECTORS, WEIGHT_GRADIENT_VECTORS, \
                      SPLIT_PANEL_BYTES, INTEL_HALF_PANELS, ROW_SPLIT_BYTES, WIDE_BACKWARD_HIDDEN, LANES, REGISTERS) \
  template <int kVectors, int... kRowsMinus1>                                                       \
  void NAME##_fill(TileKernels& t, std::integer_sequence<int, kRowsMinus1...>) {                    \
    t.max_rows[kVectors - 1] = sizeof...(kRowsMinus1);                                              \
    ((t.product[kVectors - 1][kRowsMinus1] = &FN<kRowsMinus1 + 1, kVectors, false>), ...);          \
    ((t.product_add[kVectors - 1][kRowsMinus1] = &FN<kRowsMinus1 + 1, kVectors, true>), ...);       \
  }                                                                                                 \
  inline TileKernels NAME() {                                                                       \
    TileKernels t;                                                                                  \
    t.lanes = LANES;                                                                                \
    t.transpose = TRANSPOSE;                                                                        \
    t.add = ADD_FN;                                                                                 \
    t.pack_rows_bytes = PACK_ROWS_BYTES;                                                            \
    t.input_gradient_vectors = INPUT_GRADIENT_VECTORS;                                              \
    t.weight_gradient_vectors = WEIGHT_GRADIENT_VECTORS;                                            \
    t.split_panel_bytes = SPLIT_PANEL_BYTES;                                                        \
    t.intel_half_panels = INTEL_HALF_PANELS;                                                        \
    t.row_split_bytes = ROW_SPLIT_BYTES;                                                            \
    t.wide_backward_hidden = WIDE_BACKWARD_HIDDEN;                                                  \
    NAME##_fill<1>(t, std::make_integer_sequence<int, tile_rows(REGISTERS, 1)>());                  \
    NAME##_fill<2>(t, std::make_integer_sequence<int, tile_rows(REGISTERS, 2)>());                  \
    NAME##_fill<3>(t, std::make_integer_sequence<int, tile_rows(REGISTERS, 3)>());                  \
    NAME##_fill<4>(t, std::make_integer_sequence<int, tile_rows(REGISTERS, 4)>());                  \
    return t;                                                                                       \
  }
ZF_TILE_TABLE(tile_kernels_avx512, tile_product_avx512, transpose_avx512, add_avx512, 512 << 10, 4, 4, 128 << 10, false,
              320 << 10, 0, 16, 32)
ZF_TILE_TABLE(tile_kernels_avx2, tile_product_avx2, transpose_avx2, add_avx2, 256 << 10, 2, 3, 0, true, 64 << 10, 320, 8,
              16)
#undef ZF_TILE_TABLE
#endif

}  // namespace zoneout_cpu
