// cpu_vendor.h: whose CPU this is (Intel, a Zen 4), for the choices of the CPU kernels that were
// measured to differ between vendors' cores (lstm_cpu.cpp's cache bounds and tile forms, gemm.cpp's
// engine for one-row products).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define ZF_X86_VENDOR_CHECKS 1
#endif

namespace zoneout_cpu {

// Whether the CPU is Intel's: choices measured to differ there from a Zen's (l2_panel_limit,
// pack_rows_threshold, split_panel_threshold, panel_prefetch_steps, input_part_in_loop; gemm.cpp's
// use_onednn).
inline bool intel_cpu() {
#if defined(ZF_X86_VENDOR_CHECKS)
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") > 0;
  }();
  return intel;
#else
  return false;
#endif
}

// Whether the CPU is a Zen 4 (AMD family 0x19 with AVX-512; its Zen 3 siblings have none), which runs
// AVX-512 on 256-bit units: a 16-lane FMA holds both FMA pipes, so a core's FMA peak is the same under
// either instruction set (about 113 GFLOP/s a core on a 2-vCPU EPYC) and half a Zen 5's per cycle.
// Choices measured to differ there (split_panel_threshold, row_split_bound).
inline bool zen4_cpu() {
#if defined(ZF_X86_VENDOR_CHECKS)
  static const bool zen4 = [] {
    __builtin_cpu_init();
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__builtin_cpu_is("amd") <= 0 || !__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
    const unsigned base_family = (eax >> 8) & 0xF, family = base_family == 0xF ? base_family + ((eax >> 20) & 0xFF)
                                                                                 : base_family;
    return family == 0x19 && __builtin_cpu_supports("avx512f") > 0;
  }();
  return zen4;
#else
  return false;
#endif
}

}  // namespace zoneout_cpu
