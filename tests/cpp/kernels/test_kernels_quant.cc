// INT8 / INT4 weight formats (csrc/kernels/quant.h): quantize_pack against a
// value-level reference computed here with plain loops (group amax, scale,
// q, dq), the error bound of every element, layout agreement with pack_b,
// and every runnable ISA's dequant (its kernel bundle's) bit-identical to the
// scalar oracle.
#include <gtest/gtest.h>

#include <array>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernel_test_support.h"
#include "kernels/cpu.h"
#include "kernels/gemm.h"
#include "kernels/kernel_bundle.h"
#include "kernels/quant.h"
#include "quant_test_support.h"

namespace moetune::kernels {
namespace {

struct Spec {
  const char* name;
  QuantSpec q;
};
const Spec kSpecs[] = {{"int8", {WeightFormat::kInt8, 0}},
                       {"int4_g32", {WeightFormat::kInt4, 32}},
                       {"int4_g64", {WeightFormat::kInt4, 64}},
                       {"int4_g128", {WeightFormat::kInt4, 128}}};
// Every quantized format (the per-ISA dequant test): the above plus the
// published minifloat formats (their value-level tests: test_kernels_minifloat.cc).
const Spec kAllSpecs[] = {
    {"int8", {WeightFormat::kInt8, 0}},          {"int4_g32", {WeightFormat::kInt4, 32}},
    {"int4_g64", {WeightFormat::kInt4, 64}},     {"int4_g128", {WeightFormat::kInt4, 128}},
    {"fp8_block", {WeightFormat::kFp8Block, 0}}, {"mxfp4", {WeightFormat::kMxfp4, 0}}};

// (K, N): aligned, K odd, K not a multiple of any group size, N not a
// multiple of 16, single element, K < group size.
const int64_t kShapes[][2] = {{128, 32}, {33, 17}, {200, 40}, {1, 1},
                              {130, 5},  {64, 16}, {258, 33}, {7, 48}};

// HF rows [N, K]: N(0, 0.02) like real checkpoints, one column with an
// outlier, one all-zero row (an output channel that is exactly zero).
std::vector<float> make_rows(int64_t K, int64_t N, uint64_t seed, bool to_bf16) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.0f, 0.02f);
  std::vector<float> w(size_t(K * N));
  for (float& v : w) v = d(g);
  if (N > 2) {
    for (int64_t k = 0; k < K; ++k) w[1 * K + k] = 0.0f;
    w[2 * K + K / 2] = 0.5f;
  }
  if (to_bf16)
    for (float& v : w) v = bf16_to_f32(f32_to_bf16(v));
  return w;
}

struct Quantized {
  std::vector<uint8_t> q;
  std::vector<float> s;
};

Quantized quantize(const std::vector<float>& rows, bool bf16_src, int64_t K, int64_t N,
                   const QuantSpec& spec) {
  Quantized out;
  out.q.assign(quant_q_bytes(spec, K, N), 0xA5);  // poison: every byte must be written
  out.s.assign(quant_scale_count(spec, K, N), NAN);
  if (bf16_src) {
    std::vector<bf16> b(rows.size());
    for (size_t i = 0; i < rows.size(); ++i) b[i] = f32_to_bf16(rows[i]);
    quantize_pack(b.data(), SrcType::kBf16, K, K, N, spec, out.q.data(), out.s.data(), "w");
  } else {
    quantize_pack(rows.data(), SrcType::kF32, K, K, N, spec, out.q.data(), out.s.data(), "w");
  }
  return out;
}

// The obvious reference: for element (k, n) of the [K, N] operand (= rows[n, k]).
struct RefQ {
  std::vector<float> s;  // per element: its group's scale
  std::vector<int> q;
  std::vector<bf16> dq;
};
RefQ reference(const std::vector<float>& rows, int64_t K, int64_t N, const QuantSpec& spec) {
  const int qmax = spec.format == WeightFormat::kInt8 ? 127 : 7;
  const int64_t G = spec.format == WeightFormat::kInt8 ? K : spec.group_size;
  RefQ r;
  r.s.resize(K * N);
  r.q.resize(K * N);
  r.dq.resize(K * N);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g0 = 0; g0 < K; g0 += G) {
      const int64_t g1 = std::min(K, g0 + G);
      float amax = 0.0f;
      for (int64_t k = g0; k < g1; ++k) amax = std::max(amax, std::fabs(rows[n * K + k]));
      float s = amax / float(qmax);
      if (s < FLT_MIN) s = 0.0f;
      for (int64_t k = g0; k < g1; ++k) {
        const float w = rows[n * K + k];
        int q = 0;
        if (s != 0.0f)
          q = int(std::max(-float(qmax), std::min(float(qmax), std::nearbyint(w / s))));
        r.s[k * N + n] = s;
        r.q[k * N + n] = q;
        r.dq[k * N + n] = f32_to_bf16(float(q) * s);
      }
    }
  }
  return r;
}

