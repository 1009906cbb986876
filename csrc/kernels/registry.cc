// The kernel bundles, one per row of isa_table.def, in table order.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "cpu.h"
#include "eltwise_impl.h"
#include "gemm_impl.h"
#include "kernel_bundle.h"
#include "quant_impl.h"

namespace moetune::kernels {
namespace {

#define MOETUNE_ELTWISE_OF(u)                                                           \
  EltwiseKernel {                                                                       \
    &u::to_bf16, &u::swiglu, &u::swiglu_bwd, &u::clamped_swiglu, &u::clamped_swiglu_bwd \
  }
// The panels path's slice width and the fused quantized GEMM, per ISA (the
// one place they are decided). AMX: its K-outer kernel (gemm_amx.cc) keeps
// a kColBlock-wide block of C in tiles and reuses each A tile across it, so
// it wants slices that wide, within half of a 2 MiB L2 (1 MiB: K <= 2048 at
// 256 columns). The vdpbf16ps / FMA kernels walk one or two panels at a
// time over all rows, so a wider slice only costs L2: the narrowest.
constexpr DequantChunk dequant_chunk_of(Isa isa) {
  return isa == Isa::kAmxBf16 ? DequantChunk{int64_t(1) << 20, amx::kColBlock}
                              : DequantChunk{0, kMinDequantCols};
}
constexpr QuantGemmFn quant_gemm_of(Isa isa) {
  return isa == Isa::kAmxBf16 ? &amx::quant_gemm : nullptr;
}
// The fused dequantize-and-transpose: the AVX512-BF16 one (vcvtne2ps2bf16)
// where the CPU has it, the AVX2 one on AVX2 / AVX-512 without BF16 (both
// include the avx2 ISA); the scalar bundle dequantizes a panel and repacks it.
constexpr DequantTFn dequant_t_of(Isa isa) {
  return isa == Isa::kAvx512Bf16 || isa == Isa::kAmxBf16 ? &avx512bf16::dequant_t
         : isa == Isa::kAvx2 || isa == Isa::kAvx512      ? &avx2::dequant_t
                                                         : nullptr;
}

#define MOETUNE_FEATURE(...)
#define MOETUNE_ISA(id, name, unit, gemm_name, t, e, d, includes, features) \
  KernelBundle{Isa::id,                                                     \
               gemm_name,                                                   \
               &unit::gemm,                                                 \
               &t::pack_b_transposed,                                       \
               MOETUNE_ELTWISE_OF(e),                                       \
               &d::dequant,                                                 \
               dequant_chunk_of(Isa::id),                                   \
               quant_gemm_of(Isa::id),                                      \
               dequant_t_of(Isa::id)},
constexpr KernelBundle kBundles[] = {
#include "isa_table.def"
};
#undef MOETUNE_ISA
#undef MOETUNE_FEATURE
#undef MOETUNE_ELTWISE_OF

static_assert(sizeof(kBundles) / sizeof(kBundles[0]) == static_cast<size_t>(kIsaCount));

}  // namespace

int64_t dequant_chunk_cols(const KernelBundle& k, int64_t K) {
  const int64_t per_col = packed_kp(K > 0 ? K : 1) * static_cast<int64_t>(sizeof(bf16));
  const int64_t fit = k.dequant_chunk.l2_budget_bytes / per_col / kPanelN * kPanelN;
  return std::max(kMinDequantCols, std::min(k.dequant_chunk.max_cols, fit));
}

const KernelBundle& kernels_for(Isa isa) {
  const int i = static_cast<int>(isa);
  if (i < 0 || i >= kIsaCount) throw std::invalid_argument("moetune: no ISA " + std::to_string(i));
  return kBundles[i];
}

const KernelBundle& select_kernels(std::optional<Isa> forced) {
  const FeatureSet have = cpu_features();
  if (!forced) return kBundles[static_cast<int>(best_runnable_isa(have))];
  if (!isa_runnable(*forced, have)) {
    throw std::runtime_error(std::string("moetune: isa '") + isa_name(*forced) +
                             "' cannot run on this CPU/OS: it needs " +
                             feature_names(isa_info(*forced).required.minus(have)) + " (" +
                             cpu_summary() + ")");
  }
  return kernels_for(*forced);
}

}  // namespace moetune::kernels
