// Kernel-layer tests other than GEMM: pack_b, transpose_to_a, bf16
// conversion, element-wise epilogues and the kernel registry.

#include <gtest/gtest.h>

#include "kernel_test_support.h"

namespace moetune::kernel_test {
namespace {

// ---------------------------------------------------------------------------
// pack_b
// ---------------------------------------------------------------------------

const std::vector<std::pair<int64_t, int64_t>> kPackShapes = {
    {1, 1}, {1, 16}, {2, 17}, {3, 7}, {16, 16}, {17, 33}, {64, 100}, {255, 7}, {32, 128}};

TEST(PackB, LayoutMatchesContractAndPaddingIsZero) {
  for (auto [K, N] : kPackShapes) {
    SCOPED_TRACE("K=" + std::to_string(K) + " N=" + std::to_string(N));
    Gen g(K * 1000 + N, Dist::kUniform);
    const int64_t ld = N + 3;
    std::vector<bf16> src(static_cast<size_t>((K - 1) * ld + N));
    for (auto& v : src) v = g.bits16();  // arbitrary bits: scale 1 must copy them exactly
    std::vector<bf16> pk(static_cast<size_t>(mk::packed_elems(K, N)), kDstGarbage);
    mk::pack_b(src.data(), mk::SrcType::kBf16, ld, true, K, 0, N, 1.0f, pk.data());
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n)
        ASSERT_EQ(pk[packed_index(K, k, n)], src[k * ld + n]) << "k=" << k << " n=" << n;
    EXPECT_EQ(nonzero_padding(pk, K, N), 0);
    EXPECT_EQ(static_cast<int64_t>(pk.size()),
              mk::packed_panels(N) * mk::packed_kp(K) * mk::kPanelN);
  }
}

TEST(PackB, ColumnRangeOfBf16RowsIsThePackOfThoseColumns) {
  // pack_b(kn, bf16, scale 1) with n_begin > 0 (the SIMD row interleave reads
  // from the source directly): equals the scalar contract on the sub-matrix.
  for (auto [K, N] : kPackShapes) {
    for (int64_t nb : {int64_t(1), int64_t(5), N / 2}) {
      if (nb >= N) continue;
      SCOPED_TRACE("K=" + std::to_string(K) + " N=" + std::to_string(N) + " n_begin=" + std::to_string(nb));
      Gen g(K * 31 + N * 7 + nb, Dist::kUniform);
      const int64_t ld = N + 1, n = N - nb;
      std::vector<bf16> src(static_cast<size_t>((K - 1) * ld + N));
      for (auto& v : src) v = g.bits16();
      std::vector<bf16> pk(static_cast<size_t>(mk::packed_elems(K, n)), kDstGarbage);
      mk::pack_b(src.data(), mk::SrcType::kBf16, ld, true, K, nb, N, 1.0f, pk.data());
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < n; ++c)
          ASSERT_EQ(pk[packed_index(K, k, c)], src[k * ld + nb + c]) << "k=" << k << " c=" << c;
      EXPECT_EQ(nonzero_padding(pk, K, n), 0);
    }
  }
}

TEST(PackB, KnAndNkOfTransposedSourcesAreIdentical) {
  for (auto [K, N] : kPackShapes) {
    SCOPED_TRACE("K=" + std::to_string(K) + " N=" + std::to_string(N));
    Gen g(K * 7919 + N, Dist::kUniform);
    const int64_t ld_kn = N + 5, ld_nk = K + 2;
    std::vector<bf16> kn(static_cast<size_t>((K - 1) * ld_kn + N), kANaN);
    std::vector<bf16> nk(static_cast<size_t>((N - 1) * ld_nk + K), kANaN);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n) kn[k * ld_kn + n] = nk[n * ld_nk + k] = g();
    std::vector<bf16> a(static_cast<size_t>(mk::packed_elems(K, N)), kDstGarbage);
    std::vector<bf16> b(a.size(), 0x1234);
    mk::pack_b(kn.data(), mk::SrcType::kBf16, ld_kn, true, K, 0, N, 1.0f, a.data());
    mk::pack_b(nk.data(), mk::SrcType::kBf16, ld_nk, false, K, 0, N, 1.0f, b.data());
    EXPECT_EQ(a, b);
    EXPECT_EQ(nonzero_padding(b, K, N), 0);

    // Same for fp32 sources with a scale.
    std::vector<float> knf(static_cast<size_t>((K - 1) * ld_kn + N), NAN);
    std::vector<float> nkf(static_cast<size_t>((N - 1) * ld_nk + K), NAN);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n) knf[k * ld_kn + n] = nkf[n * ld_nk + k] = g.any_f32(-3, 3);
    std::fill(a.begin(), a.end(), kDstGarbage);
    std::fill(b.begin(), b.end(), 0x1234);
    mk::pack_b(knf.data(), mk::SrcType::kF32, ld_kn, true, K, 0, N, 0.3f, a.data());
    mk::pack_b(nkf.data(), mk::SrcType::kF32, ld_nk, false, K, 0, N, 0.3f, b.data());
    EXPECT_EQ(a, b);
  }
}

