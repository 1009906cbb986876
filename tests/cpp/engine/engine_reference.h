// Engine tests: the plain-loop double-precision reference of one MoE layer
// (forward and backward), the oracle every engine test compares against.
// See engine_test_support.h for the numerics it models.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "engine_test_data.h"
#include "kernels/minifloat.h"
#include "kernels/quant.h"

namespace moetune::engine_test {

// ---------------------------------------------------------------------------
// Double-precision reference.
// ---------------------------------------------------------------------------

struct Ref {
  std::vector<double> out, dx, dw;
  std::vector<double> dw_scale;  // per slot: ||(D_i h_i)_i||_2, see the header
  std::vector<double> dA[3], dB[3];
  // Clamped SwiGLU only: routed (row, i) elements whose bf16 g was above the
  // limit / whose bf16 u was outside [-limit, limit] (tests assert both occur).
  int64_t clamped_g = 0, clamped_u = 0, elements = 0;
};

inline double sigm(double g) { return 1.0 / (1.0 + std::exp(-g)); }

// The activation and its partial derivatives, in double. For the clamped
// SwiGLU the clamp itself is continuous, but its derivative jumps at the
// limit: a pre-activation that the engine's documented roundings move across
// the limit would flip a whole element of dg/du, a discontinuity rather than an
// arithmetic error. So whether g (u) lies inside the clamp is decided, as in
// the engine, on bf16(g) of the pre-activation computed with the engine's one
// rounding before it (the LoRA operand bf16(s * A x)): g_r / u_r below; the
// values themselves stay exact. Inside/outside follows torch.clamp: the
// gradient passes at the bounds.
struct ActOut {
  double h, dh_dg, dh_du;
};
inline ActOut activation(const ActCfg& a, double g, double u, double g_r, double u_r) {
  if (a.act == Activation::kSwiGLU) {
    const double sg = sigm(g);
    return {g * sg * u, u * sg * (1.0 + g * (1.0 - sg)), g * sg};
  }
  const double lim = a.limit, al = a.alpha;
  const bool g_in = round_bf(float(g_r)) <= a.limit;
  const float ub = round_bf(float(u_r));
  const bool u_in = ub >= -a.limit && ub <= a.limit;
  const double gc = std::min(g, lim), uc = std::max(std::min(u, lim), -lim);
  const double sa = sigm(al * gc);
  return {(uc + 1.0) * gc * sa, g_in ? (uc + 1.0) * sa * (1.0 + al * gc * (1.0 - sa)) : 0.0,
          u_in ? gc * sa : 0.0};
}

inline Ref reference(const Layer& L, const Batch& b) {
  const int H = L.H, I = L.I;
  const double s = L.lora.s;
  Ref R;
  R.out.assign(size_t(b.T) * H, 0.0);
  R.dx.assign(size_t(b.T) * H, 0.0);
  R.dw.assign(size_t(b.T) * b.k, 0.0);
  R.dw_scale.assign(size_t(b.T) * b.k, 0.0);
  for (int p = 0; p < 3; ++p) {
    if (!L.on(p)) continue;
    R.dA[p].assign(L.A[p].size(), 0.0);
    R.dB[p].assign(L.B[p].size(), 0.0);
  }
  // y = W v + s B (A v) for projection p of expert e; also returns z = A v.
  auto proj = [&](int p, int e, const std::vector<double>& v, std::vector<double>& z) {
    const int n_in = L.in(p), n_out = L.out(p);
    const float* W = L.W[p].data() + size_t(e) * n_out * n_in;
    std::vector<double> y(n_out, 0.0);
    for (int o = 0; o < n_out; ++o)
      for (int i = 0; i < n_in; ++i) y[o] += double(W[size_t(o) * n_in + i]) * v[i];
    z.clear();
    if (L.on(p)) {
      const int r = L.lora.r[p];
      const float* A = L.A[p].data() + size_t(e) * r * n_in;
      const float* B = L.B[p].data() + size_t(e) * n_out * r;
      z.assign(r, 0.0);
      for (int q = 0; q < r; ++q)
        for (int i = 0; i < n_in; ++i) z[q] += double(A[size_t(q) * n_in + i]) * v[i];
      for (int o = 0; o < n_out; ++o)
        for (int q = 0; q < r; ++q) y[o] += s * double(B[size_t(o) * r + q]) * z[q];
    }
    return y;
  };
  // Backward of proj given dy: returns dv = W^T dy + s A^T (B^T dy) and adds
  // the LoRA gradients dB += s dy z^T, dA += s (B^T dy) v^T.
  auto proj_bwd = [&](int p, int e, const std::vector<double>& v, const std::vector<double>& z,
                      const std::vector<double>& dy) {
    const int n_in = L.in(p), n_out = L.out(p);
    const float* W = L.W[p].data() + size_t(e) * n_out * n_in;
    std::vector<double> dv(n_in, 0.0);
    for (int o = 0; o < n_out; ++o)
      for (int i = 0; i < n_in; ++i) dv[i] += double(W[size_t(o) * n_in + i]) * dy[o];
    if (L.on(p)) {
      const int r = L.lora.r[p];
      const float* A = L.A[p].data() + size_t(e) * r * n_in;
      const float* B = L.B[p].data() + size_t(e) * n_out * r;
      std::vector<double> q(r, 0.0);  // B^T dy
      for (int o = 0; o < n_out; ++o)
        for (int j = 0; j < r; ++j) q[j] += double(B[size_t(o) * r + j]) * dy[o];
      for (int j = 0; j < r; ++j)
        for (int i = 0; i < n_in; ++i) dv[i] += s * double(A[size_t(j) * n_in + i]) * q[j];
      double* dA = R.dA[p].data() + size_t(e) * r * n_in;
      double* dB = R.dB[p].data() + size_t(e) * n_out * r;
      for (int o = 0; o < n_out; ++o)
        for (int j = 0; j < r; ++j) dB[size_t(o) * r + j] += s * dy[o] * z[j];
      for (int j = 0; j < r; ++j)
        for (int i = 0; i < n_in; ++i) dA[size_t(j) * n_in + i] += s * q[j] * v[i];
    }
    return dv;
  };

  for (int64_t t = 0; t < b.T; ++t) {
    std::vector<double> x(H), dout(H);
    for (int i = 0; i < H; ++i) {
      x[i] = b.x[t * H + i];
      dout[i] = b.dout[t * H + i];
    }
    for (int j = 0; j < b.k; ++j) {
      const int64_t slot = t * b.k + j;
      if (!routed(b, slot)) continue;
      const int e = int(b.ids[slot]);
      const double w = b.w[slot];
      std::vector<double> zg, zu, zd;
      std::vector<double> g = proj(kGate, e, x, zg);
      std::vector<double> u = proj(kUp, e, x, zu);
      for (int i = 0; i < I && !L.bias[kGate].empty(); ++i)
        g[i] += L.bias[kGate][size_t(e) * I + i];
      for (int i = 0; i < I && !L.bias[kUp].empty(); ++i) u[i] += L.bias[kUp][size_t(e) * I + i];
      // g_r, u_r: g, u with the LoRA operand rounded as the engine rounds it
      // (only to decide clamp membership, see activation()).
      std::vector<double> g_r = g, u_r = u;
      for (int p = kGate; p <= kUp; ++p) {
        if (!L.on(p)) continue;
        const int r = L.lora.r[p];
        const float* B = L.B[p].data() + size_t(e) * I * r;
        const std::vector<double>& z = p == kGate ? zg : zu;
        std::vector<double>& vr = p == kGate ? g_r : u_r;
        for (int o = 0; o < I; ++o)
          for (int q = 0; q < r; ++q)
            vr[o] += double(B[size_t(o) * r + q]) * (double(round_bf(float(s * z[q]))) - s * z[q]);
      }
      std::vector<double> h(I);
      std::vector<ActOut> act(I);
      for (int i = 0; i < I; ++i) {
        act[i] = activation(L.act, g[i], u[i], g_r[i], u_r[i]);
        h[i] = act[i].h;
        ++R.elements;
        if (L.act.act == Activation::kClampedSwiGLU) {
          R.clamped_g += round_bf(float(g_r[i])) > L.act.limit;
          R.clamped_u += std::fabs(round_bf(float(u_r[i]))) > L.act.limit;
        }
      }
      std::vector<double> y = proj(kDown, e, h, zd);
      for (int i = 0; i < H && !L.bias[kDown].empty(); ++i)
        y[i] += L.bias[kDown][size_t(e) * H + i];
      for (int i = 0; i < H; ++i) R.out[t * H + i] += w * y[i];
      // backward
      std::vector<double> dy(H);
      double dw = 0.0;
      for (int i = 0; i < H; ++i) {
        dy[i] = w * dout[i];
        dw += dout[i] * y[i];
      }
      R.dw[slot] = dw;
      const std::vector<double> dh = proj_bwd(kDown, e, h, zd, dy);
      std::vector<double> dg(I), du(I);
      double l2 = 0.0;
      for (int i = 0; i < I; ++i) {
        dg[i] = dh[i] * act[i].dh_dg;
        du[i] = dh[i] * act[i].dh_du;
        const double term = (dh[i] / w) * h[i];  // D_i h_i
        l2 += term * term;
      }
      // The down bias's share of <dout, y> is one more (H-term) part of dw.
      for (int i = 0; i < H && !L.bias[kDown].empty(); ++i) {
        const double term = dout[i] * L.bias[kDown][size_t(e) * H + i];
        l2 += term * term;
      }
      R.dw_scale[slot] = std::sqrt(l2);
      const std::vector<double> dxg = proj_bwd(kGate, e, x, zg, dg);
      const std::vector<double> dxu = proj_bwd(kUp, e, x, zu, du);
      for (int i = 0; i < H; ++i) R.dx[t * H + i] += dxg[i] + dxu[i];
    }
  }
  return R;
}

// ---------------------------------------------------------------------------
// Quantized weights: dq(q(W)) from the value-level oracle (kernels/quant.h:
// quant_scale / quantize_value / dequant_value, themselves checked against
// plain loops in the kernel tests), never from a packed layout.
// ---------------------------------------------------------------------------

// The layer with every base weight replaced by dq(q(W)) (HF rows [out, in];
// groups run along `in`, the GEMM's K).
// fp8_block: one scale amax / 448 per 128 x 128 block of [out, in], codes
// e4m3(w / s); mxfp4: per row and 32 inputs the e8m0 scale 2^(floor(log2
// amax) - 2), codes e2m1(w / scale) (kernels/minifloat.h's scalar codecs,
// checked against plain formulas in test_kernels_minifloat.cc).
inline void dequantize_minifloat(const float* w, float* d, int64_t out, int64_t in,
                                 mk::WeightFormat f) {
  const bool fp8 = f == mk::WeightFormat::kFp8Block;
  const int64_t bn = fp8 ? 128 : 1, bk = fp8 ? 128 : 32;
  for (int64_t n0 = 0; n0 < out; n0 += bn) {
    for (int64_t k0 = 0; k0 < in; k0 += bk) {
      const int64_t n1 = std::min(out, n0 + bn), k1 = std::min(in, k0 + bk);
      float amax = 0.0f;
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(w[n * in + k]));
      float s = fp8 ? amax / 448.0f : mk::e8m0_to_f32(mk::mx_scale_e8m0(amax));
      if (fp8 && s < FLT_MIN) s = 0.0f;
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t k = k0; k < k1; ++k) {
          const float x = w[n * in + k];
          const float c = fp8 ? (s == 0.0f ? 0.0f : mk::e4m3_to_f32(mk::f32_to_e4m3(x / s)))
                              : mk::e2m1_to_f32(mk::f32_to_e2m1(x / s));
          d[n * in + k] = mk::bf16_to_f32(mk::f32_to_bf16(c * s));
        }
      }
    }
  }
}

