// Private: the per-unit GEMM / W^T entry points behind the kernel bundles
// (registry.cc). Each lives in a translation unit compiled with only its
// ISA's flags, in its unit's namespace, and is reached only through a bundle
// after the ISA's CPU check.
#pragma once

#include "gemm.h"
#include "isa.h"
#include "quant.h"

// Every unit of the table has a GEMM.
#define MOETUNE_FEATURE(...)
#define MOETUNE_ISA(id, name, unit, ...)                                                        \
  namespace moetune::kernels::unit {                                                            \
  void gemm(int64_t M, int64_t n_begin, int64_t n_end, const Segment* segs, int nseg, float* C, \
            int64_t ldc, bool accumulate);                                                      \
  }
#include "isa_table.def"
#undef MOETUNE_ISA
#undef MOETUNE_FEATURE

// The W^T repacks (TransposeFn): plain loops (pack.cc), the AVX2 one
// (transpose_avx2.cc), and the AVX-512 F/BW one (vpermw + vpermt2q,
// transpose_avx512.cc) the avx512, avx512_bf16 and amx bundles share.
namespace moetune::kernels::scalar {
void pack_b_transposed(const PackedB& src, int64_t n_begin, int64_t n_end, bf16* dst);
}
namespace moetune::kernels::avx2 {
void pack_b_transposed(const PackedB& src, int64_t n_begin, int64_t n_end, bf16* dst);
}
namespace moetune::kernels::avx512 {
void pack_b_transposed(const PackedB& src, int64_t n_begin, int64_t n_end, bf16* dst);
}

// The AMX unit's fused quantized GEMM (QuantGemmFn, gemm_amx.cc) and its
// column block (the width of C it keeps in tiles per K block; registry.cc
// derives the panels path's slice width from it).
namespace moetune::kernels::amx {
inline constexpr int64_t kColBlock = 256;
void quant_gemm(int64_t M, int64_t n_begin, int64_t n_end, const bf16* A, int64_t lda,
                const QuantB& B, const Segment* segs, int nseg, float* C, int64_t ldc);
}  // namespace moetune::kernels::amx
