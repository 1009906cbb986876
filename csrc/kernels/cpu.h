// moetune kernels: what this CPU and OS let us run, decided once.
//
// Detection reads CPUID leaves 1/7, XCR0 (the OS must save the wider register
// state: YMM for AVX2, ZMM+opmask for AVX-512, XTILECFG/XTILEDATA for AMX)
// and, for AMX, asks Linux for permission to use tile data
// (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)). A feature the CPU
// has but the OS refuses is reported as absent, with the reason, so no kernel
// can ever SIGILL.
#pragma once

#include <string>

#include "gemm.h"

namespace moetune::kernels {

struct CpuFeatures {
  bool avx2_fma = false;     // AVX2 + FMA + F16C, YMM state enabled
  bool avx512 = false;       // AVX512F/BW/VL/DQ, ZMM + opmask state enabled
  bool avx512_bf16 = false;  // the above + AVX512_BF16
  bool avx512_vnni = false;
  bool amx_bf16 = false;     // AMX-TILE + AMX-BF16 and the kernel granted tile data
  bool amx_int8 = false;
  std::string notes;         // why something present was turned off
};

// Computed on first use (thread-safe static init), then constant.
const CpuFeatures& cpu_features();
bool cpu_supports(Isa isa);
std::string cpu_summary();

}  // namespace moetune::kernels
