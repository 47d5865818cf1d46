// lstm_cpu.h: the fused CPU kernels of one zoneout-LSTM, -GRU or -RNN layer direction.
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

// The GRU (cell zoneout::kGru) and plain RNN (kRnnTanh, kRnnRelu) layer direction; b_ih, b_hh
// may be undefined. -> (y [T,B,H], gates [T,B,4H] for the GRU, [T,B,H] for the RNN)
std::tuple<at::Tensor, at::Tensor> gru_rnn_layer_forward(const at::Tensor& x, const at::Tensor& h0,
                                                         const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                         const at::Tensor& b_ih, const at::Tensor& b_hh,
                                                         const at::Tensor& lengths, int64_t cell,
                                                         const zoneout::ZoneoutParams& params);

// -> (grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih [G*H], grad_b_hh [G*H])
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_rnn_layer_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& lengths, const at::Tensor& y, const at::Tensor& gates, int64_t cell,
    const zoneout::ZoneoutParams& params);

// Instruction sets of the element kernels and the vectorized Philox. The kernels run the
// active one: the best this CPU has, unless ZONEOUT_FUSED_CPU_ISA (auto, scalar, avx2,
// avx512) or set_cpu_isa chose another. Results differ between them only by rounding
// (FMA contraction, vector math); masks are bit-identical.
constexpr int64_t kIsaScalar = 0, kIsaAvx2 = 1, kIsaAvx512 = 2;
const char* isa_name(int64_t isa);
bool cpu_isa_supported(int64_t isa);
int64_t cpu_isa();
// Makes `isa` the active one (raises if this CPU cannot run it); returns the previous one.
int64_t set_cpu_isa(int64_t isa);

// The time loop of float32 sequences: "fused" (one parallel region for the whole sequence, the
// recurrent products, and in backward the weight gradients, formed by the extension's own tile
// kernels, per thread for its units, where the active instruction set has them: avx2 with FMA,
// avx512), "steps" (per step, a oneDNN / ATen product then a parallel element pass; always for
// other dtypes, the scalar instruction set and single steps) or "auto" (the default: fused, but
// the per-step forward above H = 512, where oneDNN's products win). ZONEOUT_FUSED_CPU_LOOP = auto
// | fused | steps, or set_cpu_loop.
constexpr int64_t kLoopSteps = 0, kLoopFused = 1, kLoopAuto = 2;
int64_t cpu_loop();
// Makes `loop` the active one; returns the previous one.
int64_t set_cpu_loop(int64_t loop);

// How the fused loop shares each step between threads: "units" (each thread its units' columns of
// every example row, a barrier a step), "rows" (each thread its example rows, every unit, no barrier)
// or "auto" (the default: rows where the weights' panels are small beside a thread's rows; lstm_cpu.cpp,
// loop_split). The results are the same bits either way. ZONEOUT_FUSED_CPU_SPLIT = auto | units | rows,
// or set_cpu_split.
constexpr int64_t kSplitUnits = 0, kSplitRows = 1, kSplitAuto = 2;
int64_t cpu_split();
// Makes `split` the active one; returns the previous one.
int64_t set_cpu_split(int64_t split);

// How the fused forward forms a tile's products where its panel (a tile of units in each of an even number
// of gate rows) is large: "whole" (all its vectors at once), "half" (half its vectors at a time, in twice
// the rows; at every size) or "auto" (the default: half from TileKernels::split_panel_bytes, on CPUs where
// that was measured faster; lstm_cpu.cpp, split_panel_threshold). The results are the same bits either
// way. ZONEOUT_FUSED_CPU_PANELS = auto | whole | half, or set_cpu_panels.
constexpr int64_t kPanelsWhole = 0, kPanelsHalf = 1, kPanelsAuto = 2;
int64_t cpu_panels();
// Makes `panels` the active one; returns the previous one.
int64_t set_cpu_panels(int64_t panels);

// Where the fused LSTM forward forms each step's input part x_t W_ih^T: "loop" (in the time loop, just
// before the step's recurrent part, in the same chains), "first" (as one projection of all steps before
// the loop, where the input is at most 512 wide; wider inputs stay in the loop) or "auto" (the default:
// first where the input's weights are large beside a core's L2, on Intel CPUs; lstm_cpu.cpp,
// input_part_in_loop). The results are the same bits either way. ZONEOUT_FUSED_CPU_INPUT = auto | loop |
// first, or set_cpu_input.
constexpr int64_t kInputLoop = 0, kInputFirst = 1, kInputAuto = 2;
int64_t cpu_input();
// Makes `input` the active one; returns the previous one.
int64_t set_cpu_input(int64_t input);

// The order in which the fused loops take a thread's weight panels: "same" (first to last every step),
// "alternate" (last first every other step, so that a step begins with the panels the last one ended
// with) or "auto" (the default: alternate where a thread's panels overflow L2, on Intel CPUs; lstm_cpu.cpp,
// PanelOrder). The results are the same bits either way. ZONEOUT_FUSED_CPU_ORDER = auto | same |
// alternate, or set_cpu_order.
constexpr int64_t kOrderSame = 0, kOrderAlternate = 1, kOrderAuto = 2;
int64_t cpu_order();
// Makes `order` the active one; returns the previous one.
int64_t set_cpu_order(int64_t order);

// Test hook: the bytes of freed forward outputs the CPU kernels keep for reuse (pooled_empty).
int64_t pooled_bytes();
// Frees what the kernels keep between calls: the pooled forward outputs and the calling thread's
// scratch buffers.
void empty_cache();

// Test hook: words r0..r2 of Philox counters (first + k, c2, c3), k < n, drawn the way the
// CPU mask loop of instruction set `isa` (-1: the active one) draws them, in chunks, so tests
// can check them bit for bit against zoneout::philox4x32_10; returns false where that
// instruction set is unavailable on this CPU or build.
bool philox_words_test_hook(uint64_t seed, uint64_t first, uint32_t c2, uint32_t c3, int64_t n, uint32_t* r0,
                            uint32_t* r1, uint32_t* r2, int64_t isa);
// Test hook: out[k] = 1 where the CPU mask rows of instruction set isa (0 scalar, 1 AVX2, 2
// AVX-512) keep a unit of probability z whose Philox word is words[k] (the header's
// uint32_to_uniform(word) < float(z), there an integer compare: lstm_cpu.cpp, folded_word_at_most),
// else 0; n a multiple of 16. False where that instruction set is unavailable here.
bool keep_by_word_test_hook(const uint32_t* words, float* out, int64_t n, double z, int64_t isa);
// Test hook: out[k] = f(x[k]), k < n (a multiple of 16), by the element kernels' vector math
// (vector_math.h) of instruction set isa (1 AVX2, 2 AVX-512); f: 0 exp, 1 tanh, 2 sigmoid. False
// where that instruction set has no vector math here.
bool vector_math_test_hook(const float* x, float* out, int64_t n, int64_t function, int64_t isa);

}  // namespace zoneout_cpu
