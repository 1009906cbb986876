// Tests for the kernel layer (csrc/kernels): every registered GEMM kernel
// against a double-precision oracle over the *unpacked* inputs, cross-ISA
// agreement, packing (pack_b, per-ISA transpose_packed, packed_slice),
// A-operand transposes, bf16 rounding, the element-wise epilogues and the
// registry. Kernels this CPU cannot run are skipped with GTEST_SKIP, never
// passed silently.
//
// Buffers handed to kernels are allocated to exactly the size the contract in
// gemm.h promises (A: (M-1)*lda + Kp, packed B: packed_elems, C in the "tight"
// run: (M-1)*ldc + n_end), so an AddressSanitizer build flags any overread or
// overwrite. Every cell a call must not write holds a recognisable NaN and is
// checked bit for bit afterwards.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cpu.h"
#include "kernels/eltwise.h"
#include "kernels/gemm.h"

namespace mk = moetune::kernels;
using mk::bf16;

namespace {

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A quiet NaN with a payload: every C cell a call must not write starts as this
// and is compared bitwise afterwards; every cell a non-accumulating call must
// write starts as this too (so reading it would poison the result).
constexpr uint32_t kPoisonBits = 0x7fc5a5a5u;
// Written into A's stride padding [Kp, lda): a kernel must never read it.
constexpr bf16 kANaN = 0x7fc1;
// Written into pack/transpose destinations before the call, to see what the
// call wrote.
constexpr bf16 kDstGarbage = 0xbeef;

bool is_poison(float f) { return bits_of(f) == kPoisonBits; }

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// Test inputs are made by *truncating* float bits, so they do not depend on the
// library's f32_to_bf16. Denormal results become signed zero: inputs are kept
// normal (see the tolerance derivation below for why that matters).
bf16 trunc_bf16(float x) {
  bf16 b = static_cast<bf16>(bits_of(x) >> 16);
  if ((b & 0x7f80) == 0) b &= 0x8000;
  return b;
}

double as_double(bf16 b) { return static_cast<double>(mk::bf16_to_f32(b)); }

enum class Dist {
  kUniform,  // bf16 values from U[-2, 2]
  kMixed,    // random sign, exponent 2^-20..2^20, random 7-bit mantissa
  kInteger,  // integers in [-4, 4]: every partial sum exact, result must be exact
};

const char* dist_name(Dist d) {
  switch (d) {
    case Dist::kUniform: return "uniform";
    case Dist::kMixed: return "mixed";
    case Dist::kInteger: return "integer";
  }
  return "?";
}

struct Gen {
  std::mt19937 rng;
  Dist dist;
  Gen(uint64_t seed, Dist d) : rng(static_cast<uint32_t>(seed ^ (seed >> 32))), dist(d) {}