inline Layer dequantized_layer(const Layer& L, const mk::QuantSpec& spec) {
  Layer D = L;
  if (spec.format == mk::WeightFormat::kFp8Block || spec.format == mk::WeightFormat::kMxfp4) {
    for (int p = 0; p < 3; ++p) {
      const int64_t out = L.out(p), in = L.in(p);
      for (int e = 0; e < L.E; ++e)
        dequantize_minifloat(L.W[p].data() + size_t(e) * out * in,
                             D.W[p].data() + size_t(e) * out * in, out, in, spec.format);
      D.Wb[p] = bits(D.W[p]);
    }
    return D;
  }
  for (int p = 0; p < 3; ++p) {
    const int64_t out = L.out(p), in = L.in(p);
    const int64_t G = spec.format == mk::WeightFormat::kInt4 ? spec.group_size : in;
    for (int e = 0; e < L.E; ++e) {
      const float* w = L.W[p].data() + size_t(e) * out * in;
      float* d = D.W[p].data() + size_t(e) * out * in;
      for (int64_t n = 0; n < out; ++n) {
        for (int64_t g0 = 0; g0 < in; g0 += G) {
          const int64_t g1 = std::min(in, g0 + G);
          float amax = 0.0f;
          for (int64_t k = g0; k < g1; ++k) amax = std::max(amax, std::fabs(w[n * in + k]));
          const float s = mk::quant_scale(amax, spec.format);
          for (int64_t k = g0; k < g1; ++k)
            d[n * in + k] = mk::bf16_to_f32(
                mk::dequant_value(mk::quantize_value(w[n * in + k], s, spec.format), s));
        }
      }
    }
    D.Wb[p] = bits(D.W[p]);
  }
  return D;
}

}  // namespace moetune::engine_test
