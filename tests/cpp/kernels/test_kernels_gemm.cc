// GEMM kernel tests: every ISA's GEMM against the double-precision oracle
// (kernel_test_support.h), cross-ISA agreement, splitting/accumulate
// composition, each bundle's W^T repack, and a harness self-test with
// deliberately broken kernels.

#include <gtest/gtest.h>

#include "kernel_test_support.h"

namespace moetune::kernel_test {
namespace {

// ---------------------------------------------------------------------------
// Named shape sweep
// ---------------------------------------------------------------------------

std::vector<GemmCase> gemm_cases() {
  std::vector<GemmCase> base;
  auto add = [&](std::string name, int64_t M, std::vector<int64_t> Ks, int64_t N) -> GemmCase& {
    GemmCase c;
    c.name = std::move(name);
    c.M = M;
    c.Ks = std::move(Ks);
    c.N = N;
    base.push_back(c);
    return base.back();
  };
  const std::string S = "_";
  // Aligned: M a multiple of every MR, K even, N a multiple of 2 panels.
  add("Aligned_M64_K256_N128", 64, {256}, 128);
  add("Aligned_M64_K256_N128", 64, {256}, 128).kn = false;
  // Odd K (1, 3, 17, 33, 255): the zero pad row of B against the zero pad of A.
  for (int64_t K : {1, 3, 17, 33, 255}) {
    add("OddK_M9_K" + std::to_string(K) + "_N40", 9, {K}, 40);
    add("OddK_M9_K" + std::to_string(K) + "_N40", 9, {K}, 40).kn = false;
  }
  // N not a multiple of 16 (masked last panel; 1 or 2 panels per block).
  for (int64_t N : {1, 7, 17, 33, 100}) add("TailN_M5_K24_N" + std::to_string(N), 5, {24}, N);
  // M below and around the row tiles (AVX2 MR=4, AVX512-BF16 and AVX-512 MR=8).
  for (int64_t M : {1, 3, 7, 9, 13}) add("TailM_M" + std::to_string(M) + "_K31_N50", M, {31}, 50);
  // Tokens per expert below one row tile (MoE: few tokens routed to an expert).
  add("TokensLtTile_M2_K64_N64", 2, {64}, 64);
  add("TokensLtTile_M1_K200_N96", 1, {200}, 96).kn = false;
  // Long K.
  add("KLarge_M16_K2048_N48", 16, {2048}, 48);
  add("KLarge_M5_K2048_N20", 5, {2048}, 20).kn = false;
  add("KLarge_M9_K2047_N33", 9, {2047}, 33);
  // Blocked kernels (AMX: 32-row x 256-K x 256-column blocks): more than one
  // block along each axis, each with a partial last block.
  add("Blocked_M45_K800_N300", 45, {800}, 300);
  {
    auto& c = add("Blocked_Seg2_M70_K544x288_N520_16to500", 70, {544, 288}, 520);
    c.n_begin = 16, c.n_end = 500, c.ldc_pad = 3;
  }
  add("Exact_Blocked_M37_K1056_N272", 37, {1056}, 272).dist = Dist::kInteger;
  // AMX row blocks of 192 (C staged per block): a second, partial row block
  // whose last 32-row tile has <= 16 rows (the 1 x 2 tile block), K blocks
  // crossing segment boundaries (the next-K-block prefetch).
  add("Blocked_M200_K600_N270", 200, {600}, 270);
  {
    auto& c = add("Blocked_Seg3_M213_K544x96x300_N300_16to290", 213, {544, 96, 300}, 300);
    c.n_begin = 16, c.n_end = 290, c.ldc_pad = 5;
  }
  add("Exact_Blocked_M390_K1100_N40", 390, {1100}, 40).dist = Dist::kInteger;
  // avx512 (F only) sums the segments' concatenated K in chunks of 256 pairs
  // with 8-row x 3-panel blocks: chunk edges inside and between segments,
  // 1-row and 1-panel tails.
  add("Chunks_Seg3_M25_K600x301x16_N70", 25, {600, 301, 16}, 70).kn = false;
  add("Exact_Chunks_Seg2_M25_K520x600_N40", 25, {520, 600}, 40).dist = Dist::kInteger;
  // Multi-segment (fused base + LoRA): K differs per segment.
  add("Seg2_M9_K64x16_N48", 9, {64, 16}, 48);
  add("Seg2_M13_K2048x8_N70", 13, {2048, 8}, 70).kn = false;
  add("Seg2_M4_K1x1_N16", 4, {1, 1}, 16);
  add("Seg3_M13_K33x5x7_N33", 13, {33, 5, 7}, 33);
  add("Seg3_M3_K7x255x2_N100", 3, {7, 255, 2}, 100).kn = false;
  add("Seg4_M7_K17x2x1x64_N100", 7, {17, 2, 1, 64}, 100);
  add("Seg4_M16_K256x8x8x3_N64", 16, {256, 8, 8, 3}, 64);
  // Partial N ranges: n_begin a multiple of 16 > 0, n_end not at N.
  {
    auto& c = add("PartN_M9_K40_N100_16to77", 9, {40}, 100);
    c.n_begin = 16, c.n_end = 77;
  }
  {
    auto& c = add("PartN_M13_K33_N100_32to33", 13, {33}, 100);
    c.n_begin = 32, c.n_end = 33;
  }
  {
    auto& c = add("PartN_M5_K8_N100_96to100", 5, {8}, 100);
    c.n_begin = 96, c.n_end = 100;
  }
  {
    auto& c = add("PartN_M7_K19_N100_0to50", 7, {19}, 100);
    c.n_begin = 0, c.n_end = 50;
    c.kn = false;
  }
  {
    auto& c = add("PartN_M8_K64_N128_48to64", 8, {64}, 128);
    c.n_begin = 48, c.n_end = 64;
  }
  {
    auto& c = add("PartN_Seg3_M11_K33x5x7_N90_16to81", 11, {33, 5, 7}, 90);
    c.n_begin = 16, c.n_end = 81;
  }
  // Empty calls: must write nothing.
  {
    auto& c = add("Empty_NRange_M5_K10_N64_32to32", 5, {10}, 64);
    c.n_begin = 32, c.n_end = 32;
  }
  add("Empty_M0_K10_N40", 0, {10}, 40);
  // Strides: lda > Kp (odd lda too, so A rows are not 4-byte aligned), ldc > N.
  add("Strides_M9_K17_N33_lda+6_ldc+13", 9, {17}, 33).lda_pad = 6;
  base.back().ldc_pad = 13;
  add("Strides_M13_K33_N40_lda+1_ldc+1", 13, {33}, 40).lda_pad = 1;
  base.back().ldc_pad = 1;
  {
    auto& c = add("Strides_Seg2_M10_K64x5_N50_16to45_lda+3_ldc+7", 10, {64, 5}, 50);
    c.lda_pad = 3, c.ldc_pad = 7, c.n_begin = 16, c.n_end = 45, c.kn = false;
  }
  // Mixed magnitudes (2^-20..2^20): cancellation makes the rounding visible.
  add("Mixed_M13_K255_N33", 13, {255}, 33).dist = Dist::kMixed;
  add("Mixed_M8_K2048_N32", 8, {2048}, 32).dist = Dist::kMixed;
  add("Mixed_Seg3_M9_K100x7x1_N70", 9, {100, 7, 1}, 70).dist = Dist::kMixed;
  // Small integers: every partial sum is exact, so every kernel must match the
  // oracle bit for bit regardless of its summation order.
  add("Exact_M13_K2048_N33", 13, {2048}, 33).dist = Dist::kInteger;
  add("Exact_Seg4_M9_K17x2x1x64_N100", 9, {17, 2, 1, 64}, 100).dist = Dist::kInteger;
  {
    auto& c = add("Exact_PartN_M7_K33_N70_16to50", 7, {33}, 70);
    c.dist = Dist::kInteger, c.n_begin = 16, c.n_end = 50, c.ldc_pad = 5;
  }

  // Every shape both overwriting (C poisoned with NaN) and accumulating.
  std::vector<GemmCase> all;
  for (GemmCase c : base) {
    c.name += c.kn ? "_Bkn" : "_Bnk";
    for (char& ch : c.name)
      if (ch == '+') ch = 'p';
    c.accumulate = false;
    all.push_back(c);
    c.accumulate = true;
    c.name += "_Acc";
    all.push_back(c);
  }
  return all;
}

const std::vector<GemmCase>& all_cases() {
  static const std::vector<GemmCase> cases = gemm_cases();
  return cases;
}

// ---------------------------------------------------------------------------
// Every kernel x every shape against the oracle
// ---------------------------------------------------------------------------

class GemmVsOracle : public testing::TestWithParam<std::tuple<mk::Isa, GemmCase>> {};

TEST_P(GemmVsOracle, MatchesDoubleOracle) {
  const mk::KernelBundle& k = mk::kernels_for(std::get<0>(GetParam()));
  const GemmCase& c = std::get<1>(GetParam());
  const std::string why = why_not_runnable(k.isa);
  if (!why.empty()) GTEST_SKIP() << why;
  const Report r = run_and_check(k.gemm, c);
  EXPECT_EQ(r.bad, 0) << k.name << " on " << testing::PrintToString(c) << "\n" << r.str();
}

INSTANTIATE_TEST_SUITE_P(Kernels, GemmVsOracle,
                         testing::Combine(testing::ValuesIn(all_isas()),
                                          testing::ValuesIn(all_cases())),
                         [](const testing::TestParamInfo<GemmVsOracle::ParamType>& info) {
                           return std::string(mk::isa_name(std::get<0>(info.param))) + "_" +
                                  std::get<1>(info.param).name;
                         });

// ---------------------------------------------------------------------------
// Cross-ISA agreement on the same inputs
// ---------------------------------------------------------------------------

class GemmCrossIsa : public testing::TestWithParam<GemmCase> {};

TEST_P(GemmCrossIsa, SupportedKernelsAgree) {
  const GemmCase& c = GetParam();
  std::vector<const mk::KernelBundle*> ks;
  for (mk::Isa isa : all_isas())
    if (mk::cpu_supports(isa)) ks.push_back(&mk::kernels_for(isa));
  if (ks.size() < 2) GTEST_SKIP() << "fewer than two kernels can run here: " << mk::cpu_summary();

  const uint64_t seed = case_seed(c);
  const Problem p = make_problem(c, seed);
  const std::vector<float> c0 = make_c0(c, seed);
  const Oracle ref = oracle(p, c.accumulate ? &c0 : nullptr);  // for abs_sum only
  const std::vector<mk::Segment> segs = p.segments();
  std::vector<std::vector<float>> out;
  for (const auto* k : ks) {
    std::vector<float> C = make_c(c, c0, false);
    k->gemm(c.M, c.n_begin, c.ne(), segs.data(), static_cast<int>(segs.size()), C.data(), c.ldc(),
            c.accumulate);
    out.push_back(std::move(C));
  }
  for (size_t i = 0; i < ks.size(); ++i) {
    for (size_t j = i + 1; j < ks.size(); ++j) {
      Report r;
      for (int64_t m = 0; m < c.M; ++m) {
        for (int64_t n = c.n_begin; n < c.ne(); ++n) {
          const int64_t idx = m * c.ldc() + n;
          const double a = out[i][idx], b = out[j][idx];
          // Each is within tolerance() of the exact result, so they are within
          // twice that of each other.
          const double tol = c.dist == Dist::kInteger
                                 ? 0.0
                                 : 2.0 * tolerance(ref.abs_sum[m * c.N + n], c.nterms());
          if (!std::isfinite(a) || !std::isfinite(b) || std::fabs(a - b) > tol) {
            std::ostringstream s;
            s.precision(10);
            s << "C[" << m << "," << n << "]: " << ks[i]->name << "=" << a << " " << ks[j]->name
              << "=" << b << " diff " << std::fabs(a - b) << " > " << tol;
            r.add(s.str());
          }
        }
      }
      EXPECT_EQ(r.bad, 0) << ks[i]->name << " vs " << ks[j]->name << " on "
                          << testing::PrintToString(c) << "\n"
                          << r.str();
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Kernels, GemmCrossIsa, testing::ValuesIn(all_cases()),
                         [](const testing::TestParamInfo<GemmCase>& info) {
                           return info.param.name;
                         });

// ---------------------------------------------------------------------------
// Per-kernel properties beyond one call
// ---------------------------------------------------------------------------

class GemmKernelTest : public PerIsa {
 protected:
  const mk::KernelBundle& kernel() const { return kernels(); }
};

// Callers split N (at panel boundaries) or M across threads; the result must
// not depend on the split, bit for bit (each output element is the same chain
// of roundings), so training is reproducible across thread counts.
TEST_P(GemmKernelTest, SplittingNOrMIsBitwiseIdentical) {
  GemmCase c;
  c.name = "split";
  c.M = 13;
  c.Ks = {37, 6};
  c.N = 70;
  c.ldc_pad = 3;
  const Problem p = make_problem(c, 1234);
  const std::vector<mk::Segment> segs = p.segments();
  const int nseg = static_cast<int>(segs.size());
  const int64_t ldc = c.ldc();

  std::vector<float> full(static_cast<size_t>(c.M * ldc), float_of(kPoisonBits));
  kernel().gemm(c.M, 0, c.N, segs.data(), nseg, full.data(), ldc, false);

  // N split at panel boundaries 16 and 48 (uneven pieces: 1, 2 and 2 panels).
  std::vector<float> by_n(full.size(), float_of(kPoisonBits));
  const int64_t cuts[] = {0, 16, 48, c.N};
  for (int i = 0; i < 3; ++i)
    kernel().gemm(c.M, cuts[i], cuts[i + 1], segs.data(), nseg, by_n.data(), ldc, false);

  // M split at rows 5 and 8 by offsetting A and C.
  std::vector<float> by_m(full.size(), float_of(kPoisonBits));
  const int64_t rows[] = {0, 5, 8, c.M};
  for (int i = 0; i < 3; ++i) {
    std::vector<mk::Segment> sub = segs;
    for (auto& s : sub) s.A += rows[i] * s.lda;
    kernel().gemm(rows[i + 1] - rows[i], 0, c.N, sub.data(), nseg, by_m.data() + rows[i] * ldc, ldc,
                  false);
  }
  for (size_t i = 0; i < full.size(); ++i) {
    ASSERT_EQ(bits_of(full[i]), bits_of(by_n[i])) << "N split differs at flat index " << i;
    ASSERT_EQ(bits_of(full[i]), bits_of(by_m[i])) << "M split differs at flat index " << i;
  }
}

// accumulate=true onto the result of an accumulate=false call of the second
// segment equals the fused two-segment call within tolerance (the engine may
// do either).
TEST_P(GemmKernelTest, AccumulateComposesSegments) {
  GemmCase c;
  c.name = "compose";
  c.M = 9;
  c.Ks = {33, 8};
  c.N = 40;
  const Problem p = make_problem(c, 99);
  const std::vector<mk::Segment> segs = p.segments();
  const Oracle ref = oracle(p, nullptr);
  std::vector<float> C(static_cast<size_t>(c.M * c.N), float_of(kPoisonBits));
  kernel().gemm(c.M, 0, c.N, &segs[1], 1, C.data(), c.N, false);
  kernel().gemm(c.M, 0, c.N, &segs[0], 1, C.data(), c.N, true);
  for (int64_t i = 0; i < c.M * c.N; ++i) {
    const double tol = tolerance(ref.abs_sum[i], c.nterms() + 1);
    ASSERT_NEAR(C[i], ref.val[i], tol) << "flat index " << i;
  }
}

// The LoRA weight-gradient path: dW[H, R] = X^T[H, T] * G[T, R] with the token
// axis as K, A built by transpose_to_a (optionally scaled per token by routing
// weights), B = G packed as [K=T, N=R]. T below, at and above one pair / tile.
TEST_P(GemmKernelTest, TransposedActivationsAsA_LoraGradient) {
  for (int64_t T : {1, 2, 3, 37}) {
    for (bool scaled : {false, true}) {
      SCOPED_TRACE("T=" + std::to_string(T) + " scaled=" + std::to_string(scaled));
      const int64_t H = 21, R = 8, ldx = H + 2, ldg = R + 1;
      Gen g(777 + T, Dist::kUniform);
      std::vector<bf16> X(static_cast<size_t>((T - 1) * ldx + H));
      std::vector<bf16> G(static_cast<size_t>((T - 1) * ldg + R));
      for (auto& v : X) v = g();
      for (auto& v : G) v = g();
      std::vector<float> w(static_cast<size_t>(T));
      for (auto& v : w) v = g.any_f32(0.0f, 1.0f);

      const int64_t lda = mk::packed_kp(T) + 2;
      std::vector<bf16> A(static_cast<size_t>((H - 1) * lda + mk::packed_kp(T)), kANaN);
      mk::transpose_to_a(X.data(), mk::SrcType::kBf16, ldx, T, H, scaled ? w.data() : nullptr,
                         A.data(), lda);
      std::vector<bf16> Bp(static_cast<size_t>(mk::packed_elems(T, R)));
      mk::pack_b(G.data(), mk::SrcType::kBf16, ldg, true, T, 0, R, 1.0f, Bp.data());
      mk::Segment seg;
      seg.A = A.data();
      seg.lda = lda;
      seg.B = {Bp.data(), T, R};
      std::vector<float> C(static_cast<size_t>(H * R), float_of(kPoisonBits));
      kernel().gemm(H, 0, R, &seg, 1, C.data(), R, false);

      for (int64_t h = 0; h < H; ++h) {
        for (int64_t r = 0; r < R; ++r) {
          double want = 0.0, abs_sum = 0.0;
          for (int64_t t = 0; t < T; ++t) {
            // The A operand holds bf16(w_t * x): that rounding is part of the
            // definition of transpose_to_a, checked on its own below.
            const bf16 xa =
                scaled ? mk::f32_to_bf16(w[t] * mk::bf16_to_f32(X[t * ldx + h])) : X[t * ldx + h];
            const double term = as_double(xa) * as_double(G[t * ldg + r]);
            want += term;
            abs_sum += std::fabs(term);
          }
          ASSERT_NEAR(C[h * R + r], want, tolerance(abs_sum, T)) << "dW[" << h << "," << r << "]";
        }
      }
    }
  }
}

// transpose_packed (W^T slices for backward): dst = packed columns [n_begin,
// n_end) of B^T, i.e. dst(k', c) = B(n_begin + c, k') with K' = B.N. Checked
// element by element against the *logical* B, padding zero, destination
// allocated exactly (ASan) and pre-filled with garbage (every element must be
// written, since the contract does not say dst is zeroed by the caller).
TEST_P(GemmKernelTest, TransposePackedMatchesLogicalTranspose) {
  ASSERT_NE(kernel().transpose_packed, nullptr);
  struct Shape {
    int64_t K, N, nb, ne;
  };
  const Shape shapes[] = {{64, 48, 0, 64},
                          {64, 48, 16, 48},
                          {64, 48, 32, 64},
                          {256, 256, 0, 256},
                          {256, 256, 96, 160},
                          {33, 31, 0, 33},
                          {33, 31, 16, 33},
                          {33, 33, 0, 32},
                          {34, 17, 16, 34},
                          {1, 1, 0, 1},
                          {2, 40, 0, 2},
                          {17, 100, 0, 17},
                          {40, 16, 5, 37},
                          {48, 32, 3, 48},
                          {64, 64, 16, 16},
                          {255, 7, 32, 255},
                          {31, 64, 16, 31},
                          {32, 33, 0, 32},
                          // Partial last destination panel with source rows past n_end present:
                          // those rows must not leak into the zero pad columns.
                          {64, 32, 16, 40},
                          {64, 48, 0, 20},
                          {100, 64, 32, 65}};
  for (const Shape& sh : shapes) {
    SCOPED_TRACE("B [K=" + std::to_string(sh.K) + ", N=" + std::to_string(sh.N) +
                 "], B^T columns [" + std::to_string(sh.nb) + "," + std::to_string(sh.ne) + ")");
    Gen g(sh.K * 131 + sh.N * 17 + sh.nb, Dist::kUniform);
    const int64_t ld = sh.N + 1;
    std::vector<bf16> B(static_cast<size_t>((sh.K - 1) * ld + sh.N));
    for (auto& v : B) v = g.bits16() | 1;  // arbitrary non-zero bits: a stray zero shows
    std::vector<bf16> pk(static_cast<size_t>(mk::packed_elems(sh.K, sh.N)));
    mk::pack_b(B.data(), mk::SrcType::kBf16, ld, true, sh.K, 0, sh.N, 1.0f, pk.data());
    const mk::PackedB src{pk.data(), sh.K, sh.N};
    const int64_t w = sh.ne - sh.nb;
    std::vector<bf16> dst(static_cast<size_t>(mk::packed_elems(sh.N, w)), kDstGarbage);
    kernel().transpose_packed(src, sh.nb, sh.ne, dst.data());
    for (int64_t kd = 0; kd < sh.N; ++kd)
      for (int64_t c = 0; c < w; ++c)
        ASSERT_EQ(dst[packed_index(sh.N, kd, c)], B[(sh.nb + c) * ld + kd])
            << "dst(k'=" << kd << ", c=" << c << ")";
    EXPECT_EQ(nonzero_padding(dst, sh.N, w), 0);
  }
}

// packed_slice: a panel-aligned column view of a packed operand behaves like
// the same columns of the whole operand.
TEST_P(GemmKernelTest, PackedSliceEqualsColumnsOfFullOperand) {
  GemmCase c;
  c.name = "slice";
  c.M = 11;
  c.Ks = {45, 6};
  c.N = 83;
  const Problem p = make_problem(c, 4321);
  const std::vector<mk::Segment> segs = p.segments();
  std::vector<float> full(static_cast<size_t>(c.M * c.N), float_of(kPoisonBits));
  kernel().gemm(c.M, 0, c.N, segs.data(), 2, full.data(), c.N, false);
  for (int64_t nb : {16, 32, 80}) {
    const int64_t w = c.N - nb;
    std::vector<mk::Segment> sub = segs;
    for (auto& s : sub) s.B = mk::packed_slice(s.B, nb, w);
    std::vector<float> part(static_cast<size_t>(c.M * w), float_of(kPoisonBits));
    kernel().gemm(c.M, 0, w, sub.data(), 2, part.data(), w, false);
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t n = 0; n < w; ++n)
        ASSERT_EQ(bits_of(part[m * w + n]), bits_of(full[m * c.N + nb + n]))
            << "slice at " << nb << ", C[" << m << "," << n << "]";
  }
}

MOETUNE_INSTANTIATE_PER_ISA(GemmKernelTest);

// ---------------------------------------------------------------------------
// The harness itself must catch broken kernels (guards against a vacuous
// oracle, a loose tolerance or a poison check that looks at nothing).
// ---------------------------------------------------------------------------

enum class Bug {
  kNone,
  kOutputRoundedToBf16,
  kDropsLastOddK,
  kWritesPastNEnd,
  kReadsCOnOverwrite,
  kIgnoresLastSegment,
  kReadsAStridePad
};

template <Bug kBug>
void fake_gemm(int64_t M, int64_t n_begin, int64_t n_end, const mk::Segment* segs, int nseg,
               float* C, int64_t ldc, bool accumulate) {
  const int used = kBug == Bug::kIgnoresLastSegment ? nseg - 1 : nseg;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n_begin; n < n_end; ++n) {
      float acc = (accumulate || kBug == Bug::kReadsCOnOverwrite) ? C[m * ldc + n] : 0.0f;
      for (int s = 0; s < used; ++s) {
        const mk::Segment& sg = segs[s];
        const bf16* panel = sg.B.panel(n / mk::kPanelN);
        int64_t K = sg.B.K;
        if (kBug == Bug::kDropsLastOddK && K % 2) K -= 1;
        // Reads [Kp, lda) of A (only between rows, where it exists).
        if (kBug == Bug::kReadsAStridePad && m + 1 < M) K = sg.lda;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t kb = std::min<int64_t>(k, sg.B.kp() - 1);
          const float b =
              k < sg.B.kp() ? mk::bf16_to_f32(panel[(kb / 2) * 32 + (n % 16) * 2 + kb % 2]) : 1.0f;
          acc += mk::bf16_to_f32(sg.A[m * sg.lda + k]) * b;
        }
      }
      if (kBug == Bug::kOutputRoundedToBf16) acc = mk::bf16_to_f32(mk::f32_to_bf16(acc));
      C[m * ldc + n] = acc;
      if (kBug == Bug::kWritesPastNEnd && n + 1 == n_end && n_end < ldc && m + 1 < M)
        C[m * ldc + n_end] = 0.0f;
    }
  }
}