TEST(PackB, F32AndScaledSourcesRoundToBf16OfScaleTimesX) {
  const int64_t K = 17, N = 33;
  Gen g(4242, Dist::kUniform);
  for (bool kn : {true, false}) {
    for (float scale : {1.0f, 0.3f, -2.5f, 1e-3f}) {
      SCOPED_TRACE("kn=" + std::to_string(kn) + " scale=" + std::to_string(scale));
      const int64_t ld = kn ? N + 1 : K + 1;
      const int64_t rows = kn ? K : N, cols = kn ? N : K;
      std::vector<float> f(static_cast<size_t>((rows - 1) * ld + cols));
      for (auto& v : f) v = g.any_f32(-4.0f, 4.0f);  // generally not bf16-representable
      f[0] = 1.00390625f;                            // a tie: 1 + 2^-8
      std::vector<bf16> h(f.size());
      for (auto& v : h) v = g();
      std::vector<bf16> pf(static_cast<size_t>(mk::packed_elems(K, N)), kDstGarbage);
      std::vector<bf16> ph(pf.size(), kDstGarbage);
      mk::pack_b(f.data(), mk::SrcType::kF32, ld, kn, K, 0, N, scale, pf.data());
      mk::pack_b(h.data(), mk::SrcType::kBf16, ld, kn, K, 0, N, scale, ph.data());
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t n = 0; n < N; ++n) {
          const int64_t si = kn ? k * ld + n : n * ld + k;
          const int64_t pi = packed_index(K, k, n);
          ASSERT_EQ(pf[pi], mk::f32_to_bf16(scale * f[si])) << "f32 k=" << k << " n=" << n;
          ASSERT_EQ(ph[pi], mk::f32_to_bf16(scale * mk::bf16_to_f32(h[si])))
              << "bf16 k=" << k << " n=" << n;
        }
      }
      EXPECT_EQ(nonzero_padding(pf, K, N), 0);
      EXPECT_EQ(nonzero_padding(ph, K, N), 0);
    }
  }
}

TEST(PackB, ColumnSubRangeEqualsColumnsOfFullPack) {
  const int64_t K = 19, N = 100;
  const std::pair<int64_t, int64_t> ranges[] = {{0, 100}, {16, 64}, {5, 37}, {99, 100},
                                                {32, 33}, {48, 100}, {0, 1}, {3, 19}};
  for (bool kn : {true, false}) {
    Gen g(kn ? 11 : 12, Dist::kUniform);
    const int64_t ld = kn ? N + 2 : K + 3;
    const int64_t rows = kn ? K : N, cols = kn ? N : K;
    std::vector<bf16> src(static_cast<size_t>((rows - 1) * ld + cols));
    for (auto& v : src) v = g();
    std::vector<bf16> full(static_cast<size_t>(mk::packed_elems(K, N)));
    mk::pack_b(src.data(), mk::SrcType::kBf16, ld, kn, K, 0, N, 1.0f, full.data());
    for (auto [nb, ne] : ranges) {
      SCOPED_TRACE("kn=" + std::to_string(kn) + " range [" + std::to_string(nb) + "," +
                   std::to_string(ne) + ")");
      const int64_t w = ne - nb;
      std::vector<bf16> sub(static_cast<size_t>(mk::packed_elems(K, w)), kDstGarbage);
      mk::pack_b(src.data(), mk::SrcType::kBf16, ld, kn, K, nb, ne, 1.0f, sub.data());
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < w; ++c)
          ASSERT_EQ(sub[packed_index(K, k, c)], full[packed_index(K, k, nb + c)])
              << "k=" << k << " c=" << c;
      EXPECT_EQ(nonzero_padding(sub, K, w), 0);
      // Panel-aligned ranges are byte-identical slices of the full pack (up to
      // the zero columns past N in the last panel).
      if (nb % mk::kPanelN == 0 && (ne % mk::kPanelN == 0 || ne == N)) {
        const int64_t off = (nb / mk::kPanelN) * mk::packed_kp(K) * mk::kPanelN;
        EXPECT_TRUE(std::equal(sub.begin(), sub.end(), full.begin() + off));
      }
    }
  }
}