  bf16 operator()() {
    switch (dist) {
      case Dist::kUniform:
        return trunc_bf16(std::uniform_real_distribution<float>(-2.0f, 2.0f)(rng));
      case Dist::kMixed: {
        const uint32_t sign = std::uniform_int_distribution<uint32_t>(0, 1)(rng);
        const int e = std::uniform_int_distribution<int>(-20, 20)(rng);
        const uint32_t mant = std::uniform_int_distribution<uint32_t>(0, 127)(rng);
        return static_cast<bf16>((sign << 15) | (static_cast<uint32_t>(127 + e) << 7) | mant);
      }
      case Dist::kInteger:
        return trunc_bf16(static_cast<float>(std::uniform_int_distribution<int>(-4, 4)(rng)));
    }
    return 0;
  }
  // An initial C value for accumulate=true (an arbitrary fp32, not a bf16).
  float c0() {
    if (dist == Dist::kInteger)
      return static_cast<float>(std::uniform_int_distribution<int>(-100, 100)(rng));
    if (dist == Dist::kMixed) {
      const float m = std::uniform_real_distribution<float>(-2.0f, 2.0f)(rng);
      return std::ldexp(m, std::uniform_int_distribution<int>(-10, 30)(rng));
    }
    return std::uniform_real_distribution<float>(-2.0f, 2.0f)(rng);
  }
  float any_f32(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }
  uint16_t bits16() { return static_cast<uint16_t>(rng() >> 16); }
};

// ---------------------------------------------------------------------------
// Tolerance
// ---------------------------------------------------------------------------
//
// A and B are bf16 (8 significant bits), so every product a*b has at most 16
// significant bits and is *exact* in fp32 (the generators below make every
// input zero or of magnitude 2^-32..2^21, so products never under/overflow).
// The only error of a correct kernel is therefore the rounding of the fp32 running sums, whatever
// order it adds in (K order, vdpbf16ps pair order, FMA, C added first or last):
// for n terms (Ktot products, plus the initial C when accumulating) the
// classical bound is gamma_{n-1} * sum|term| <= 2 * n * 2^-24 * sum|term|.
// The padding products (0 * 0 for an odd K) add exactly.
//
// tiny_abs: vdpbf16ps ignores MXCSR and always flushes denormal results to zero
// (and treats denormal inputs as zero). Inputs here are never denormal, but an
// intermediate running sum could be; each flush loses less than FLT_MIN, and
// there are at most 2 roundings per term, hence 4 * n * FLT_MIN (~5e-38 * n),
// far below anything the relative term could hide.
constexpr double kU = 0x1p-24;

double tolerance(double abs_sum, int64_t nterms) {
  return 2.0 * static_cast<double>(nterms) * kU * abs_sum +
         4.0 * static_cast<double>(nterms) * static_cast<double>(FLT_MIN);
}

// ---------------------------------------------------------------------------
// Packed layout, spelled out independently of pack.cc
// ---------------------------------------------------------------------------

// Where the contract puts element (k, n) of a packed [K, N] operand.
int64_t packed_index(int64_t K, int64_t k, int64_t n) {
  return (n / mk::kPanelN) * mk::packed_kp(K) * mk::kPanelN + (k / 2) * 32 +
         (n % mk::kPanelN) * 2 + (k % 2);
}

// Every element of a packed [K, N] buffer that is not a real (k < K, n < N)
// element must be zero. Returns how many are not.
int64_t nonzero_padding(const std::vector<bf16>& pk, int64_t K, int64_t N) {
  std::vector<char> real(pk.size(), 0);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) real[packed_index(K, k, n)] = 1;
  int64_t bad = 0;
  for (size_t i = 0; i < pk.size(); ++i) bad += (!real[i] && pk[i] != 0);
  return bad;
}

// ---------------------------------------------------------------------------
// GEMM problems
// ---------------------------------------------------------------------------

struct GemmCase {
  std::string name;
  int64_t M = 1;
  std::vector<int64_t> Ks = {1};  // one entry per segment
  int64_t N = 1;
  int64_t n_begin = 0;
  int64_t n_end = -1;    // -1: N
  int64_t lda_pad = 0;   // lda = Kp + lda_pad
  int64_t ldc_pad = 0;   // ldc = N + ldc_pad
  bool kn = true;        // B source row-major [K, N] (true) or [N, K] (false)
  bool accumulate = false;
  Dist dist = Dist::kUniform;

  int64_t ne() const { return n_end < 0 ? N : n_end; }
  int64_t ldc() const { return N + ldc_pad; }
  int64_t nterms() const {
    int64_t t = accumulate ? 1 : 0;
    for (int64_t k : Ks) t += k;
    return t;
  }
};

void PrintTo(const GemmCase& c, std::ostream* os) {
  *os << c.name << "{M=" << c.M << " K=[";
  for (size_t i = 0; i < c.Ks.size(); ++i) *os << (i ? "," : "") << c.Ks[i];
  *os << "] N=" << c.N << " n=[" << c.n_begin << "," << c.ne() << ") lda_pad=" << c.lda_pad
      << " ldc=" << c.ldc() << " B=" << (c.kn ? "[K,N]" : "[N,K]")
      << " accumulate=" << c.accumulate << " dist=" << dist_name(c.dist) << "}";
}

