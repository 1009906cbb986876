#include <cmath>

#include "eltwise_impl.h"

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

float swiglu_bwd(const bf16* g, const bf16* u, const float* d, float w, bf16* h, bf16* dg,
                 bf16* du, int64_t n) {
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

}  // namespace moetune::kernels::scalar
