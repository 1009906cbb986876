// The quantized-weight GEMM paths of the kernel bundles (kernel_bundle.h):
//  - dequant_chunk_cols: the panels path's slice width per bundle and K;
//  - the fused quantized GEMM (QuantGemmFn, quant.h; AMX only): bit-identical
//    to its contract's reference, the scalar dequant oracle's bf16 panel run
//    through the same bundle's bf16 GEMM, for every format, M below / at /
//    past the 16- and 32-row tiles and the 192-row block, K with and without
//    a tail (and K < 32: no AMX main part), column ranges crossing the
//    256-column block and starting past 0, and 0 / 1 / 2 extra bf16 segments
//    (LoRA expands: r < 32 all tail, r = 40 main part + tail). Also within
//    the fp32 summation bound of a double-precision product of the same
//    dequantized values, and no write outside its columns. Skips (cleanly,
//    saying why) on a CPU without AMX: the lead runs it on the AMX machine.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernel_test_support.h"
#include "kernels/gemm.h"
#include "kernels/kernel_bundle.h"
#include "kernels/quant.h"

namespace moetune::kernels {
namespace {

using kernel_test::bits_of;
using kernel_test::kPoisonBits;

TEST(DequantChunk, WidestL2FittingMultipleOf16WithinTheBundleBounds) {
  // AMX: 1 MiB of bf16 panel, up to its 256-column block.
  const KernelBundle& amx = kernels_for(Isa::kAmxBf16);
  EXPECT_EQ(dequant_chunk_cols(amx, 768), 256);
  EXPECT_EQ(dequant_chunk_cols(amx, 2048), 256);                 // 2048 * 2 * 256 = 1 MiB exactly
  EXPECT_EQ(dequant_chunk_cols(amx, 2880), 176);                 // 1 MiB / 5760 = 182 -> 176
  EXPECT_EQ(dequant_chunk_cols(amx, 7168), 64);                  // 73 -> 64
  EXPECT_EQ(dequant_chunk_cols(amx, 1 << 20), kMinDequantCols);  // never below the minimum
  EXPECT_EQ(dequant_chunk_cols(amx, 2047), 256);                 // K padded to even
  // The one-or-two-panel kernels: the narrowest, whatever K.
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16})
    for (int64_t K : {1, 768, 2048, 7168})
      EXPECT_EQ(dequant_chunk_cols(kernels_for(isa), K), kMinDequantCols) << isa_name(isa) << K;
  // Every width is a multiple of the panel width.
  for (int64_t K = 1; K < 20000; K += 97) EXPECT_EQ(dequant_chunk_cols(amx, K) % kPanelN, 0) << K;
}

TEST(QuantGemm, OnlyTheAmxBundleHasAFusedKernel) {
  for (const IsaInfo& i : kIsas)
    EXPECT_EQ(kernels_for(i.id).quant_gemm != nullptr, i.id == Isa::kAmxBf16) << i.name;
}

struct Spec {
  const char* name;
  QuantSpec q;
};
const Spec kSpecs[] = {{"int8", {WeightFormat::kInt8, 0}},
                       {"int4_g32", {WeightFormat::kInt4, 32}},
                       {"int4_g128", {WeightFormat::kInt4, 128}},
                       {"fp8_block", {WeightFormat::kFp8Block, 0}},
                       {"mxfp4", {WeightFormat::kMxfp4, 0}}};

// A bf16 operand row-major [rows, ld] with values ~ N(0, 1) (ld >= packed_kp
// of the K it is used with; the pad column K, if odd, zero).
std::vector<bf16> a_operand(int64_t rows, int64_t K, int64_t ld, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<bf16> a(size_t(rows * ld), 0);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t k = 0; k < K; ++k) a[m * ld + k] = f32_to_bf16(d(g));
  return a;
}

class QuantGemmPerIsa : public kernel_test::PerIsa {};

