// Private: the per-unit dequant entry points behind the kernel bundles (registry.cc). Each
// lives in a translation unit compiled with only that ISA's flags.
#pragma once

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

// The units with a fused dequantize-and-transpose (quant.h DequantTFn).
namespace moetune::kernels::avx512bf16 {
void dequant_t(const QuantB& src, int64_t k0, int64_t k1, bf16* dst);
}