// Inputs of one call: the logical operands (what the oracle reads) and the
// kernel operands built from them.
struct Problem {
  int64_t M = 0, N = 0;
  bool kn = true;
  std::vector<int64_t> Ks;
  std::vector<std::vector<bf16>> a;     // A_s logical [M, K_s], tight row-major
  std::vector<std::vector<bf16>> bsrc;  // B_s unpacked: [K_s, ldb] if kn, else [N, ldb]
  std::vector<int64_t> ldb;
  std::vector<std::vector<bf16>> aop;   // A_s operand: stride lda, contract size
  std::vector<int64_t> lda;
  std::vector<std::vector<bf16>> bpk;   // packed B_s, exactly packed_elems(K_s, N)

  double A(size_t s, int64_t m, int64_t k) const { return as_double(a[s][m * Ks[s] + k]); }
  double B(size_t s, int64_t k, int64_t n) const {
    return as_double(kn ? bsrc[s][k * ldb[s] + n] : bsrc[s][n * ldb[s] + k]);
  }
  std::vector<mk::Segment> segments() const {
    std::vector<mk::Segment> segs(Ks.size());
    for (size_t s = 0; s < Ks.size(); ++s) {
      segs[s].A = aop[s].data();
      segs[s].lda = lda[s];
      segs[s].B.data = bpk[s].data();
      segs[s].B.K = Ks[s];
      segs[s].B.N = N;
    }
    return segs;
  }
};

// Builds the A operand for a logical [M, K] matrix: row stride lda, the pad
// element A[m, K] (K odd) zero as the contract demands, the stride padding
// [Kp, lda) NaN, and exactly (M-1)*lda + Kp elements.
std::vector<bf16> make_a_operand(const std::vector<bf16>& a, int64_t M, int64_t K, int64_t lda) {
  const int64_t kp = mk::packed_kp(K);
  std::vector<bf16> op(M > 0 ? static_cast<size_t>((M - 1) * lda + kp) : 0);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) op[m * lda + k] = a[m * K + k];
    if (K % 2) op[m * lda + K] = 0;
    if (m + 1 < M)
      for (int64_t k = kp; k < lda; ++k) op[m * lda + k] = kANaN;
  }
  return op;
}

Problem make_problem(const GemmCase& c, uint64_t seed) {
  Gen g(seed, c.dist);
  Problem p;
  p.M = c.M;
  p.N = c.N;
  p.kn = c.kn;
  p.Ks = c.Ks;
  for (size_t s = 0; s < c.Ks.size(); ++s) {
    const int64_t K = c.Ks[s];
    std::vector<bf16> a(static_cast<size_t>(c.M * K));
    for (auto& v : a) v = g();
    // Source of B with a row stride larger than needed, exact size.
    const int64_t ldb = c.kn ? c.N + 3 : K + 5;
    const int64_t rows = c.kn ? K : c.N;
    const int64_t cols = c.kn ? c.N : K;
    std::vector<bf16> bsrc(rows > 0 ? static_cast<size_t>((rows - 1) * ldb + cols) : 0, kANaN);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t q = 0; q < cols; ++q) bsrc[r * ldb + q] = g();
    std::vector<bf16> bpk(static_cast<size_t>(mk::packed_elems(K, c.N)), kDstGarbage);
    mk::pack_b(bsrc.data(), mk::SrcType::kBf16, ldb, c.kn, K, 0, c.N, 1.0f, bpk.data());
    const int64_t lda = mk::packed_kp(K) + c.lda_pad;
    p.aop.push_back(make_a_operand(a, c.M, K, lda));
    p.lda.push_back(lda);
    p.a.push_back(std::move(a));
    p.bsrc.push_back(std::move(bsrc));
    p.ldb.push_back(ldb);
    p.bpk.push_back(std::move(bpk));
  }
  return p;
}

// The oracle: C[m, n] = C0[m, n] + sum_s sum_k A_s[m, k] * B_s[k, n], written the
// obvious way in double over the unpacked operands. Also returns the sum of
// absolute values of all terms for the error bound.
struct Oracle {
  std::vector<double> val, abs_sum;  // [M, N]
};