// ---------------------------------------------------------------------------
// transpose_to_a
// ---------------------------------------------------------------------------

TEST(TransposeToA, ValuesRowScaleAndZeroPadColumn) {
  for (int64_t rows : {1, 2, 5, 16, 33}) {
    for (int64_t cols : {1, 7, 20}) {
      for (bool f32 : {false, true}) {
        for (bool scaled : {false, true}) {
          SCOPED_TRACE("rows=" + std::to_string(rows) + " cols=" + std::to_string(cols) +
                       " f32=" + std::to_string(f32) + " scaled=" + std::to_string(scaled));
          Gen g(rows * 131 + cols * 7 + f32 * 2 + scaled, Dist::kUniform);
          const int64_t ld_src = cols + 3;
          const int64_t ld_dst = mk::round_up(rows, 2) + 3;  // > required, to see the tail
          const size_t n_src = static_cast<size_t>((rows - 1) * ld_src + cols);
          std::vector<float> sf(n_src, NAN);
          std::vector<bf16> sh(n_src, kANaN);
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t c = 0; c < cols; ++c) {
              sf[r * ld_src + c] = g.any_f32(-5.0f, 5.0f);
              sh[r * ld_src + c] = g.bits16();  // arbitrary bits, NaNs included
            }
          }
          std::vector<float> rs(static_cast<size_t>(rows));
          for (auto& v : rs) v = g.any_f32(-1.5f, 1.5f);
          std::vector<bf16> dst(static_cast<size_t>(cols * ld_dst), kDstGarbage);
          mk::transpose_to_a(f32 ? static_cast<const void*>(sf.data()) : sh.data(),
                             f32 ? mk::SrcType::kF32 : mk::SrcType::kBf16, ld_src, rows, cols,
                             scaled ? rs.data() : nullptr, dst.data(), ld_dst);
          for (int64_t c = 0; c < cols; ++c) {
            for (int64_t r = 0; r < rows; ++r) {
              const float x = f32 ? sf[r * ld_src + c] : mk::bf16_to_f32(sh[r * ld_src + c]);
              bf16 want;
              if (!f32 && !scaled) {
                want = sh[r * ld_src + c];  // bit-exact copy
              } else {
                want = mk::f32_to_bf16((scaled ? rs[r] : 1.0f) * x);
              }
              const bf16 got = dst[c * ld_dst + r];
              const bool both_nan = std::isnan(mk::bf16_to_f32(want)) &&
                                    std::isnan(mk::bf16_to_f32(got));
              if (!(f32 || scaled) || !both_nan) {
                ASSERT_EQ(got, want) << "dst[" << c << "," << r << "]";
              }
            }
            if (rows % 2) {
              EXPECT_EQ(dst[c * ld_dst + rows], 0) << "pad column, row " << c;
            } else {
              EXPECT_EQ(dst[c * ld_dst + rows], kDstGarbage) << "no pad for even rows";
            }
            for (int64_t j = mk::round_up(rows, 2); j < ld_dst; ++j) {
              EXPECT_EQ(dst[c * ld_dst + j], kDstGarbage) << "stride tail touched, row " << c;
            }
          }
        }
      }
    }
  }
}

// Exactly sized destination (ld_dst == Kp, last row ends at Kp): ASan checks
// no write past the contract size.
TEST(TransposeToA, ExactlySizedDestination) {
  const int64_t rows = 7, cols = 5, ld_dst = mk::round_up(rows, 2);
  std::vector<bf16> src(static_cast<size_t>(rows * cols));
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<bf16>(0x3f80 + i);
  std::vector<bf16> dst(static_cast<size_t>((cols - 1) * ld_dst + ld_dst), kDstGarbage);
  mk::transpose_to_a(src.data(), mk::SrcType::kBf16, cols, rows, cols, nullptr, dst.data(),
                     ld_dst);
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = 0; r < rows; ++r) EXPECT_EQ(dst[c * ld_dst + r], src[r * cols + c]);
    EXPECT_EQ(dst[c * ld_dst + rows], 0);
  }
}

