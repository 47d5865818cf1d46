// gemm.h: the matrix products of the CPU kernels, through oneDNN or ATen.
//
// ATen's mm goes to the BLAS torch was built with (MKL in the x86 wheels), whose float32 GEMM
// runs at about half oneDNN's speed on AMD CPUs at these shapes (measured on an AMD EPYC with
// AVX-512, 2 threads: [64,128]x[128,512] 54 vs 32 us, [3200,512]x[512,32] 554 vs 236 us); oneDNN
// is the library nn.LSTM itself runs on. So float32 products y = a w^T go through oneDNN's
// linear (mkldnn::_linear_pointwise, the op torch.compile's CPU backend uses) where torch has it,
// else through ATen. ZONEOUT_FUSED_CPU_GEMM = auto | onednn | aten (read when the extension
// loads) or set_cpu_gemm picks the engine; tests run both.
#pragma once

#include <ATen/ATen.h>

namespace zoneout_cpu {

constexpr int64_t kGemmAten = 0, kGemmOnednn = 1;

// a [M, K] w^T (+ bias [N]) for w [N, K]: a new contiguous [M, N] tensor.
at::Tensor linear_product(const at::Tensor& a, const at::Tensor& w, const at::Tensor& bias = at::Tensor());
// out [M, N] += a [M, K] w^T.
void add_linear_product_(at::Tensor& out, const at::Tensor& a, const at::Tensor& w);
// w [N, K] made ready for many products a w^T with `rows`-row a's (a recurrent weight, used at
// every step): packed once into oneDNN's blocked layout when oneDNN will form those products
// (then only linear_product / add_linear_product_ may read it), else w itself.
at::Tensor prepare_weight(const at::Tensor& w, int64_t rows);
// a [M, K] b [K, N] for a stored b (e.g. grad_x = d_pre W_ih): a new contiguous [M, N].
at::Tensor product(const at::Tensor& a, const at::Tensor& b);
// a [M, N]^T b [M, K]: a contiguous [N, K] (a weight gradient, summed over the M rows; at M = 1, an
// outer product, from 8 MB written with streaming stores: gemm.cpp).
at::Tensor transposed_product(const at::Tensor& a, const at::Tensor& b);

bool cpu_gemm_supported(int64_t engine);
int64_t cpu_gemm();
// Makes `engine` the active one (raises if this torch lacks it); returns the previous one.
int64_t set_cpu_gemm(int64_t engine);

}  // namespace zoneout_cpu