Oracle oracle(const Problem& p, const std::vector<float>* c0) {
  Oracle o;
  o.val.assign(static_cast<size_t>(p.M * p.N), 0.0);
  o.abs_sum.assign(static_cast<size_t>(p.M * p.N), 0.0);
  for (int64_t m = 0; m < p.M; ++m) {
    for (int64_t n = 0; n < p.N; ++n) {
      double v = 0.0, av = 0.0;
      if (c0) {
        v = (*c0)[m * p.N + n];
        av = std::fabs(v);
      }
      for (size_t s = 0; s < p.Ks.size(); ++s) {
        for (int64_t k = 0; k < p.Ks[s]; ++k) {
          const double t = p.A(s, m, k) * p.B(s, k, n);
          v += t;
          av += std::fabs(t);
        }
      }
      o.val[m * p.N + n] = v;
      o.abs_sum[m * p.N + n] = av;
    }
  }
  return o;
}

// Collects mismatches without flooding the log.
struct Report {
  int64_t bad = 0;
  std::ostringstream msg;
  void add(const std::string& what) {
    if (bad++ < 8) msg << "  " << what << "\n";
  }
  std::string str() const {
    return std::to_string(bad) + " bad cell(s), first ones:\n" + msg.str();
  }
};

// A C buffer for one call: cells (m < M, n_begin <= n < n_end) hold c0 when
// accumulating and poison otherwise; every other cell holds poison.
//   tight = false: M*ldc + a guard row of ldc (to catch writes to row M)
//   tight = true : exactly (M-1)*ldc + n_end, the least a caller may pass
std::vector<float> make_c(const GemmCase& c, const std::vector<float>& c0, bool tight) {
  const int64_t ldc = c.ldc(), ne = c.ne();
  const int64_t size = tight ? (c.M > 0 ? (c.M - 1) * ldc + ne : 0) : (c.M + 1) * ldc;
  std::vector<float> C(static_cast<size_t>(size), float_of(kPoisonBits));
  if (c.accumulate)
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t n = c.n_begin; n < ne; ++n) C[m * ldc + n] = c0[m * c.N + n];
  return C;
}

// Checks a C buffer after the call against the oracle and the poison.
void check_c(const GemmCase& c, const std::vector<float>& C, const Oracle& ref, Report& r) {
  const int64_t ldc = c.ldc(), ne = c.ne();
  const bool exact = c.dist == Dist::kInteger;
  for (int64_t i = 0; i < static_cast<int64_t>(C.size()); ++i) {
    const int64_t m = i / ldc, n = i % ldc;
    const bool in_range = m < c.M && n >= c.n_begin && n < ne;
    std::ostringstream where;
    where << "C[" << m << "," << n << "]";
    if (!in_range) {
      if (!is_poison(C[i])) {
        std::ostringstream s;
        s << where.str() << " outside the written range was modified: bits 0x" << std::hex
          << bits_of(C[i]);
        r.add(s.str());
      }
      continue;
    }
    const double want = ref.val[m * c.N + n];
    const double tol = exact ? 0.0 : tolerance(ref.abs_sum[m * c.N + n], c.nterms());
    const double got = C[i];
    if (!std::isfinite(got) || std::fabs(got - want) > tol) {
      std::ostringstream s;
      s.precision(10);
      s << where.str() << " = " << got << " (bits 0x" << std::hex << bits_of(C[i]) << std::dec
        << "), oracle " << want << ", |err| " << std::fabs(got - want) << " > tol " << tol;
      r.add(s.str());
    }
  }
}

uint64_t case_seed(const GemmCase& c) { return fnv1a(c.name); }

std::vector<float> make_c0(const GemmCase& c, uint64_t seed) {
  std::vector<float> c0(static_cast<size_t>(c.M * c.N), 0.0f);
  if (c.accumulate) {
    Gen g(seed ^ 0x9e3779b97f4a7c15ull, c.dist);
    for (auto& v : c0) v = g.c0();
  }
  return c0;
}