// ---------------------------------------------------------------------------
// bf16 <-> fp32
// ---------------------------------------------------------------------------

bf16 cvt(uint32_t f32_bits) { return mk::f32_to_bf16(float_of(f32_bits)); }
bool bf16_is_nan(bf16 b) { return (b & 0x7f80) == 0x7f80 && (b & 0x7f) != 0; }

TEST(Bf16Convert, RoundToNearestEvenEdgeCases) {
  EXPECT_EQ(cvt(0x3f800000u), 0x3f80);  // 1.0 exact
  EXPECT_EQ(cvt(0x00000000u), 0x0000);  // +0
  EXPECT_EQ(cvt(0x80000000u), 0x8000);  // -0
  // Ties go to the even mantissa.
  EXPECT_EQ(cvt(0x3f808000u), 0x3f80);  // 1 + 2^-8: tie, 0x3f80 even -> down
  EXPECT_EQ(cvt(0x3f818000u), 0x3f82);  // tie, 0x3f81 odd -> up
  EXPECT_EQ(cvt(0xbf808000u), 0xbf80);  // negative tie, even -> toward zero
  EXPECT_EQ(cvt(0xbf818000u), 0xbf82);  // negative tie, odd -> away from zero
  // Just off the tie.
  EXPECT_EQ(cvt(0x3f808001u), 0x3f81);
  EXPECT_EQ(cvt(0x3f807fffu), 0x3f80);
  // Carry into the exponent: 1.9999999 rounds to 2.
  EXPECT_EQ(cvt(0x3fffffffu), 0x4000);
  // Infinities stay infinities.
  EXPECT_EQ(cvt(0x7f800000u), 0x7f80);
  EXPECT_EQ(cvt(0xff800000u), 0xff80);
  // Largest finite float rounds to inf; largest finite bf16 stays; a tie at
  // the top (0x7f7f odd) rounds up to inf; just below the tie stays finite.
  EXPECT_EQ(cvt(0x7f7fffffu), 0x7f80);
  EXPECT_EQ(cvt(0xff7fffffu), 0xff80);
  EXPECT_EQ(cvt(0x7f7f0000u), 0x7f7f);
  EXPECT_EQ(cvt(0x7f7f8000u), 0x7f80);
  EXPECT_EQ(cvt(0x7f7f7fffu), 0x7f7f);
  EXPECT_EQ(cvt(0x7f7e8000u), 0x7f7e);  // tie, even -> stays finite
  // NaN stays NaN, including a signalling NaN whose payload sits only in the
  // low 16 bits (truncation would turn it into inf) and NaNs whose rounding
  // increment would carry.
  for (uint32_t nan : {0x7fc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu, 0xffffffffu,
                       0x7f808000u, 0x7fbfffffu}) {
    const bf16 b = cvt(nan);
    EXPECT_TRUE(bf16_is_nan(b)) << std::hex << "0x" << nan << " -> 0x" << b;
    EXPECT_EQ(b & 0x8000, (nan >> 16) & 0x8000) << "sign of NaN 0x" << std::hex << nan;
  }
  // Denormals round too (RNE), and the smallest ones to zero.
  EXPECT_EQ(cvt(0x00008000u), 0x0000);  // tie, even -> 0
  EXPECT_EQ(cvt(0x00018000u), 0x0002);  // tie, odd -> up
  EXPECT_EQ(cvt(0x00000001u), 0x0000);
  EXPECT_EQ(cvt(0x007fffffu), 0x0080);  // largest denormal rounds to FLT_MIN
}

TEST(Bf16Convert, EveryBf16RoundTripsExactly) {
  for (uint32_t v = 0; v <= 0xffff; ++v) {
    const bf16 b = static_cast<bf16>(v);
    const float f = mk::bf16_to_f32(b);
    EXPECT_EQ(bits_of(f), v << 16);
    if (bf16_is_nan(b)) {
      ASSERT_TRUE(bf16_is_nan(mk::f32_to_bf16(f))) << std::hex << v;
    } else {
      ASSERT_EQ(mk::f32_to_bf16(f), b) << std::hex << v;
    }
  }
}

