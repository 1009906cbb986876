// Private: the per-unit element-wise entry points behind the kernel bundles (registry.cc).
#pragma once

#include "eltwise.h"

#define MOETUNE_DECLARE_ELTWISE(ns)                                                                \
  namespace moetune::kernels::ns {                                                                 \
  void to_bf16(const float* src, float scale, bf16* dst, int64_t n);                               \
  void swiglu(const bf16* g, const bf16* u, bf16* h, int64_t n);                                   \
  float swiglu_bwd(const bf16* g, const bf16* u, const float* d, float w, bf16* h, bf16* dg,       \
                   bf16* du, int64_t n);                                                           \
  void clamped_swiglu(const bf16* g, const bf16* u, float alpha, float limit, bf16* h, int64_t n); \
  float clamped_swiglu_bwd(const bf16* g, const bf16* u, const float* d, float w, float alpha,     \
                           float limit, bf16* h, bf16* dg, bf16* du, int64_t n);                   \
  }

MOETUNE_DECLARE_ELTWISE(scalar)
MOETUNE_DECLARE_ELTWISE(avx2)
MOETUNE_DECLARE_ELTWISE(avx512)

#undef MOETUNE_DECLARE_ELTWISE

// The SIMD units' exp(x), one definition of its constants for all of them: x clamped to
// [-kExpClamp, kExpClamp], n = round(x * kLog2e), r = x - n ln2 (ln2 = kLn2Hi + kLn2Lo, the high
// part exact in n * kLn2Hi), exp(x) = 2^n * p(r) with p the degree-6 Taylor polynomial evaluated
// by Horner from kExpPoly[0] (the highest coefficient); relative error < 2e-7.
namespace moetune::kernels {
inline constexpr float kExpClamp = 88.0f;
inline constexpr float kLog2e = 1.44269504088896341f;
inline constexpr float kLn2Hi = 0.693145751953125f;
inline constexpr float kLn2Lo = 1.428606765330187045e-06f;
inline constexpr float kExpPoly[] = {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f,
                                     0.5f,          1.0f,          1.0f};
}  // namespace moetune::kernels