// Runs `fn` on case `c` twice (roomy C with guard row and tight C), checks
// both against the oracle and the poison, and checks the two runs agree
// bitwise. Returns the report; `out` receives the roomy C.
Report run_and_check(mk::GemmFn fn, const GemmCase& c, std::vector<float>* out = nullptr) {
  const uint64_t seed = case_seed(c);
  const Problem p = make_problem(c, seed);
  const std::vector<float> c0 = make_c0(c, seed);
  const Oracle ref = oracle(p, c.accumulate ? &c0 : nullptr);
  const std::vector<mk::Segment> segs = p.segments();
  Report r;
  std::vector<float> results[2];
  for (int tight = 0; tight < 2; ++tight) {
    // A kernel that already wrote outside its range into the roomy buffer
    // would corrupt the heap with the tight one: report, don't crash.
    if (tight && r.bad) return r;
    std::vector<float> C = make_c(c, c0, tight != 0);
    fn(c.M, c.n_begin, c.ne(), segs.data(), static_cast<int>(segs.size()), C.data(), c.ldc(),
       c.accumulate);
    check_c(c, C, ref, r);
    results[tight] = std::move(C);
  }
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t n = c.n_begin; n < c.ne(); ++n) {
      const int64_t i = m * c.ldc() + n;
      if (bits_of(results[0][i]) != bits_of(results[1][i]))
        r.add("C[" + std::to_string(m) + "," + std::to_string(n) +
              "] differs between the roomy and the tight C buffer");
    }
  if (out) *out = std::move(results[0]);
  return r;
}

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
  // M below and around the row tiles (AVX2 MR=4, AVX-512 MR=8).
  for (int64_t M : {1, 3, 7, 9, 13}) add("TailM_M" + std::to_string(M) + "_K31_N50", M, {31}, 50);
  // Tokens per expert below one row tile (MoE: few tokens routed to an expert).
  add("TokensLtTile_M2_K64_N64", 2, {64}, 64);
  add("TokensLtTile_M1_K200_N96", 1, {200}, 96).kn = false;
  // Long K.
  add("KLarge_M16_K2048_N48", 16, {2048}, 48);
  add("KLarge_M5_K2048_N20", 5, {2048}, 20).kn = false;
  add("KLarge_M9_K2047_N33", 9, {2047}, 33);
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

std::string kernel_label(size_t i) { return mk::all_gemm_kernels()[i].name; }

// ---------------------------------------------------------------------------
// Every kernel x every shape against the oracle
// ---------------------------------------------------------------------------

class GemmVsOracle : public testing::TestWithParam<std::tuple<size_t, GemmCase>> {};

TEST_P(GemmVsOracle, MatchesDoubleOracle) {
  const mk::GemmKernel& k = mk::all_gemm_kernels()[std::get<0>(GetParam())];
  const GemmCase& c = std::get<1>(GetParam());
  if (!mk::cpu_supports(k.isa))
    GTEST_SKIP() << "kernel " << k.name << " (" << mk::isa_name(k.isa)
                 << ") cannot run on this CPU: " << mk::cpu_summary();
  const Report r = run_and_check(k.gemm, c);
  EXPECT_EQ(r.bad, 0) << k.name << " on " << testing::PrintToString(c) << "\n" << r.str();
}

INSTANTIATE_TEST_SUITE_P(
    Kernels, GemmVsOracle,
    testing::Combine(testing::Range<size_t>(0, mk::all_gemm_kernels().size()),
                     testing::ValuesIn(all_cases())),
    [](const testing::TestParamInfo<GemmVsOracle::ParamType>& info) {
      return kernel_label(std::get<0>(info.param)) + "_" + std::get<1>(info.param).name;
    });

// ---------------------------------------------------------------------------
// Cross-ISA agreement on the same inputs
// ---------------------------------------------------------------------------

class GemmCrossIsa : public testing::TestWithParam<GemmCase> {};