// Against an independent reference: the nearer of the two neighbouring bf16
// values, computed in double, ties to the even one (overflow: the neighbour
// above 0x7f7f is 2^128, i.e. rounding as if the exponent were unbounded).
TEST(Bf16Convert, MatchesNearestEvenReferenceOnRandomFloats) {
  std::mt19937 rng(2024);
  for (int i = 0; i < 1000000; ++i) {
    uint32_t u = rng();
    if ((u & 0x7fffffffu) > 0x7f800000u) continue;  // NaN covered above
    if (i % 4 == 0) u = (u & 0xffff0000u) | 0x8000u;  // many exact ties
    const uint32_t mag = u & 0x7fffffffu, sign = u & 0x80000000u;
    const uint32_t lo = mag >> 16, hi = lo + 1;
    bf16 want;
    if (mag == 0x7f800000u) {
      want = static_cast<bf16>(lo);
    } else {
      const double x = float_of(mag);
      const double vlo = float_of(lo << 16);
      const double vhi = hi == 0x7f80 ? std::ldexp(1.0, 128) : float_of(hi << 16);
      const double dlo = x - vlo, dhi = vhi - x;
      want = static_cast<bf16>(dlo < dhi ? lo : dhi < dlo ? hi : (lo % 2 == 0 ? lo : hi));
    }
    want = static_cast<bf16>(want | (sign >> 16));
    ASSERT_EQ(cvt(u), want) << "input bits 0x" << std::hex << u;
  }
}

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
  std::frexp(x, &e);           // x = f * 2^e, f in [0.5, 1)
  return std::ldexp(1.0, e - 8);  // 8 significant bits
}

constexpr double kEltC = 16.0 * kU;
// Below the fp32 normal range the relative bounds above stop holding (the SIMD
// exp and the products lose precision there); anything below this is
// compared with an absolute slack of one such value.
constexpr double kEltAbs = 0x1p-126;

double sigmoid_d(double g) { return 1.0 / (1.0 + std::exp(-g)); }

