// moetune kernels: the element-wise epilogues of the expert GEMMs, per ISA.
// They run over every intermediate element (T*k*I per pass), so on a fast
// GEMM they would dominate if left scalar. Contracts (n elements, any
// alignment, no aliasing between inputs and outputs):
//   to_bf16     dst[i] = bf16(scale * src[i])                   (RNE)
//   swiglu      h[i] = bf16(silu(g[i]) * u[i])                   g, u bf16
//   swiglu_bwd  with dh = w * d[i]:  h[i] as above,
//               dg[i] = bf16(dh * u * silu'(g)), du[i] = bf16(dh * silu(g));
//               returns sum_i d[i] * float(h[i])  (the routing-weight gradient part)
//   clamped_swiglu      gpt-oss's variant, with alpha and limit (> 0):
//               gc = min(g, limit), uc = clamp(u, -limit, limit), sa = sig(alpha gc),
//               h[i] = bf16((uc + 1) * gc * sa)
//   clamped_swiglu_bwd  with dh = w * d[i]:  h[i] as above,
//               dg[i] = bf16(dh (uc + 1) sa (1 + alpha gc (1 - sa)))  if g <= limit, else 0
//               du[i] = bf16(dh gc sa)                                if -limit <= u <= limit, else
//               0 returns sum_i d[i] * float(h[i]) The masks are torch.clamp's subgradient
//               convention: the gradient passes at the bounds themselves (g == limit, u == +-limit)
//               and is 0 for NaN inputs; min/clamp propagate a NaN input to h.
// silu'(g) = sig(g) (1 + g (1 - sig(g))). Every bf16 rounding here is
// bit-identical to f32_to_bf16 (the AVX-512 one uses integer ops, so fp32
// denormals are rounded, not flushed). SIMD versions use a polynomial exp
// accurate to a few fp32 ulp; the scalar one uses std::exp and is the oracle.
#pragma once

#include "gemm.h"

namespace moetune::kernels {

// One ISA's element-wise set (a member of its kernel bundle, kernel_bundle.h).
struct EltwiseKernel {
  void (*to_bf16)(const float* src, float scale, bf16* dst, int64_t n);
  void (*swiglu)(const bf16* g, const bf16* u, bf16* h, int64_t n);
  float (*swiglu_bwd)(const bf16* g, const bf16* u, const float* d, float w, bf16* h, bf16* dg,
                      bf16* du, int64_t n);
  void (*clamped_swiglu)(const bf16* g, const bf16* u, float alpha, float limit, bf16* h,
                         int64_t n);
  float (*clamped_swiglu_bwd)(const bf16* g, const bf16* u, const float* d, float w, float alpha,
                              float limit, bf16* h, bf16* dg, bf16* du, int64_t n);
};

}  // namespace moetune::kernels
