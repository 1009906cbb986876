// Element-wise epilogues (eltwise.h) of every ISA's kernel bundle against a
// double-precision oracle: to_bf16, swiglu and gpt-oss's clamped SwiGLU,
// forward and backward.

#include <gtest/gtest.h>

#include "kernel_test_support.h"

namespace moetune::kernel_test {
namespace {

// ---------------------------------------------------------------------------
// Element-wise epilogues (eltwise.h): to_bf16, swiglu, swiglu_bwd
// ---------------------------------------------------------------------------
//
// Oracle: the formulas of eltwise.h evaluated in double on the same bf16/fp32
// inputs. Every output is one bf16 rounding of an fp32 computation, so it may
// be off the exactly rounded value only when the fp32 value sits within a few
// fp32 ulp of a bf16 rounding boundary:
//   |out - exact| <= 0.5 ulp_bf16(exact) + c * 2^-24 * (magnitude of the terms)
// where c = 16 covers the handful of fp32 roundings plus the polynomial exp of
// the SIMD path (documented "a few fp32 ulp", < 2e-7 relative = 3.4 ulp).

double ulp_bf16(double x) {
  x = std::fabs(x);
  if (x < std::ldexp(1.0, -126)) return std::ldexp(1.0, -133);  // bf16 denormal spacing
  int e;
  std::frexp(x, &e);              // x = f * 2^e, f in [0.5, 1)
  return std::ldexp(1.0, e - 8);  // 8 significant bits
}

constexpr double kEltC = 16.0 * kU;
// Below the fp32 normal range the relative bounds above stop holding (the SIMD
// exp and the products lose precision there); anything below this is
// compared with an absolute slack of one such value.
constexpr double kEltAbs = 0x1p-126;

double sigmoid_d(double g) { return 1.0 / (1.0 + std::exp(-g)); }

class Eltwise : public PerIsa {
 protected:
  const mk::EltwiseKernel& kernel() const { return kernels().eltwise; }
};

const int64_t kEltLengths[] = {0, 1, 3, 15, 16, 17, 33, 100, 1000};
constexpr int64_t kGuard = 32;  // outputs carry a guard tail that must stay untouched

TEST_P(Eltwise, ToBf16IsRoundNearestEvenOfScaleTimesX) {
  for (int64_t n : kEltLengths) {
    for (float scale : {1.0f, 0.25f, -3.7f}) {
      SCOPED_TRACE("n=" + std::to_string(n) + " scale=" + std::to_string(scale));
      Gen g(n * 3 + static_cast<int>(scale * 8), Dist::kUniform);
      std::vector<float> src(static_cast<size_t>(n));
      for (auto& v : src) v = g.any_f32(-100.0f, 100.0f);
      const float specials[] = {1.00390625f, -1.00390625f, 0.0f,    -0.0f,   INFINITY,
                                -INFINITY,   NAN,          FLT_MAX, 3.0e38f, 1e-30f};
      for (int64_t i = 0; i < n && i < 10; ++i) src[i * n / 10] = specials[i];
      std::vector<bf16> dst(static_cast<size_t>(n + kGuard), kDstGarbage);
      kernel().to_bf16(src.data(), scale, dst.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        // Every ISA's rounding is bit-identical to f32_to_bf16, NaN payload included
        // (the AVX-512 one rounds with integer ops, avx512_round.h).
        const bf16 want = mk::f32_to_bf16(scale * src[i]);
        ASSERT_EQ(dst[i], want) << "i=" << i << " x=" << src[i];
      }
      for (int64_t i = n; i < n + kGuard; ++i) ASSERT_EQ(dst[i], kDstGarbage) << "guard " << i;
    }
  }
}

// fp32 denormals are rounded (RNE), never flushed to zero, on every ISA (the
// AVX-512 code avoids vcvtneps2bf16, which would flush them).
TEST_P(Eltwise, ToBf16DenormalsRoundNearestEven) {
  const uint32_t bits[] = {0x00000001u, 0x00008000u, 0x00018000u,
                           0x007fffffu, 0x80400000u, 0x00400001u};
  std::vector<float> src;
  for (uint32_t b : bits) src.push_back(float_of(b));
  std::vector<bf16> dst(src.size(), kDstGarbage);
  kernel().to_bf16(src.data(), 1.0f, dst.data(), static_cast<int64_t>(src.size()));
  for (size_t i = 0; i < src.size(); ++i) {
    EXPECT_EQ(dst[i], mk::f32_to_bf16(src[i]))
        << std::hex << "input 0x" << bits[i] << " -> 0x" << dst[i];
  }
}

struct SwigluInputs {
  std::vector<bf16> g, u;
  std::vector<float> d;
};

SwigluInputs swiglu_inputs(int64_t n, uint64_t seed) {
  Gen gen(seed, Dist::kUniform);
  SwigluInputs in;
  for (int64_t i = 0; i < n; ++i) {
    in.g.push_back(trunc_bf16(gen.any_f32(-12.0f, 12.0f)));
    in.u.push_back(gen());
    in.d.push_back(gen.any_f32(-1.0f, 1.0f));
  }
  // Around the zero of silu'(g) (g ~ -1.2785), large |g|, zero.
  const float gs[] = {-1.2785f, -1.28f, 0.0f, -0.0f, 30.0f, -30.0f, 80.0f, -80.0f};
  for (int64_t i = 0; i < n && i < 8; ++i) in.g[i * n / 8] = trunc_bf16(gs[i]);
  return in;
}

TEST_P(Eltwise, SwigluMatchesOracle) {
  for (int64_t n : kEltLengths) {
    SCOPED_TRACE("n=" + std::to_string(n));
    const SwigluInputs in = swiglu_inputs(n, 100 + n);
    std::vector<bf16> h(static_cast<size_t>(n + kGuard), kDstGarbage);
    kernel().swiglu(in.g.data(), in.u.data(), h.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      const double g = as_double(in.g[i]), u = as_double(in.u[i]);
      const double exact = g * sigmoid_d(g) * u;
      const double tol = 0.5 * ulp_bf16(exact) + kEltC * std::fabs(exact) + kEltAbs;
      ASSERT_NEAR(as_double(h[i]), exact, tol) << "i=" << i << " g=" << g << " u=" << u;
    }
    for (int64_t i = n; i < n + kGuard; ++i) ASSERT_EQ(h[i], kDstGarbage) << "guard " << i;
  }
}

TEST_P(Eltwise, SwigluBwdMatchesOracle) {
  for (int64_t n : kEltLengths) {
    for (float w : {1.0f, 0.37f}) {
      SCOPED_TRACE("n=" + std::to_string(n) + " w=" + std::to_string(w));
      const SwigluInputs in = swiglu_inputs(n, 200 + n);
      std::vector<bf16> h(static_cast<size_t>(n + kGuard), kDstGarbage), dg(h), du(h), hf(h);
      const float dot = kernel().swiglu_bwd(in.g.data(), in.u.data(), in.d.data(), w, h.data(),
                                            dg.data(), du.data(), n);
      kernel().swiglu(in.g.data(), in.u.data(), hf.data(), n);
      double dot_ref = 0.0, dot_abs = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        // The backward recomputes h; it must be the forward's h bit for bit.
        ASSERT_EQ(h[i], hf[i]) << "h differs from swiglu() at i=" << i;
        const double g = as_double(in.g[i]), u = as_double(in.u[i]), d = in.d[i];
        const double s = sigmoid_d(g), dh = static_cast<double>(w) * d;
        const double dg_exact = dh * u * s * (1.0 + g * (1.0 - s));
        const double dg_mag = std::fabs(dh * u * s) * (1.0 + std::fabs(g));
        const double du_exact = dh * g * s;
        ASSERT_NEAR(as_double(dg[i]), dg_exact, 0.5 * ulp_bf16(dg_exact) + kEltC * dg_mag + kEltAbs)
            << "dg i=" << i << " g=" << g << " u=" << u << " d=" << d;
        ASSERT_NEAR(as_double(du[i]), du_exact,
                    0.5 * ulp_bf16(du_exact) + kEltC * std::fabs(du_exact) + kEltAbs)
            << "du i=" << i << " g=" << g << " d=" << d;
        dot_ref += d * as_double(h[i]);
        dot_abs += std::fabs(d * as_double(h[i]));
      }
      // fp32 accumulation of n products (each rounded at most once more).
      EXPECT_NEAR(dot, dot_ref, 2.0 * (n + 1) * kU * dot_abs + kEltAbs);
      for (int64_t i = n; i < n + kGuard; ++i) {
        ASSERT_EQ(h[i], kDstGarbage) << "h guard " << i;
        ASSERT_EQ(dg[i], kDstGarbage) << "dg guard " << i;
        ASSERT_EQ(du[i], kDstGarbage) << "du guard " << i;
      }
    }
  }
}

// gpt-oss's clamped SwiGLU (eltwise.h). Inputs span both sides of both
// clamps, include the bounds themselves (g = limit, u = +-limit: the gradient
// passes there, torch.clamp's convention) and values one bf16 ulp outside.
struct ClampedParams {
  float alpha, limit;
};
const ClampedParams kClamped[] = {{1.702f, 7.0f}, {0.8f, 1.0f}, {2.5f, 0.375f}};

SwigluInputs clamped_inputs(int64_t n, float limit, uint64_t seed) {
  Gen gen(seed, Dist::kUniform);
  SwigluInputs in;
  const float span = 2.0f * limit + 2.0f;
  for (int64_t i = 0; i < n; ++i) {
    in.g.push_back(trunc_bf16(gen.any_f32(-span, span)));
    in.u.push_back(trunc_bf16(gen.any_f32(-span, span)));
    in.d.push_back(gen.any_f32(-1.0f, 1.0f));
  }
  const bf16 lim = trunc_bf16(limit), nlim = trunc_bf16(-limit);
  const bf16 edges_g[] = {lim,  static_cast<bf16>(lim + 1), static_cast<bf16>(lim - 1),
                          nlim, trunc_bf16(-30.0f),         trunc_bf16(0.0f)};
  const bf16 edges_u[] = {lim,
                          nlim,
                          static_cast<bf16>(lim + 1),
                          static_cast<bf16>(nlim + 1),
                          static_cast<bf16>(lim - 1),
                          static_cast<bf16>(nlim - 1)};
  for (int64_t i = 0; i < n && i < 6; ++i) {
    in.g[i * n / 6] = edges_g[i];
    in.u[(i * n / 6 + 1) % n] = edges_u[i];
  }
  return in;
}

struct ClampedExact {
  double h, dg, dg_mag, du;
};
ClampedExact clamped_exact(double g, double u, double dh, double alpha, double limit) {
  const double gc = std::min(g, limit), uc = std::max(std::min(u, limit), -limit);
  const double s = sigmoid_d(alpha * gc);
  ClampedExact r;
  r.h = (uc + 1.0) * gc * s;
  r.dg = g <= limit ? dh * (uc + 1.0) * s * (1.0 + alpha * gc * (1.0 - s)) : 0.0;
  r.dg_mag = g <= limit ? std::fabs(dh * (uc + 1.0) * s) * (1.0 + std::fabs(alpha * gc)) : 0.0;
  r.du = (u >= -limit && u <= limit) ? dh * gc * s : 0.0;
  return r;
}

TEST_P(Eltwise, ClampedSwigluMatchesOracle) {
  for (const ClampedParams& cp : kClamped) {
    for (int64_t n : kEltLengths) {
      SCOPED_TRACE("n=" + std::to_string(n) + " limit=" + std::to_string(cp.limit));
      const SwigluInputs in = clamped_inputs(n, cp.limit, 300 + n);
      std::vector<bf16> h(static_cast<size_t>(n + kGuard), kDstGarbage);
      kernel().clamped_swiglu(in.g.data(), in.u.data(), cp.alpha, cp.limit, h.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        const double g = as_double(in.g[i]), u = as_double(in.u[i]);
        const double exact = clamped_exact(g, u, 0.0, cp.alpha, cp.limit).h;
        const double tol = 0.5 * ulp_bf16(exact) + kEltC * std::fabs(exact) + kEltAbs;
        ASSERT_NEAR(as_double(h[i]), exact, tol) << "i=" << i << " g=" << g << " u=" << u;
      }
      for (int64_t i = n; i < n + kGuard; ++i) ASSERT_EQ(h[i], kDstGarbage) << "guard " << i;
    }
  }
}

TEST_P(Eltwise, ClampedSwigluBwdMatchesOracle) {
  for (const ClampedParams& cp : kClamped) {
    for (int64_t n : kEltLengths) {
      SCOPED_TRACE("n=" + std::to_string(n) + " limit=" + std::to_string(cp.limit));
      const float w = 0.37f;
      const SwigluInputs in = clamped_inputs(n, cp.limit, 400 + n);
      std::vector<bf16> h(static_cast<size_t>(n + kGuard), kDstGarbage), dg(h), du(h), hf(h);
      const float dot =
          kernel().clamped_swiglu_bwd(in.g.data(), in.u.data(), in.d.data(), w, cp.alpha, cp.limit,
                                      h.data(), dg.data(), du.data(), n);
      kernel().clamped_swiglu(in.g.data(), in.u.data(), cp.alpha, cp.limit, hf.data(), n);
      double dot_ref = 0.0, dot_abs = 0.0;
      int64_t g_out = 0, u_out = 0;
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_EQ(h[i], hf[i]) << "h differs from clamped_swiglu() at i=" << i;
        const double g = as_double(in.g[i]), u = as_double(in.u[i]), d = in.d[i];
        const ClampedExact ex = clamped_exact(g, u, static_cast<double>(w) * d, cp.alpha, cp.limit);
        if (ex.dg == 0.0 && g > cp.limit) {
          ++g_out;
          ASSERT_EQ(dg[i], 0) << "dg must be exactly 0 above the limit, i=" << i << " g=" << g;
        } else {
          ASSERT_NEAR(as_double(dg[i]), ex.dg, 0.5 * ulp_bf16(ex.dg) + kEltC * ex.dg_mag + kEltAbs)
              << "dg i=" << i << " g=" << g << " u=" << u << " d=" << d;
        }
        if (u < -cp.limit || u > cp.limit) {
          ++u_out;
          ASSERT_EQ(du[i], 0) << "du must be exactly 0 outside the clamp, i=" << i << " u=" << u;
        } else {
          ASSERT_NEAR(as_double(du[i]), ex.du,
                      0.5 * ulp_bf16(ex.du) + kEltC * std::fabs(ex.du) + kEltAbs)
              << "du i=" << i << " g=" << g << " u=" << u << " d=" << d;
        }
        dot_ref += d * as_double(h[i]);
        dot_abs += std::fabs(d * as_double(h[i]));
      }
      if (n >= 100) EXPECT_TRUE(g_out > 0 && u_out > 0) << "inputs do not exercise the clamps";
      EXPECT_NEAR(dot, dot_ref, 2.0 * (n + 1) * kU * dot_abs + kEltAbs);
      for (int64_t i = n; i < n + kGuard; ++i) {
        ASSERT_EQ(h[i], kDstGarbage) << "h guard " << i;
        ASSERT_EQ(dg[i], kDstGarbage) << "dg guard " << i;
        ASSERT_EQ(du[i], kDstGarbage) << "du guard " << i;
      }
    }
  }
}