TEST_P(GemmCrossIsa, SupportedKernelsAgree) {
  const GemmCase& c = GetParam();
  std::vector<const mk::GemmKernel*> ks;
  for (const auto& k : mk::all_gemm_kernels())
    if (mk::cpu_supports(k.isa)) ks.push_back(&k);
  if (ks.size() < 2)
    GTEST_SKIP() << "fewer than two kernels can run here: " << mk::cpu_summary();

  const uint64_t seed = case_seed(c);
  const Problem p = make_problem(c, seed);
  const std::vector<float> c0 = make_c0(c, seed);
  const Oracle ref = oracle(p, c.accumulate ? &c0 : nullptr);  // for abs_sum only
  const std::vector<mk::Segment> segs = p.segments();
  std::vector<std::vector<float>> out;
  for (const auto* k : ks) {
    std::vector<float> C = make_c(c, c0, false);
    k->gemm(c.M, c.n_begin, c.ne(), segs.data(), static_cast<int>(segs.size()), C.data(),
            c.ldc(), c.accumulate);
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
            s << "C[" << m << "," << n << "]: " << ks[i]->name << "=" << a << " "
              << ks[j]->name << "=" << b << " diff " << std::fabs(a - b) << " > " << tol;
            r.add(s.str());
          }
        }
      }
      EXPECT_EQ(r.bad, 0) << ks[i]->name << " vs " << ks[j]->name << " on "
                          << testing::PrintToString(c) << "\n" << r.str();
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

class GemmKernelTest : public testing::TestWithParam<size_t> {
 protected:
  const mk::GemmKernel& kernel() const { return mk::all_gemm_kernels()[GetParam()]; }
  void SetUp() override {
    if (!mk::cpu_supports(kernel().isa))
      GTEST_SKIP() << "kernel " << kernel().name << " (" << mk::isa_name(kernel().isa)
                   << ") cannot run on this CPU: " << mk::cpu_summary();
  }
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
    kernel().gemm(rows[i + 1] - rows[i], 0, c.N, sub.data(), nseg, by_m.data() + rows[i] * ldc,
                  ldc, false);
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
            const bf16 xa = scaled ? mk::f32_to_bf16(w[t] * mk::bf16_to_f32(X[t * ldx + h]))
                                   : X[t * ldx + h];
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
  const Shape shapes[] = {
      {64, 48, 0, 64},   {64, 48, 16, 48},  {64, 48, 32, 64},  {256, 256, 0, 256},
      {256, 256, 96, 160}, {33, 31, 0, 33}, {33, 31, 16, 33},  {33, 33, 0, 32},
      {34, 17, 16, 34},  {1, 1, 0, 1},      {2, 40, 0, 2},     {17, 100, 0, 17},
      {40, 16, 5, 37},   {48, 32, 3, 48},   {64, 64, 16, 16},  {255, 7, 32, 255},
      {31, 64, 16, 31},  {32, 33, 0, 32},
      // Partial last destination panel with source rows past n_end present:
      // those rows must not leak into the zero pad columns.
      {64, 32, 16, 40},  {64, 48, 0, 20},   {100, 64, 32, 65}};
  for (const Shape& sh : shapes) {
    SCOPED_TRACE("B [K=" + std::to_string(sh.K) + ", N=" + std::to_string(sh.N) +
                 "], B^T columns [" +
                 std::to_string(sh.nb) + "," + std::to_string(sh.ne) + ")");
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

INSTANTIATE_TEST_SUITE_P(Kernels, GemmKernelTest,
                         testing::Range<size_t>(0, mk::all_gemm_kernels().size()),
                         [](const testing::TestParamInfo<size_t>& info) {
                           return kernel_label(info.param);
                         });

// ---------------------------------------------------------------------------
// The harness itself must catch broken kernels (guards against a vacuous
// oracle, a loose tolerance or a poison check that looks at nothing).
// ---------------------------------------------------------------------------

enum class Bug { kNone, kOutputRoundedToBf16, kDropsLastOddK, kWritesPastNEnd, kReadsCOnOverwrite,
                 kIgnoresLastSegment, kReadsAStridePad };

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
// vcvtneps2bf16 flushes fp32 denormals to zero; anything below this is
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
        const bf16 want = mk::f32_to_bf16(scale * src[i]);
        if (bf16_is_nan(want)) {
          EXPECT_TRUE(bf16_is_nan(dst[i])) << i;
        } else {
          ASSERT_EQ(dst[i], want) << "i=" << i << " x=" << src[i];
        }
      }
      for (int64_t i = n; i < n + kGuard; ++i) ASSERT_EQ(dst[i], kDstGarbage) << "guard " << i;
    }
  }
}

