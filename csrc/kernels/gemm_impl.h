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
MOETUNE_DECLARE_GEMM(avx512)
MOETUNE_DECLARE_GEMM(avx512bf16)
MOETUNE_DECLARE_GEMM(amx)

namespace moetune::kernels::avx512 {
// The SIMD W^T repack (vpermw + vpermt2q: AVX-512 F/BW only), shared by the
// avx512, avx512_bf16 and amx kernels.
void pack_b_transposed(const PackedB& src, int64_t n_begin, int64_t n_end, bf16* dst);
// Other register blocks of the avx512 GEMM, for bench_gemm's comparison
// (mr x nb in {8x3 (the registered one), 12x2, 6x4, 8x2}); nullptr otherwise.
GemmFn gemm_variant(int mr, int nb);
}

namespace moetune::kernels::amx {
// Other blockings of the AMX GEMM, for bench_gemm's comparison: K block kc in
// {128, 256 (registered), 512}, with or without the L2 prefetch of the next
// K block's B; kc = 0 is the previous (M-outer) kernel. nullptr otherwise.
GemmFn gemm_variant(int kc, bool prefetch);
}

#undef MOETUNE_DECLARE_GEMM