// At the bounds themselves the gradient passes (torch.clamp: where(x <= max,
// grad, 0)); one bf16 ulp outside it is exactly 0; NaN inputs give NaN h and
// zero gradients (torch.clamp propagates NaN; its mask is false for NaN).
TEST_P(Eltwise, ClampedSwigluBoundsAndNaN) {
  const float limit = 7.0f, alpha = 1.702f;
  const bf16 lim = mk::f32_to_bf16(limit), nlim = mk::f32_to_bf16(-limit);
  const bf16 nan = 0x7fc0;
  const std::vector<bf16> g = {lim, static_cast<bf16>(lim + 1), lim, lim, nan, lim};
  const std::vector<bf16> u = {
      mk::f32_to_bf16(0.5f), mk::f32_to_bf16(0.5f), lim, nlim, mk::f32_to_bf16(0.5f), nan};
  const int64_t n = static_cast<int64_t>(g.size());
  std::vector<float> d(n, 1.0f);
  std::vector<bf16> h(n), dg(n), du(n);
  kernel().clamped_swiglu_bwd(g.data(), u.data(), d.data(), 1.0f, alpha, limit, h.data(), dg.data(),
                              du.data(), n);
  EXPECT_NE(as_double(dg[0]), 0.0) << "g == limit: the gradient passes";
  EXPECT_EQ(dg[1], 0) << "g one ulp above the limit: clamped";
  EXPECT_EQ(as_double(h[1]), as_double(h[0])) << "clamped g acts as the limit";
  EXPECT_NE(as_double(du[2]), 0.0) << "u == limit: the gradient passes";
  EXPECT_NE(as_double(du[3]), 0.0) << "u == -limit: the gradient passes";
  EXPECT_TRUE(bf16_is_nan(h[4]) && dg[4] == 0) << "NaN g";
  EXPECT_TRUE(bf16_is_nan(h[5]) && du[5] == 0) << "NaN u";
  std::vector<bf16> hf(n);
  kernel().clamped_swiglu(g.data(), u.data(), alpha, limit, hf.data(), n);
  EXPECT_TRUE(bf16_is_nan(hf[4]) && bf16_is_nan(hf[5]));
}

MOETUNE_INSTANTIATE_PER_ISA(Eltwise);

}  // namespace
}  // namespace moetune::kernel_test
