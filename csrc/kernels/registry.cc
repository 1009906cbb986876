// The kernel bundles, one per row of isa_table.def, in table order.
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
#define MOETUNE_FEATURE(...)
#define MOETUNE_ISA(id, name, unit, gemm_name, t, e, d, includes, features)                      \
  KernelBundle{Isa::id,    gemm_name, &unit::gemm, &t::pack_b_transposed, MOETUNE_ELTWISE_OF(e), \
               &d::dequant},
constexpr KernelBundle kBundles[] = {
#include "isa_table.def"
};
#undef MOETUNE_ISA
#undef MOETUNE_FEATURE
#undef MOETUNE_ELTWISE_OF

static_assert(sizeof(kBundles) / sizeof(kBundles[0]) == static_cast<size_t>(kIsaCount));

}  // namespace

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
