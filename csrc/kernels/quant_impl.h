// Private: the per-unit dequant entry points behind the kernel bundles (registry.cc). Each
// lives in a translation unit compiled with only that ISA's flags.
#pragma once

#include <type_traits>

#include "quant.h"

#define MOETUNE_DECLARE_DEQUANT(ns)                                                       \
  namespace moetune::kernels::ns {                                                        \
  void dequant(const QuantB& src, int64_t n_begin, int64_t n_end, int64_t k0, int64_t k1, \
               bf16* dst);                                                                \
  }

MOETUNE_DECLARE_DEQUANT(scalar)
MOETUNE_DECLARE_DEQUANT(avx2)
MOETUNE_DECLARE_DEQUANT(avx512)
MOETUNE_DECLARE_DEQUANT(avx512bf16)

#undef MOETUNE_DECLARE_DEQUANT

// The units with a fused dequantize-and-transpose (quant.h DequantTFn), and
// the oracle's element-by-element version of one of their 16-wide output
// panels' blocks (edges, and groups a fast path does not take): W^T rows n in
// [n0, n1) x lanes j (K = kb + j) of the panel at dpanel, zero where n >= N
// or K >= k_end.
namespace moetune::kernels::scalar {
void dequant_t_block(const QuantB& src, int64_t kb, int64_t k_end, int64_t n0, int64_t n1,
                     bf16* dpanel);
}
namespace moetune::kernels::avx2 {
void dequant_t(const QuantB& src, int64_t k0, int64_t k1, bf16* dst);
}
namespace moetune::kernels::avx512bf16 {
void dequant_t(const QuantB& src, int64_t k0, int64_t k1, bf16* dst);
}

namespace moetune::kernels {
// Calls fn(std::integral_constant<WeightFormat, F>{}) for the quantized
// format f (the SIMD units' per-format templates).
template <typename Fn>
MOETUNE_INLINE void with_quant_format(WeightFormat f, Fn&& fn) {
  using F = WeightFormat;
  switch (f) {
    case F::kInt8:
      return fn(std::integral_constant<F, F::kInt8>{});
    case F::kFp8Block:
      return fn(std::integral_constant<F, F::kFp8Block>{});
    case F::kMxfp4:
      return fn(std::integral_constant<F, F::kMxfp4>{});
    default:
      return fn(std::integral_constant<F, F::kInt4>{});
  }
}
}  // namespace moetune::kernels
