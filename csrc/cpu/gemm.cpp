// gemm.cpp: see gemm.h.
#include "cpu/gemm.h"
#include "cpu/cpu_vendor.h"
#include "cpu/setting.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>

#if defined(__SSE2__)
#include <immintrin.h>  // _mm_stream_ps, _mm_sfence
#define ZF_STREAMING_STORES 1
#endif

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

namespace zoneout_cpu {
namespace {

// mkldnn::_linear_pointwise(Tensor X, Tensor W, Tensor? B, str attr, Scalar?[] scalars,
// str? algorithm) -> Tensor: X W^T + B with a plain (or prepacked) W. Looked up once; absent
// where torch was built without oneDNN.
const std::optional<c10::OperatorHandle>& onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}

// mkldnn::_reorder_linear_weight(Tensor self, int? batch_size=None) -> Tensor: w in oneDNN's
// blocked layout for products with batch_size-row inputs (an mkldnn tensor).
const std::optional<c10::OperatorHandle>& onednn_reorder_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_reorder_linear_weight", ""});
  return op;
}

int64_t engine_from_environment() {
  const char* value = std::getenv("ZONEOUT_FUSED_CPU_GEMM");
  const std::string name = value == nullptr ? "auto" : value;
  if (name == "aten") return kGemmAten;
  TORCH_CHECK(name == "auto" || name == "onednn" || name.empty(),
              "ZONEOUT_FUSED_CPU_GEMM must be auto, onednn or aten, got ", name);
  return onednn_linear_op().has_value() ? kGemmOnednn : kGemmAten;
}

std::atomic<int64_t> active_engine{-1};  // -1: not read from the environment yet

int64_t engine() { return lazy_setting(active_engine, engine_from_environment); }

// Products below this many multiply-adds stay on ATen even with oneDNN active: there oneDNN's
// fixed cost per call (a boxed dispatch, a fresh output, for accumulation an extra add: about
// 12 us) outweighs its faster kernel (measured, 2 threads, ATen vs oneDNN + add: [64,128]x
// [128,128] 21 vs 26 us; [64,128]x[128,512], 4.2M, about even; [32,256]x[256,1024] 153 vs 97 us).
// A decoder's one-row products (ATen's gemv path) gain from half that size on: [1,512]x
// [512,4096] 124 vs 84 us, [1,1024]x[1024,4096] 385 vs 159 us, [1,256]x[256,1024] 16 vs 18 us.
constexpr int64_t kOnednnMinWork = int64_t(1) << 22;
constexpr int64_t kOnednnMinWorkFewRows = int64_t(1) << 21;  // a.size(0) < 16

// Those figures are an AMD EPYC's. On Intel CPUs ATen's BLAS (MKL) forms one-row products faster than
// oneDNN: a 2-vCPU Xeon, medians of 200 calls, ATen / oneDNN, 1 thread: [1,512]x[512,4096] 337 / 388 us,
// [1,1024]x[1024,4096] 638 / 693, [1,256]x[256,1024] 16 / 26; 2 threads 204 / 300, 343 / 431, 10 / 22;
// but from 4 rows oneDNN is ahead there too ([4,512]x[512,4096] 638 / 600, [8,1024]x[1024,4096] 1888 /
// 1384). A decoder cell stepped at B=1 (I=512, H=1024, 1 thread) ran at 0.91x nn.LSTMCell's speed on oneDNN
// and 1.06-1.09x on ATen (eval and training forward), so one-row products stay on ATen there.
bool use_onednn(const at::Tensor& a, int64_t n, int64_t k) {
  const int64_t rows = a.size(0);
  if (rows == 1 && intel_cpu()) return false;
  return a.scalar_type() == at::kFloat && engine() == kGemmOnednn &&
         rows * n * k >= (rows < 16 ? kOnednnMinWorkFewRows : kOnednnMinWork);
}

// a w^T goes through oneDNN: always for a packed w; for a plain one by the rule above, if w is
// contiguous (a strided view would make oneDNN copy it at every call).
bool use_onednn(const at::Tensor& a, const at::Tensor& w) {
  return w.is_mkldnn() || (w.is_contiguous() && use_onednn(a, w.size(0), w.size(1)));
}

// oneDNN reads the weight as [N, K]: a product with a stored [K, N] operand (a weight read
// transposed), or a weight gradient summed over few rows, first copies an operand. Worth it
// only for this many rows of a; below that (a decoder cell's step: one row) ATen forms it
// (measured at B = 1, I = 512, H = 1024: copying W_ih^T and W_hh^T per call made the cell's
// backward 5x slower than ATen's).
constexpr int64_t kCopyRows = 64;

