// Shared helpers for the kernel-layer tests (csrc/kernels, tests/cpp/kernels):
// the per-ISA fixture (every row of the ISA table; rows this CPU cannot run
// are skipped with GTEST_SKIP, never passed silently), input generation,
// poison cells, the double-precision GEMM oracle and its checks.
//
// The GEMM tests run every ISA's kernel bundle against a double-precision
// oracle over the *unpacked* inputs, check cross-ISA agreement, packing
// (pack_b, each bundle's transpose_packed, packed_slice) and A-operand
// transposes.
//
// Buffers handed to kernels are allocated to exactly the size the contract in
// gemm.h promises (A: (M-1)*lda + Kp, packed B: packed_elems, C in the "tight"
// run: (M-1)*ldc + n_end), so an AddressSanitizer build flags any overread or
// overwrite. Every cell a call must not write holds a recognisable NaN and is
// checked bit for bit afterwards.

#pragma once

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
#include "kernels/gemm.h"
#include "kernels/isa.h"
#include "kernels/kernel_bundle.h"

// gtest prints these by name (found by ADL in their namespace).
namespace moetune::kernels {
inline void PrintTo(Isa isa, std::ostream* os) { *os << isa_name(isa); }
inline void PrintTo(FeatureSet s, std::ostream* os) { *os << "{" << feature_names(s) << "}"; }
}  // namespace moetune::kernels

