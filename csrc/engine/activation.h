// moetune engine: the SwiGLU activation and its derivative, on values that
// were already rounded to bf16 (see moe_experts.h, Numerics).
#pragma once

#include <cmath>

namespace moetune {

inline float sigmoid(float g) { return 1.0f / (1.0f + std::exp(-g)); }

// h = silu(g) * u
inline float swiglu(float g, float u) { return g * sigmoid(g) * u; }

// Given dh: dg = dh * u * silu'(g), du = dh * silu(g),
// silu'(g) = sig(g) * (1 + g * (1 - sig(g))).
inline void swiglu_backward(float g, float u, float dh, float* dg, float* du) {
  const float sg = sigmoid(g);
  *dg = dh * u * sg * (1.0f + g * (1.0f - sg));
  *du = dh * g * sg;
}

}  // namespace moetune
