// Private: the per-ISA entry points behind the registry. Each lives in its own
// translation unit compiled with only that ISA's flags, in its own namespace,
// and is reached only through all_gemm_kernels() after a CPU check.
#pragma once

#include "gemm.h"

#define MOETUNE_DECLARE_GEMM(ns)                                                           \
  namespace moetune::kernels::ns {                                                         \
  void gemm(int64_t M, int64_t n_begin, int64_t n_end, const Segment* segs, int nseg,      \
            float* C, int64_t ldc, bool accumulate);                                       \
  }

MOETUNE_DECLARE_GEMM(scalar)
MOETUNE_DECLARE_GEMM(avx2)
MOETUNE_DECLARE_GEMM(avx512bf16)
MOETUNE_DECLARE_GEMM(amx)

namespace moetune::kernels::avx512bf16 {
void pack_b_transposed(const PackedB& src, int64_t n_begin, int64_t n_end, bf16* dst);
}

#undef MOETUNE_DECLARE_GEMM