TEST_P(QuantGemmPerIsa, FusedEqualsDequantizedPanelThroughTheBf16Gemm) {
  const KernelBundle& kb = kernels();
  if (!kb.quant_gemm) GTEST_SKIP() << isa_name(isa()) << " has no fused quantized GEMM";
  const DequantFn oracle = kernels_for(Isa::kScalar).dequant;
  // (K, N): tails of 12 and 1 K rows; K < 32 (no main part) and K = 31
  // (a main part past K: the pad row); 270 columns cross the 256-column block.
  const int64_t shapes[][2] = {{64, 48}, {300, 270}, {33, 17}, {20, 40}, {31, 36}, {512, 32}};
  const int64_t Ms[] = {1, 16, 17, 40, 200};
  const int64_t ranks[] = {0, 16, 40};  // extra segments: none, all tail, main + tail
  std::mt19937_64 g(7);
  std::normal_distribution<float> d(0.0f, 0.02f);
  for (const Spec& sp : kSpecs) {
    for (const auto& sh : shapes) {
      const int64_t K = sh[0], N = sh[1];
      std::vector<float> rows(size_t(K * N));  // HF [N, K]
      for (float& v : rows) v = d(g);
      std::vector<uint8_t> qb(quant_q_bytes(sp.q, K, N));
      std::vector<uint8_t> sb(quant_scale_bytes(sp.q, K, N));
      quantize_pack(rows.data(), SrcType::kF32, K, K, N, sp.q, qb.data(), sb.data(), "w");
      const QuantB B{sp.q, qb.data(), sb.data(), K, N};
      for (const int64_t M : Ms) {
        const int64_t lda = packed_kp(K) + 6;
        const std::vector<bf16> A = a_operand(M, K, lda, 11 + M + K);
        for (const int64_t r : ranks) {
          // Up to two extra segments of rank r ([M, r] x packed [r, N]).
          const int nextra = r == 0 ? 0 : (r == 40 ? 2 : 1);
          std::vector<std::vector<bf16>> ea, eb;
          Segment extra[2];
          for (int s = 0; s < nextra; ++s) {
            ea.push_back(a_operand(M, r, packed_kp(r), 100 + s + r));
            std::vector<float> w(size_t(r * N));
            for (float& v : w) v = d(g);
            eb.emplace_back(packed_elems(r, N));
            pack_b(w.data(), SrcType::kF32, N, /*kn=*/true, r, 0, N, 1.0f, eb.back().data());
            extra[s] = Segment{ea.back().data(), packed_kp(r), PackedB{eb.back().data(), r, N}};
          }
          const int64_t nbs[] = {0, N > 16 ? 16 : 0};
          for (const int64_t n0 : nbs) {
            const int64_t n1 = N, w = n1 - n0;
            const std::string what = std::string(sp.name) + " K=" + std::to_string(K) +
                                     " N=" + std::to_string(N) + " M=" + std::to_string(M) +
                                     " r=" + std::to_string(r) + " cols [" + std::to_string(n0) +
                                     "," + std::to_string(n1) + ")";
            // Reference: the oracle's panel of the columns, the bundle's bf16 GEMM.
            std::vector<bf16> panel(packed_elems(K, w));
            oracle(B, n0, n1, 0, K, panel.data());
            Segment ref_segs[3];
            ref_segs[0] = Segment{A.data(), lda, PackedB{panel.data(), K, w}};
            for (int s = 0; s < nextra; ++s)
              ref_segs[s + 1] = Segment{extra[s].A, extra[s].lda, packed_slice(extra[s].B, n0, w)};
            const int64_t ldc = N + 5;
            const float poison = kernel_test::float_of(kPoisonBits);
            std::vector<float> want(size_t(M * ldc), poison), got(size_t(M * ldc), poison);
            kb.gemm(M, 0, w, ref_segs, 1 + nextra, want.data() + n0, ldc, false);
            kb.quant_gemm(M, n0, n1, A.data(), lda, B, extra, nextra, got.data(), ldc);
            for (int64_t m = 0; m < M; ++m) {
              for (int64_t n = 0; n < ldc; ++n) {
                const float gv = got[m * ldc + n];
                if (n < n0 || n >= n1) {
                  ASSERT_EQ(bits_of(gv), kPoisonBits)
                      << what << " wrote outside at " << m << "," << n;
                  continue;
                }
                ASSERT_EQ(bits_of(gv), bits_of(want[m * ldc + n]))
                    << what << " element (" << m << "," << n << ")";
                // And the value itself: the double product of the same bf16 values.
                double exact = 0.0, abs_sum = 0.0;
                for (int64_t k = 0; k < K; ++k) {
                  const double t =
                      double(bf16_to_f32(A[m * lda + k])) *
                      double(bf16_to_f32(
                          panel[(n - n0) / kPanelN * packed_kp(K) * kPanelN +
                                (k / 2) * 2 * kPanelN + ((n - n0) % kPanelN) * 2 + k % 2]));
                  exact += t;
                  abs_sum += std::fabs(t);
                }
                for (int s = 0; s < nextra; ++s) {
                  for (int64_t k = 0; k < r; ++k) {
                    const PackedB& eB = extra[s].B;
                    const double t =
                        double(bf16_to_f32(extra[s].A[m * extra[s].lda + k])) *
                        double(bf16_to_f32(eB.panel(
                            n / kPanelN)[(k / 2) * 2 * kPanelN + (n % kPanelN) * 2 + k % 2]));
                    exact += t;
                    abs_sum += std::fabs(t);
                  }
                }
                ASSERT_LE(std::fabs(double(gv) - exact),
                          kernel_test::tolerance(abs_sum, K + nextra * r))
                    << what << " element (" << m << "," << n << ")";
              }
            }
          }
        }
      }
    }
  }
}

MOETUNE_INSTANTIATE_PER_ISA(QuantGemmPerIsa);

}  // namespace
}  // namespace moetune::kernels
