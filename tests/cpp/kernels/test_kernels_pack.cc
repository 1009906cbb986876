// Layout tests of the kernel layer (ISA-independent): pack_b, transpose_to_a
// and the bf16 <-> fp32 conversions.

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
      SCOPED_TRACE("K=" + std::to_string(K) + " N=" + std::to_string(N) +
                   " n_begin=" + std::to_string(nb));
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
  const std::pair<int64_t, int64_t> ranges[] = {{0, 100}, {16, 64},  {5, 37}, {99, 100},
                                                {32, 33}, {48, 100}, {0, 1},  {3, 19}};
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
              const bool both_nan =
                  std::isnan(mk::bf16_to_f32(want)) && std::isnan(mk::bf16_to_f32(got));
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
  mk::transpose_to_a(src.data(), mk::SrcType::kBf16, cols, rows, cols, nullptr, dst.data(), ld_dst);
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = 0; r < rows; ++r) EXPECT_EQ(dst[c * ld_dst + r], src[r * cols + c]);
    EXPECT_EQ(dst[c * ld_dst + rows], 0);
  }
}

// ---------------------------------------------------------------------------
// bf16 <-> fp32
// ---------------------------------------------------------------------------

bf16 cvt(uint32_t f32_bits) { return mk::f32_to_bf16(float_of(f32_bits)); }

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
  for (uint32_t nan : {0x7fc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu, 0xffffffffu, 0x7f808000u,
                       0x7fbfffffu}) {
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
    if ((u & 0x7fffffffu) > 0x7f800000u) continue;    // NaN covered above
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

}  // namespace
}  // namespace moetune::kernel_test