namespace moetune::kernel_test {

namespace mk = moetune::kernels;
using mk::bf16;

// ---------------------------------------------------------------------------
// Per-ISA parametrization
// ---------------------------------------------------------------------------

// Every ISA of the table, in its order (scalar, the oracle, first).
inline std::vector<mk::Isa> all_isas() {
  std::vector<mk::Isa> v;
  for (const mk::IsaInfo& i : mk::kIsas) v.push_back(i.id);
  return v;
}

// "" if this CPU runs the ISA, else why not (for GTEST_SKIP).
inline std::string why_not_runnable(mk::Isa isa) {
  if (mk::cpu_supports(isa)) return "";
  return std::string("ISA ") + mk::isa_name(isa) + " cannot run on this CPU/OS (it lacks " +
         mk::feature_names(mk::isa_info(isa).required.minus(mk::cpu_features())) + ")";
}

// Base fixture of the tests run once per ISA: skips where the CPU lacks it.
class PerIsa : public testing::TestWithParam<mk::Isa> {
 protected:
  void SetUp() override {
    const std::string why = why_not_runnable(GetParam());
    if (!why.empty()) GTEST_SKIP() << why;
  }
  mk::Isa isa() const { return GetParam(); }
  const mk::KernelBundle& kernels() const { return mk::kernels_for(GetParam()); }
};

inline std::string isa_param_name(const testing::TestParamInfo<mk::Isa>& info) {
  return mk::isa_name(info.param);
}

// Instantiates a PerIsa suite over the whole table.
#define MOETUNE_INSTANTIATE_PER_ISA(Suite)                                                     \
  INSTANTIATE_TEST_SUITE_P(Isas, Suite, testing::ValuesIn(::moetune::kernel_test::all_isas()), \
                           ::moetune::kernel_test::isa_param_name)

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

inline bool bf16_is_nan(bf16 b) { return (b & 0x7f80) == 0x7f80 && (b & 0x7f) != 0; }

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
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

inline bool is_poison(float f) { return bits_of(f) == kPoisonBits; }

inline uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// Test inputs are made by *truncating* float bits, so they do not depend on the
// library's f32_to_bf16. Denormal results become signed zero: inputs are kept
// normal (see the tolerance derivation below for why that matters).
inline bf16 trunc_bf16(float x) {
  bf16 b = static_cast<bf16>(bits_of(x) >> 16);
  if ((b & 0x7f80) == 0) b &= 0x8000;
  return b;
}

inline double as_double(bf16 b) { return static_cast<double>(mk::bf16_to_f32(b)); }

enum class Dist {
  kUniform,  // bf16 values from U[-2, 2]
  kMixed,    // random sign, exponent 2^-20..2^20, random 7-bit mantissa
  kInteger,  // integers in [-4, 4]: every partial sum exact, result must be exact
};

inline const char* dist_name(Dist d) {
  switch (d) {
    case Dist::kUniform:
      return "uniform";
    case Dist::kMixed:
      return "mixed";
    case Dist::kInteger:
      return "integer";
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

inline double tolerance(double abs_sum, int64_t nterms) {
  return 2.0 * static_cast<double>(nterms) * kU * abs_sum +
         4.0 * static_cast<double>(nterms) * static_cast<double>(FLT_MIN);
}

// ---------------------------------------------------------------------------
// Packed layout, spelled out independently of pack.cc
// ---------------------------------------------------------------------------

// Where the contract puts element (k, n) of a packed [K, N] operand.
inline int64_t packed_index(int64_t K, int64_t k, int64_t n) {
  return (n / mk::kPanelN) * mk::packed_kp(K) * mk::kPanelN + (k / 2) * 32 + (n % mk::kPanelN) * 2 +
         (k % 2);
}

// Every element of a packed [K, N] buffer that is not a real (k < K, n < N)
// element must be zero. Returns how many are not.
inline int64_t nonzero_padding(const std::vector<bf16>& pk, int64_t K, int64_t N) {
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
  int64_t n_end = -1;   // -1: N
  int64_t lda_pad = 0;  // lda = Kp + lda_pad
  int64_t ldc_pad = 0;  // ldc = N + ldc_pad
  bool kn = true;       // B source row-major [K, N] (true) or [N, K] (false)
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

inline void PrintTo(const GemmCase& c, std::ostream* os) {
  *os << c.name << "{M=" << c.M << " K=[";
  for (size_t i = 0; i < c.Ks.size(); ++i) *os << (i ? "," : "") << c.Ks[i];
  *os << "] N=" << c.N << " n=[" << c.n_begin << "," << c.ne() << ") lda_pad=" << c.lda_pad
      << " ldc=" << c.ldc() << " B=" << (c.kn ? "[K,N]" : "[N,K]") << " accumulate=" << c.accumulate
      << " dist=" << dist_name(c.dist) << "}";
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
  std::vector<std::vector<bf16>> aop;  // A_s operand: stride lda, contract size
  std::vector<int64_t> lda;
  std::vector<std::vector<bf16>> bpk;  // packed B_s, exactly packed_elems(K_s, N)

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
inline std::vector<bf16> make_a_operand(const std::vector<bf16>& a, int64_t M, int64_t K,
                                        int64_t lda) {
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

inline Problem make_problem(const GemmCase& c, uint64_t seed) {
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

inline Oracle oracle(const Problem& p, const std::vector<float>* c0) {
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
inline std::vector<float> make_c(const GemmCase& c, const std::vector<float>& c0, bool tight) {
  const int64_t ldc = c.ldc(), ne = c.ne();
  const int64_t size = tight ? (c.M > 0 ? (c.M - 1) * ldc + ne : 0) : (c.M + 1) * ldc;
  std::vector<float> C(static_cast<size_t>(size), float_of(kPoisonBits));
  if (c.accumulate)
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t n = c.n_begin; n < ne; ++n) C[m * ldc + n] = c0[m * c.N + n];
  return C;
}

// Checks a C buffer after the call against the oracle and the poison.
inline void check_c(const GemmCase& c, const std::vector<float>& C, const Oracle& ref, Report& r) {
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

inline uint64_t case_seed(const GemmCase& c) { return fnv1a(c.name); }

inline std::vector<float> make_c0(const GemmCase& c, uint64_t seed) {
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
inline Report run_and_check(mk::GemmFn fn, const GemmCase& c, std::vector<float>* out = nullptr) {
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

}  // namespace moetune::kernel_test