at::Tensor onednn_linear(const at::Tensor& a, const at::Tensor& w, const at::Tensor& bias) {
  // Boxed call: no dependence on the C++ spelling of the schema's types across torch versions.
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(a);
  stack.emplace_back(w);
  stack.emplace_back(bias.defined() ? c10::IValue(bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<c10::Scalar>>());
  stack.emplace_back(c10::IValue());
  onednn_linear_op()->callBoxed(&stack);
  return stack.back().toTensor();
}

// A weight gradient summed over one row (a decoder cell's step at B=1: [4H,1] x [1,I]) is an outer
// product, each output written once and read next by autograd's accumulation, a call later. From this
// size on (beyond the caches) it is written with streaming stores, which skip reading the lines
// first. Measured on a 2-vCPU Xeon, the cell stepped 20 times at B=1 (fwd+bwd, time relative to
// nn.LSTMCell's, medians of interleaved rounds): I=512 H=1024 (8 and 16 MB outputs) 1.03x -> 0.92x
// on 1 thread, 1.09x -> 0.92x on 2; I=1024 H=2048 1.02x -> 0.85x; I=H=512 (2 and 4 MB) level; I=H=256
// (1 MB) 14% slower streamed. Below the size, and where there is no SSE2, MKL's own k=1 product forms
// them (it beat plain stores at every size measured).
#if defined(ZF_STREAMING_STORES)
constexpr int64_t kStreamedOuterBytes = int64_t(8) << 20;

bool use_streamed_outer(const at::Tensor& a, const at::Tensor& b) {
  const int64_t n = a.size(1), k = b.size(1);
  return a.size(0) == 1 && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.is_contiguous() &&
         b.is_contiguous() && k % 4 == 0 && n * k * int64_t(sizeof(float)) >= kStreamedOuterBytes;
}

// a [1, N]^T b [1, K] by rows of streaming stores (use_streamed_outer holds: K % 4 == 0 keeps every
// row 16-byte aligned in the fresh, 64-byte aligned output). One product per output, as the BLAS forms
// it: the same bits.
at::Tensor streamed_outer(const at::Tensor& a, const at::Tensor& b) {
  const int64_t n = a.size(1), k = b.size(1);
  at::Tensor out = at::empty({n, k}, a.options());
  const float* a_p = a.data_ptr<float>();
  const float* b_p = b.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  const int64_t grain_rows = std::max<int64_t>(1, (int64_t(64) << 10) / (k * int64_t(sizeof(float))));
  at::parallel_for(0, n, grain_rows, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const __m128 scale = _mm_set1_ps(a_p[i]);
      float* row = out_p + i * k;
      for (int64_t j = 0; j < k; j += 4) _mm_stream_ps(row + j, _mm_mul_ps(scale, _mm_loadu_ps(b_p + j)));
    }
    _mm_sfence();  // the streamed lines are visible before the region ends
  });
  return out;
}
#endif

}  // namespace

at::Tensor linear_product(const at::Tensor& a, const at::Tensor& w, const at::Tensor& bias) {
  if (use_onednn(a, w)) return onednn_linear(a, w, bias);
  return bias.defined() ? at::addmm(bias, a, w.t()) : at::mm(a, w.t());
}

void add_linear_product_(at::Tensor& out, const at::Tensor& a, const at::Tensor& w) {
  if (use_onednn(a, w)) {
    out.add_(onednn_linear(a, w, at::Tensor()));
  } else {
    out.addmm_(a, w.t());
  }
}

at::Tensor prepare_weight(const at::Tensor& w, int64_t rows) {
  // Packing costs about one product ([512,128]: 85 us) and then makes each product faster
  // (measured: [32,256]x[256,1024] 98 -> 50 us, [64,128]x[128,512] 46 -> 33 us).
  const at::Tensor probe = at::empty({rows, 0}, w.options());  // only rows and dtype matter
  if (!onednn_reorder_op().has_value() || !use_onednn(probe, w.size(0), w.size(1))) return w;
  torch::jit::Stack stack{c10::IValue(w.contiguous()), c10::IValue(rows)};
  onednn_reorder_op()->callBoxed(&stack);
  return stack.back().toTensor();
}

at::Tensor product(const at::Tensor& a, const at::Tensor& b) {
  if (a.size(0) >= kCopyRows && use_onednn(a, b.size(1), b.size(0))) {
    return onednn_linear(a, b.t().contiguous(), at::Tensor());
  }
  return at::mm(a, b);
}

at::Tensor transposed_product(const at::Tensor& a, const at::Tensor& b) {
#if defined(ZF_STREAMING_STORES)
  if (use_streamed_outer(a, b)) return streamed_outer(a, b);
#endif
  if (a.size(0) >= kCopyRows && use_onednn(a, a.size(1), b.size(1))) {
    // oneDNN forms (b^T a) = (a^T b)^T fastest from these two transposed views (measured:
    // [3150,512]^T [3150,128] 1.2 ms, a^T b directly 1.8 ms, MKL's mm 2.2 ms); one small copy
    // makes the result contiguous.
    return onednn_linear(b.t(), a.t(), at::Tensor()).t().contiguous();
  }
  return at::mm(a.t(), b);
}

bool cpu_gemm_supported(int64_t engine_code) {
  return engine_code == kGemmAten || (engine_code == kGemmOnednn && onednn_linear_op().has_value());
}

int64_t cpu_gemm() { return engine(); }

int64_t set_cpu_gemm(int64_t engine_code) {
  TORCH_CHECK(engine_code == kGemmAten || engine_code == kGemmOnednn,
              "engine must be 0 (aten) or 1 (onednn), got ", engine_code);
  TORCH_CHECK(cpu_gemm_supported(engine_code), "this torch has no oneDNN linear (mkldnn::_linear_pointwise)");
  const int64_t previous = engine();
  active_engine.store(engine_code);
  return previous;
}

}  // namespace zoneout_cpu
