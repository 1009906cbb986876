#include <stdexcept>
#include <string>

#include "cpu.h"
#include "gemm_impl.h"

namespace moetune::kernels {

const std::vector<GemmKernel>& all_gemm_kernels() {
  static const std::vector<GemmKernel> kernels = {
      {Isa::kScalar, "scalar", PackFormat::kBf16Pair16, &scalar::gemm, &pack_b_transposed},
      {Isa::kAvx2, "avx2_fma", PackFormat::kBf16Pair16, &avx2::gemm, &pack_b_transposed},
      {Isa::kAvx512, "avx512_fma", PackFormat::kBf16Pair16, &avx512::gemm,
       &avx512::pack_b_transposed},
      {Isa::kAvx512Bf16, "avx512_bf16", PackFormat::kBf16Pair16, &avx512bf16::gemm,
       &avx512::pack_b_transposed},
      {Isa::kAmxBf16, "amx_bf16", PackFormat::kBf16Pair16, &amx::gemm,
       &avx512::pack_b_transposed},
  };
  return kernels;
}

const GemmKernel& best_gemm_kernel(Isa max_isa) {
  const GemmKernel* best = &all_gemm_kernels().front();
  for (const GemmKernel& k : all_gemm_kernels()) {
    if (static_cast<int>(k.isa) <= static_cast<int>(max_isa) && cpu_supports(k.isa) &&
        static_cast<int>(k.isa) >= static_cast<int>(best->isa)) {
      best = &k;
    }
  }
  return *best;
}

const GemmKernel& gemm_kernel(Isa isa) {
  for (const GemmKernel& k : all_gemm_kernels()) {
    if (k.isa == isa) {
      if (!cpu_supports(isa)) {
        throw std::runtime_error(std::string("moetune: kernel '") + k.name +
                                 "' is built but this CPU/OS cannot run it (" + cpu_summary() +
                                 ")");
      }
      return k;
    }
  }
  throw std::runtime_error(std::string("moetune: no kernel built for ISA ") + isa_name(isa));
}

}  // namespace moetune::kernels

#include "eltwise_impl.h"

namespace moetune::kernels {

const EltwiseKernel& eltwise_kernel(Isa isa) {
  static const EltwiseKernel scalar_k{Isa::kScalar,           &scalar::to_bf16,
                                      &scalar::swiglu,         &scalar::swiglu_bwd,
                                      &scalar::clamped_swiglu, &scalar::clamped_swiglu_bwd};
  // One AVX-512 F/BW/VL/DQ set serves avx512, avx512_bf16 and amx (it needs
  // no BF16 instruction: bf16 rounding is done with integer ops).
  static const EltwiseKernel avx512_k{
      Isa::kAvx512,           &avx512::to_bf16,        &avx512::swiglu,
      &avx512::swiglu_bwd,    &avx512::clamped_swiglu, &avx512::clamped_swiglu_bwd};
  if (static_cast<int>(isa) >= static_cast<int>(Isa::kAvx512) && cpu_supports(Isa::kAvx512))
    return avx512_k;
  return scalar_k;
}

}  // namespace moetune::kernels