bf16 packed_at(const std::vector<bf16>& p, int64_t K, int64_t k, int64_t n) {
  return p[(n / kPanelN) * packed_kp(K) * kPanelN + (k / 2) * 2 * kPanelN + (n % kPanelN) * 2 +
           k % 2];
}

std::string tag(const Spec& sp, int64_t K, int64_t N, bool bf) {
  return std::string(sp.name) + " K=" + std::to_string(K) + " N=" + std::to_string(N) +
         (bf ? " src=bf16" : " src=f32");
}

TEST(QuantFormats, RoundTripMatchesValueReferenceAndErrorBound) {
  int checked = 0;
  for (const Spec& sp : kSpecs) {
    for (const auto& sh : kShapes) {
      for (bool bf : {true, false}) {
        const int64_t K = sh[0], N = sh[1];
        const std::string t = tag(sp, K, N, bf);
        const std::vector<float> rows = make_rows(K, N, 7 + K * 31 + N, bf);
        const Quantized qz = quantize(rows, bf, K, N, sp.q);
        const RefQ ref = reference(rows, K, N, sp.q);
        const QuantB qb{sp.q, qz.q.data(), qz.s.data(), K, N};
        std::vector<bf16> dq(packed_elems(K, N), 0xFFFF);
        kernels_for(Isa::kScalar).dequant(qb, 0, N, 0, K, dq.data());
        for (int64_t n = 0; n < packed_panels(N) * kPanelN; ++n) {
          for (int64_t k = 0; k < packed_kp(K); ++k) {
            const bf16 got = packed_at(dq, K, k, n);
            if (n >= N || k >= K) {
              ASSERT_EQ(got, 0) << t << ": pad (k=" << k << ", n=" << n << ") not +0";
              continue;
            }
            const size_t i = k * N + n;
            ASSERT_EQ(got, ref.dq[i])
                << t << ": dq(k=" << k << ", n=" << n << ") q=" << ref.q[i] << " s=" << ref.s[i];
            // Error bounds: integer step within s/2 (plus the fp32 rounding of
            // w/s before nearbyint: 2^-24 |w|); the bf16 rounding of q*s adds at
            // most u |q s|, u = 2^-8 (8-bit significand, round to nearest).
            const double w = rows[n * K + k], s = ref.s[i], d = bf16_to_f32(got);
            ASSERT_LE(std::abs(ref.q[i]), sp.q.format == WeightFormat::kInt8 ? 127 : 7);
            const double qerr = s / 2 + std::fabs(w) * std::ldexp(1.0, -24);
            ASSERT_LE(std::fabs(w - ref.q[i] * s), qerr) << t << " k=" << k << " n=" << n;
            ASSERT_LE(std::fabs(w - d), qerr + std::fabs(ref.q[i] * s) * std::ldexp(1.0, -8))
                << t << " k=" << k << " n=" << n;
          }
        }
        // The all-zero output channel dequantizes to exact zeros.
        if (N > 2)
          for (int64_t k = 0; k < K; ++k) ASSERT_EQ(packed_at(dq, K, k, 1), 0) << t;
        // Layout agreement: the same panels pack_b makes from the dequantized rows.
        std::vector<bf16> dq_rows(K * N);
        for (int64_t n = 0; n < N; ++n)
          for (int64_t k = 0; k < K; ++k) dq_rows[n * K + k] = ref.dq[k * N + n];
        std::vector<bf16> packed(packed_elems(K, N), 0xFFFF);
        pack_b(dq_rows.data(), SrcType::kBf16, K, false, K, 0, N, 1.0f, packed.data());
        ASSERT_EQ(0, std::memcmp(packed.data(), dq.data(), packed.size() * 2)) << t;
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, 4 * 8 * 2);
}

TEST(QuantFormats, ScalesAreAmaxOverQmax) {
  // A column whose group maximum is 0.7 gets s = 0.7/127 (int8), 0.7/7 (int4).
  const int64_t K = 64, N = 16;
  std::vector<float> rows(K * N, 0.01f);
  rows[3 * K + 40] = -0.7f;
  for (const Spec& sp : kSpecs) {
    const Quantized qz = quantize(rows, false, K, N, sp.q);
    const int64_t groups = quant_groups(sp.q, K);
    const int64_t g40 = sp.q.format == WeightFormat::kInt8 ? 0 : 40 / sp.q.group_size;
    EXPECT_EQ(qz.s[g40 * kPanelN + 3], 0.7f / float(quant_qmax(sp.q.format))) << sp.name;
    if (groups > 1) EXPECT_EQ(qz.s[0 * kPanelN + 3], 0.01f / 7.0f) << sp.name;  // the other group
    EXPECT_EQ(qz.s[0 * kPanelN + 4], 0.01f / float(quant_qmax(sp.q.format))) << sp.name;
  }
}

class DequantPerIsa : public kernel_test::PerIsa {};

TEST_P(DequantPerIsa, BitIdenticalToScalar) {
  const DequantFn oracle = kernels_for(Isa::kScalar).dequant;
  const DequantFn dequant = kernels().dequant;
  ASSERT_NE(dequant, nullptr);
  for (const Spec& sp : kAllSpecs) {
    for (const auto& sh : kShapes) {
      const int64_t K = sh[0], N = sh[1];
      const std::vector<float> rows = make_rows(K, N, 99 + K + N, true);
      const Quantized qz = quantize(rows, true, K, N, sp.q);
      const QuantB qb{sp.q, qz.q.data(), qz.s.data(), K, N};
      // Column ranges (full, from the second panel, a ragged end) x row
      // ranges (full, even start, odd length), as the engine's slices use.
      const int64_t nr[][2] = {{0, N}, {N > 16 ? 16 : 0, N}, {0, std::max<int64_t>(1, N - 3)}};
      const int64_t kr[][2] = {{0, K}, {K > 2 ? 2 : 0, K}, {0, K > 1 ? K - 1 : K}};
      for (const auto& c : nr) {
        for (const auto& r : kr) {
          const size_t elems = packed_elems(r[1] - r[0], c[1] - c[0]);
          std::vector<bf16> want(elems, 0xFFFF), got(elems, 0xFFFF);
          oracle(qb, c[0], c[1], r[0], r[1], want.data());
          dequant(qb, c[0], c[1], r[0], r[1], got.data());
          for (size_t e = 0; e < elems; ++e) {
            ASSERT_EQ(got[e], want[e])
                << isa_name(isa()) << " " << sp.name << " K=" << K << " N=" << N << " cols ["
                << c[0] << "," << c[1] << ") rows [" << r[0] << "," << r[1] << ") element " << e;
          }
        }
      }
    }
  }
}

using kernel_test::craft;
using kernel_test::Crafted;
using kernel_test::dequant_t_reference;

TEST_P(DequantPerIsa, EdgeScalesAndEveryCodeBitIdenticalToScalar) {
  const DequantFn oracle = kernels_for(Isa::kScalar).dequant;
  const DequantFn dequant = kernels().dequant;
  for (const Spec& sp : kAllSpecs) {
    for (const auto& sh : {std::array<int64_t, 2>{256, 64}, {130, 40}, {64, 17}}) {
      const int64_t K = sh[0], N = sh[1];
      const Crafted c = craft(sp.q, K, N, 1, 7 + K * N);
      const QuantB qb = c.view(sp.q, K, N);
      const size_t elems = packed_elems(K, N);
      std::vector<bf16> want(elems, 0xFFFF), got(elems, 0xFFFF);
      oracle(qb, 0, N, 0, K, want.data());
      dequant(qb, 0, N, 0, K, got.data());
      for (size_t e = 0; e < elems; ++e)
        ASSERT_EQ(got[e], want[e])
            << isa_name(isa()) << " " << sp.name << " K=" << K << " N=" << N << " element " << e;
    }
  }
}

MOETUNE_INSTANTIATE_PER_ISA(DequantPerIsa);

// The fused dequantize-and-transpose (quant.h DequantTFn): where a bundle has
// one, equal to the scalar dequant followed by the scalar W^T repack.
TEST(QuantFormats, FusedDequantTransposeInEverySimdBundle) {
  for (const IsaInfo& i : kIsas)
    EXPECT_EQ(kernels_for(i.id).dequant_t != nullptr, i.id != Isa::kScalar) << i.name;
}

class DequantTPerIsa : public kernel_test::PerIsa {};

TEST_P(DequantTPerIsa, EqualsDequantThenTranspose) {
  const DequantTFn dequant_t = kernels().dequant_t;
  if (!dequant_t) GTEST_SKIP() << isa_name(isa()) << " has no fused dequantize-and-transpose";
  const int64_t shapes[][2] = {{128, 32}, {33, 17},  {200, 40}, {1, 1},   {130, 5},
                               {64, 16},  {258, 33}, {7, 48},   {96, 64}, {512, 48}};
  for (const Spec& sp : kAllSpecs) {
    for (int crafted = 0; crafted < 2; ++crafted) {
      for (const auto& sh : shapes) {
        const int64_t K = sh[0], N = sh[1];
        Quantized qz;
        Crafted c;
        QuantB qb;
        if (crafted) {
          c = craft(sp.q, K, N, 1, 11 + K + N);
          qb = c.view(sp.q, K, N);
        } else {
          qz = quantize(make_rows(K, N, 5 + K * N, true), true, K, N, sp.q);
          qb = QuantB{sp.q, qz.q.data(), qz.s.data(), K, N};
        }
        // Row ranges as the backward's slices take them (whole, from a
        // 16-aligned and an unaligned even start, a ragged end, a middle).
        const int64_t kr[][2] = {{0, K},
                                 {K > 16 ? 16 : 0, K},
                                 {K > 2 ? 2 : 0, K},
                                 {0, K > 1 ? K - 1 : K},
                                 {K > 48 ? 32 : 0, K > 48 ? 48 + (K - 48) / 2 : K}};
        for (const auto& r : kr) {
          const std::vector<bf16> want = dequant_t_reference(qb, r[0], r[1]);
          std::vector<bf16> got(want.size(), 0xFFFF);  // exactly the contract's size
          dequant_t(qb, r[0], r[1], got.data());
          for (size_t e = 0; e < want.size(); ++e) {
            ASSERT_EQ(got[e], want[e])
                << isa_name(isa()) << " " << sp.name << (crafted ? " crafted" : " quantized")
                << " K=" << K << " N=" << N << " rows [" << r[0] << "," << r[1] << ") element "
                << e;
          }
        }
      }
    }
  }
}

MOETUNE_INSTANTIATE_PER_ISA(DequantTPerIsa);

TEST(QuantFormats, BadSpecsAndValuesGiveClearErrors) {
  for (int g : {0, 16, 48, 96, 256, -32}) {
    try {
      check_quant_spec({WeightFormat::kInt4, g});
      ADD_FAILURE() << "int4 group_size " << g << " accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(
          std::string(e.what()).find("group_size must be 32, 64 or 128, got " + std::to_string(g)),
          std::string::npos)
          << e.what();
    }
  }
  try {
    check_quant_spec({WeightFormat::kInt8, 64});
    ADD_FAILURE() << "int8 with a group size accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("group_size applies to int4 only"), std::string::npos)
        << e.what();
  }
  EXPECT_NO_THROW(check_quant_spec({WeightFormat::kInt8, 0}));
  EXPECT_NO_THROW(check_quant_spec({WeightFormat::kBf16, 0}));
  std::vector<float> rows(8 * 16, 0.1f);
  rows[5 * 8 + 3] = NAN;
  std::vector<uint8_t> q(quant_q_bytes({WeightFormat::kInt8, 0}, 8, 16));
  std::vector<float> s(quant_scale_count({WeightFormat::kInt8, 0}, 8, 16));
  try {
    quantize_pack(rows.data(), SrcType::kF32, 8, 8, 16, {WeightFormat::kInt8, 0}, q.data(),
                  s.data(), "down_proj of expert 3");
    ADD_FAILURE() << "NaN weight accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(
                  "down_proj of expert 3 has a non-finite value at row 5, column 3"),
              std::string::npos)
        << e.what();
  }
}

TEST(QuantFormats, BytesPerOperand) {
  // [K=2048, N=768]: int8 = 1 byte + 4/K per weight, int4 = 0.5 byte + 4/G.
  const int64_t K = 2048, N = 768;
  EXPECT_EQ(quant_q_bytes({WeightFormat::kInt8, 0}, K, N), K * N);
  EXPECT_EQ(quant_scale_count({WeightFormat::kInt8, 0}, K, N), N);
  EXPECT_EQ(quant_q_bytes({WeightFormat::kInt4, 64}, K, N), K * N / 2);
  EXPECT_EQ(quant_scale_count({WeightFormat::kInt4, 64}, K, N), N * K / 64);
}

}  // namespace
}  // namespace moetune::kernels
