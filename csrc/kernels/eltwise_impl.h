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