class Eltwise : public testing::TestWithParam<mk::Isa> {
 protected:
  const mk::EltwiseKernel& kernel() const { return mk::eltwise_kernel(GetParam()); }
  void SetUp() override {
    if (!mk::cpu_supports(GetParam()))
      GTEST_SKIP() << "element-wise kernels for " << mk::isa_name(GetParam())
                   << " cannot run on this CPU: " << mk::cpu_summary();
    ASSERT_EQ(kernel().isa, GetParam());
  }
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
      const float specials[] = {1.00390625f, -1.00390625f, 0.0f, -0.0f, INFINITY, -INFINITY,
                                NAN, FLT_MAX, 3.0e38f, 1e-30f};
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
  const uint32_t bits[] = {0x00000001u, 0x00008000u, 0x00018000u, 0x007fffffu, 0x80400000u,
                           0x00400001u};
  std::vector<float> src;
  for (uint32_t b : bits) src.push_back(float_of(b));
  std::vector<bf16> dst(src.size(), kDstGarbage);
  kernel().to_bf16(src.data(), 1.0f, dst.data(), static_cast<int64_t>(src.size()));
  for (size_t i = 0; i < src.size(); ++i) {
    EXPECT_EQ(dst[i], mk::f32_to_bf16(src[i])) << std::hex << "input 0x" << bits[i] << " -> 0x" << dst[i];
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
        ASSERT_NEAR(as_double(dg[i]), dg_exact,
                    0.5 * ulp_bf16(dg_exact) + kEltC * dg_mag + kEltAbs)
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
  const bf16 edges_g[] = {lim, static_cast<bf16>(lim + 1), static_cast<bf16>(lim - 1), nlim,
                          trunc_bf16(-30.0f), trunc_bf16(0.0f)};
  const bf16 edges_u[] = {lim, nlim, static_cast<bf16>(lim + 1), static_cast<bf16>(nlim + 1),
                          static_cast<bf16>(lim - 1), static_cast<bf16>(nlim - 1)};
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
      const float dot = kernel().clamped_swiglu_bwd(in.g.data(), in.u.data(), in.d.data(), w,
                                                    cp.alpha, cp.limit, h.data(), dg.data(),
                                                    du.data(), n);
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
  const std::vector<bf16> u = {mk::f32_to_bf16(0.5f), mk::f32_to_bf16(0.5f), lim, nlim,
                               mk::f32_to_bf16(0.5f), nan};
  const int64_t n = static_cast<int64_t>(g.size());
  std::vector<float> d(n, 1.0f);
  std::vector<bf16> h(n), dg(n), du(n);
  kernel().clamped_swiglu_bwd(g.data(), u.data(), d.data(), 1.0f, alpha, limit, h.data(),
                              dg.data(), du.data(), n);
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

INSTANTIATE_TEST_SUITE_P(Kernels, Eltwise,
                         testing::Values(mk::Isa::kScalar, mk::Isa::kAvx512),
                         [](const testing::TestParamInfo<mk::Isa>& info) {
                           return std::string(mk::isa_name(info.param));
                         });

TEST(Registry, EltwiseKernelSelection) {
  EXPECT_EQ(mk::eltwise_kernel(mk::Isa::kScalar).isa, mk::Isa::kScalar);
  for (mk::Isa isa : {mk::Isa::kScalar, mk::Isa::kAvx2, mk::Isa::kAvx512, mk::Isa::kAvx512Bf16, mk::Isa::kAmxBf16}) {
    const mk::EltwiseKernel& k = mk::eltwise_kernel(isa);
    EXPECT_TRUE(mk::cpu_supports(k.isa)) << "eltwise for " << mk::isa_name(isa) << " picked "
                                         << mk::isa_name(k.isa) << ", which cannot run here";
    EXPECT_LE(static_cast<int>(k.isa), static_cast<int>(isa));
    EXPECT_TRUE(k.to_bf16 && k.swiglu && k.swiglu_bwd && k.clamped_swiglu && k.clamped_swiglu_bwd);
  }
  // One AVX-512 F/BW set serves every AVX-512 ISA (it uses no BF16 instruction).
  if (mk::cpu_supports(mk::Isa::kAvx512)) {
    for (mk::Isa isa : {mk::Isa::kAvx512, mk::Isa::kAvx512Bf16, mk::Isa::kAmxBf16})
      EXPECT_EQ(mk::eltwise_kernel(isa).isa, mk::Isa::kAvx512) << mk::isa_name(isa);
  }
  EXPECT_EQ(mk::eltwise_kernel(mk::Isa::kAvx2).isa, mk::Isa::kScalar);
}

// ---------------------------------------------------------------------------
// CPU detection and registry
// ---------------------------------------------------------------------------

TEST(Registry, CpuSummaryAndFeatures) {
  const std::string s = mk::cpu_summary();
  EXPECT_FALSE(s.empty());
  std::cout << "[ cpu      ] " << s << "\n";
  EXPECT_TRUE(mk::cpu_supports(mk::Isa::kScalar));
  const mk::CpuFeatures& f = mk::cpu_features();
  EXPECT_EQ(mk::cpu_supports(mk::Isa::kAvx2), f.avx2_fma);
  EXPECT_EQ(mk::cpu_supports(mk::Isa::kAvx512), f.avx512);
  EXPECT_EQ(mk::cpu_supports(mk::Isa::kAvx512Bf16), f.avx512_bf16);
  // AVX512-BF16 (and AMX) imply the F/BW/VL/DQ base the avx512 path needs.
  if (f.avx512_bf16) EXPECT_TRUE(f.avx512);
  EXPECT_EQ(mk::cpu_supports(mk::Isa::kAmxBf16), f.amx_bf16);
  for (mk::Isa isa : {mk::Isa::kScalar, mk::Isa::kAvx2, mk::Isa::kAvx512, mk::Isa::kAvx512Bf16, mk::Isa::kAmxBf16})
    EXPECT_STRNE(mk::isa_name(isa), "?");
}

TEST(Registry, AllKernelsWellFormed) {
  const auto& ks = mk::all_gemm_kernels();
  ASSERT_FALSE(ks.empty());
  EXPECT_EQ(ks.front().isa, mk::Isa::kScalar) << "scalar must come first (the oracle)";
  for (size_t i = 0; i < ks.size(); ++i) {
    EXPECT_NE(ks[i].gemm, nullptr) << ks[i].name;
    EXPECT_NE(ks[i].transpose_packed, nullptr) << ks[i].name;
    ASSERT_NE(ks[i].name, nullptr);
    EXPECT_GT(std::strlen(ks[i].name), 0u);
    EXPECT_EQ(ks[i].format, mk::PackFormat::kBf16Pair16) << ks[i].name;
    for (size_t j = i + 1; j < ks.size(); ++j) {
      EXPECT_NE(ks[i].isa, ks[j].isa) << "two kernels for one ISA";
      EXPECT_STRNE(ks[i].name, ks[j].name);
    }
    std::cout << "[ kernel   ] " << ks[i].name << " (" << mk::isa_name(ks[i].isa) << "): "
              << (mk::cpu_supports(ks[i].isa) ? "runs here" : "SKIPPED here") << "\n";
  }
}

TEST(Registry, BestKernel) {
  EXPECT_EQ(mk::best_gemm_kernel(mk::Isa::kScalar).isa, mk::Isa::kScalar);
  EXPECT_STREQ(mk::best_gemm_kernel(mk::Isa::kScalar).name, "scalar");

  // Expected: the highest registered ISA that this CPU runs, under the cap.
  auto expected = [](mk::Isa cap) {
    mk::Isa best = mk::Isa::kScalar;
    for (const auto& k : mk::all_gemm_kernels())
      if (static_cast<int>(k.isa) <= static_cast<int>(cap) && mk::cpu_supports(k.isa) &&
          static_cast<int>(k.isa) > static_cast<int>(best))
        best = k.isa;
    return best;
  };
  for (mk::Isa cap : {mk::Isa::kScalar, mk::Isa::kAvx2, mk::Isa::kAvx512, mk::Isa::kAvx512Bf16, mk::Isa::kAmxBf16})
    EXPECT_EQ(mk::best_gemm_kernel(cap).isa, expected(cap)) << "cap " << mk::isa_name(cap);

  // Spelled out for the machines we develop on.
  if (mk::cpu_supports(mk::Isa::kAvx512Bf16) && !mk::cpu_supports(mk::Isa::kAmxBf16)) {
    EXPECT_EQ(mk::best_gemm_kernel().isa, mk::Isa::kAvx512Bf16);
    EXPECT_STREQ(mk::best_gemm_kernel().name, "avx512_bf16");
  }
  if (mk::cpu_supports(mk::Isa::kAvx2)) {
    EXPECT_EQ(mk::best_gemm_kernel(mk::Isa::kAvx2).isa, mk::Isa::kAvx2);
  }
  if (mk::cpu_supports(mk::Isa::kAvx512)) {
    EXPECT_EQ(mk::best_gemm_kernel(mk::Isa::kAvx512).isa, mk::Isa::kAvx512);
    EXPECT_STREQ(mk::best_gemm_kernel(mk::Isa::kAvx512).name, "avx512_fma");
  }
  // A CPU with AVX-512 but no BF16 (Skylake-SP, Cascade Lake) gets the avx512 path.
  if (mk::cpu_supports(mk::Isa::kAvx512) && !mk::cpu_supports(mk::Isa::kAvx512Bf16)) {
    EXPECT_EQ(mk::best_gemm_kernel().isa, mk::Isa::kAvx512);
  }
  // Never returns a kernel the CPU cannot run.
  EXPECT_TRUE(mk::cpu_supports(mk::best_gemm_kernel().isa));
}

TEST(Registry, GemmKernelLookup) {
  for (const auto& k : mk::all_gemm_kernels()) {
    if (mk::cpu_supports(k.isa)) {
      EXPECT_EQ(&mk::gemm_kernel(k.isa), &k);
    } else {
      EXPECT_THROW(mk::gemm_kernel(k.isa), std::runtime_error) << k.name;
    }
  }
}

TEST(Registry, AmxKernelThrowsWithMessage) {
  bool built = false;
  for (const auto& k : mk::all_gemm_kernels()) built |= k.isa == mk::Isa::kAmxBf16;
  if (built && mk::cpu_supports(mk::Isa::kAmxBf16))
    GTEST_SKIP() << "an AMX kernel is built and this CPU runs it; nothing to throw";
  try {
    (void)mk::gemm_kernel(mk::Isa::kAmxBf16);
    FAIL() << "gemm_kernel(kAmxBf16) returned instead of throwing";
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("amx"), std::string::npos) << msg;
    EXPECT_TRUE(msg.find(built ? "cannot run" : "no kernel built") != std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace moetune::kernel_test
