#include <algorithm>
#include <cmath>

#include "eltwise_impl.h"
#include "isa_unit.h"

MOETUNE_ISA_UNIT(scalar);

namespace moetune::kernels::scalar {

namespace {
inline float sig(float g) { return 1.0f / (1.0f + std::exp(-g)); }
}  // namespace

void to_bf16(const float* src, float scale, bf16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(scale * src[i]);
}

void swiglu(const bf16* g, const bf16* u, bf16* h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float gv = bf16_to_f32(g[i]);
    h[i] = f32_to_bf16(gv * sig(gv) * bf16_to_f32(u[i]));
  }
}

float swiglu_bwd(const bf16* g, const bf16* u, const float* d, float w, bf16* h, bf16* dg, bf16* du,
                 int64_t n) {
  float dot = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float gv = bf16_to_f32(g[i]), uv = bf16_to_f32(u[i]);
    const float sg = sig(gv), silu = gv * sg;
    const bf16 hb = f32_to_bf16(silu * uv);
    h[i] = hb;
    dot += d[i] * bf16_to_f32(hb);
    const float dh = w * d[i];
    dg[i] = f32_to_bf16(dh * uv * sg * (1.0f + gv * (1.0f - sg)));
    du[i] = f32_to_bf16(dh * silu);
  }
  return dot;
}

// Argument order of std::min/max chosen so that a NaN input propagates
// (std::min(a, b) returns a unless b < a), as torch.clamp does.
void clamped_swiglu(const bf16* g, const bf16* u, float alpha, float limit, bf16* h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float gc = std::min(bf16_to_f32(g[i]), limit);
    const float uc = std::max(std::min(bf16_to_f32(u[i]), limit), -limit);
    h[i] = f32_to_bf16((uc + 1.0f) * (gc * sig(alpha * gc)));
  }
}

float clamped_swiglu_bwd(const bf16* g, const bf16* u, const float* d, float w, float alpha,
                         float limit, bf16* h, bf16* dg, bf16* du, int64_t n) {
  float dot = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float gv = bf16_to_f32(g[i]), uv = bf16_to_f32(u[i]);
    const float gc = std::min(gv, limit);
    const float uc = std::max(std::min(uv, limit), -limit);
    const float sa = sig(alpha * gc), glu = gc * sa, up1 = uc + 1.0f;
    const bf16 hb = f32_to_bf16(up1 * glu);
    h[i] = hb;
    dot += d[i] * bf16_to_f32(hb);
    const float dh = w * d[i];
    // torch.clamp's subgradient: 1 on the closed interval, 0 outside (and for NaN).
    const bool g_in = gv <= limit;
    const bool u_in = uv >= -limit && uv <= limit;
    dg[i] = g_in ? f32_to_bf16(dh * up1 * sa * (1.0f + alpha * gc * (1.0f - sa))) : bf16(0);
    du[i] = u_in ? f32_to_bf16(dh * glu) : bf16(0);
  }
  return dot;
}

}  // namespace moetune::kernels::scalar
