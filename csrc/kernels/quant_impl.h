// Private: the per-unit dequant entry points behind the kernel bundles (registry.cc). Each
// lives in a translation unit compiled with only that ISA's flags.
#pragma once

#include <algorithm>
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

namespace moetune::kernels {
// The block walk every SIMD dequant_t shares (quant.h DequantTFn): source
// panel p (columns 16p..16p+15) x output panel (K = kb..kb+15). A block
// inside N and k_end = min(k1, K) and within one scale group g goes to
// `block(pq, ps, kb, g, out)` (pq / ps: panel p's codes and scale bytes; out:
// its first output row, rows 16 words apart in pairs), which decodes it and
// returns true, or false to leave it to the oracle's per-element version
// (scalar::dequant_t_block); so does every block at an edge.
template <typename Block>
MOETUNE_INLINE void dequant_t_blocks(const QuantB& src, int64_t k0, int64_t k1, bf16* dst,
                                     Block&& block) {
  const int64_t Kd = k1 - k0, kpN = packed_kp(src.N);
  const int64_t G = quant_group_k(src.spec, src.K);
  const int64_t k_end = std::min(k1, src.K);
  for (int64_t p = 0; p < packed_panels(src.N); ++p) {
    const int64_t n0 = p * kPanelN, n1 = std::min(n0 + kPanelN, kpN);
    const bool full_n = n0 + kPanelN <= src.N;
    for (int64_t op = 0; op < packed_panels(Kd); ++op) {
      const int64_t kb = k0 + op * kPanelN;
      bf16* dpanel = dst + op * kpN * kPanelN;
      const bool whole = full_n && kb + kPanelN <= k_end && kb / G == (kb + kPanelN - 1) / G;
      if (!(whole && block(src.panel_q(p), src.panel_scale_bytes(p), kb, kb / G,
                           dpanel + (n0 / 2) * 2 * kPanelN)))
        scalar::dequant_t_block(src, kb, k_end, n0, n1, dpanel);
    }
  }
}
}  // namespace moetune::kernels