TEST(GemmHarness, CatchesBrokenKernels) {
  GemmCase c;
  c.name = "harness";
  c.M = 9;
  c.Ks = {255, 5};
  c.N = 40;
  c.n_begin = 16;
  c.n_end = 37;
  c.lda_pad = 4;
  c.ldc_pad = 3;
  EXPECT_EQ(run_and_check(&fake_gemm<Bug::kNone>, c).bad, 0);
  EXPECT_GT(run_and_check(&fake_gemm<Bug::kOutputRoundedToBf16>, c).bad, 0);
  EXPECT_GT(run_and_check(&fake_gemm<Bug::kDropsLastOddK>, c).bad, 0);
  EXPECT_GT(run_and_check(&fake_gemm<Bug::kWritesPastNEnd>, c).bad, 0);
  EXPECT_GT(run_and_check(&fake_gemm<Bug::kReadsCOnOverwrite>, c).bad, 0);
  EXPECT_GT(run_and_check(&fake_gemm<Bug::kIgnoresLastSegment>, c).bad, 0);
  GemmCase one_row = c;  // the stride pad only exists between rows
  one_row.M = 2;
  EXPECT_GT(run_and_check(&fake_gemm<Bug::kReadsAStridePad>, one_row).bad, 0);
  c.accumulate = true;
  EXPECT_EQ(run_and_check(&fake_gemm<Bug::kNone>, c).bad, 0);
  EXPECT_GT(run_and_check(&fake_gemm<Bug::kOutputRoundedToBf16>, c).bad, 0);
}

}  // namespace
}  // namespace moetune::kernel_test