// fp32 denormals: the scalar path rounds them (RNE); vcvtneps2bf16 flushes
// them to a signed zero. Both are accepted; anything else is not.
TEST_P(Eltwise, ToBf16DenormalsRoundOrFlush) {
  const uint32_t bits[] = {0x00000001u, 0x00008000u, 0x00018000u, 0x007fffffu, 0x80400000u,
                           0x00400001u};
  std::vector<float> src;
  for (uint32_t b : bits) src.push_back(float_of(b));
  std::vector<bf16> dst(src.size(), kDstGarbage);
  kernel().to_bf16(src.data(), 1.0f, dst.data(), static_cast<int64_t>(src.size()));
  for (size_t i = 0; i < src.size(); ++i) {
    const bf16 rne = mk::f32_to_bf16(src[i]);
    const bf16 flushed = static_cast<bf16>((bits[i] >> 16) & 0x8000);
    EXPECT_TRUE(dst[i] == rne || dst[i] == flushed)
        << std::hex << "input 0x" << bits[i] << " -> 0x" << dst[i];
    if (GetParam() == mk::Isa::kScalar) {
      EXPECT_EQ(dst[i], rne);
    }
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

INSTANTIATE_TEST_SUITE_P(Kernels, Eltwise,
                         testing::Values(mk::Isa::kScalar, mk::Isa::kAvx512Bf16),
                         [](const testing::TestParamInfo<mk::Isa>& info) {
                           return std::string(mk::isa_name(info.param));
                         });

TEST(Registry, EltwiseKernelSelection) {
  EXPECT_EQ(mk::eltwise_kernel(mk::Isa::kScalar).isa, mk::Isa::kScalar);
  for (mk::Isa isa : {mk::Isa::kScalar, mk::Isa::kAvx2, mk::Isa::kAvx512Bf16, mk::Isa::kAmxBf16}) {
    const mk::EltwiseKernel& k = mk::eltwise_kernel(isa);
    EXPECT_TRUE(mk::cpu_supports(k.isa)) << "eltwise for " << mk::isa_name(isa) << " picked "
                                         << mk::isa_name(k.isa) << ", which cannot run here";
    EXPECT_LE(static_cast<int>(k.isa), static_cast<int>(isa));
    EXPECT_TRUE(k.to_bf16 && k.swiglu && k.swiglu_bwd);
  }
  if (mk::cpu_supports(mk::Isa::kAvx512Bf16)) {
    EXPECT_EQ(mk::eltwise_kernel(mk::Isa::kAvx512Bf16).isa, mk::Isa::kAvx512Bf16);
  }
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
  EXPECT_EQ(mk::cpu_supports(mk::Isa::kAvx512Bf16), f.avx512_bf16);
  EXPECT_EQ(mk::cpu_supports(mk::Isa::kAmxBf16), f.amx_bf16);
  for (mk::Isa isa : {mk::Isa::kScalar, mk::Isa::kAvx2, mk::Isa::kAvx512Bf16, mk::Isa::kAmxBf16})
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
  for (mk::Isa cap : {mk::Isa::kScalar, mk::Isa::kAvx2, mk::Isa::kAvx512Bf16, mk::Isa::kAmxBf16})
    EXPECT_EQ(mk::best_gemm_kernel(cap).isa, expected(cap)) << "cap " << mk::isa_name(cap);

  // Spelled out for the machines we develop on.
  if (mk::cpu_supports(mk::Isa::kAvx512Bf16) && !mk::cpu_supports(mk::Isa::kAmxBf16)) {
    EXPECT_EQ(mk::best_gemm_kernel().isa, mk::Isa::kAvx512Bf16);
    EXPECT_STREQ(mk::best_gemm_kernel().name, "avx512_bf16");
  }
  if (mk::cpu_supports(mk::Isa::kAvx2)) {
    EXPECT_EQ(mk::best_gemm_kernel(mk::Isa::kAvx2).isa, mk::Isa::kAvx2);
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
