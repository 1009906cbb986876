// The AMX kernel's blocking logic (csrc/kernels/gemm_amx.cc) on any CPU: that
// file is compiled here a second time, into namespace amx_emu, with the tile
// instructions emulated in plain C++ (a tile = 16 rows x 64 bytes; tdpbf16ps
// = per C element, its fp32 value plus the 32 bf16 products of its A row and
// B column in K order) and its AVX-512 helpers (the dequant, the AVX512-BF16
// kernel that takes K tails) replaced by the scalar units' (the same values
// and contracts). What it checks is everything but the instructions: the K
// cursor over segments and K blocks, row / column blocks and tails, the C
// staging, the fused quantized path's per-K-block dequantization into its
// staging buffer (layout, lazy first-pass fill, tails, K < 32) — the fused
// GEMM must equal the emulated bf16 kernel on the oracle's dequantized panel
// bit for bit, and both the double-precision product within the fp32
// summation bound. The real instructions are checked on AMX hardware by
// test_kernels_quant_gemm.cc / test_kernels_gemm.cc (skipped elsewhere).
#include <gtest/gtest.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernel_test_support.h"
#include "kernels/gemm.h"
#include "kernels/gemm_impl.h"
#include "kernels/isa_unit.h"
#include "kernels/quant.h"
#include "kernels/quant_impl.h"

namespace moetune::kernels::amx_emu_tiles {

struct Tile {
  alignas(64) uint8_t d[16][64];
};
inline Tile t[8];

inline void loadd(int i, const void* base, long stride) {
  for (int r = 0; r < 16; ++r)
    std::memcpy(t[i].d[r], static_cast<const char*>(base) + r * stride, 64);
}
inline void stored(int i, void* base, long stride) {
  for (int r = 0; r < 16; ++r) std::memcpy(static_cast<char*>(base) + r * stride, t[i].d[r], 64);
}
inline void zero(int i) { std::memset(t[i].d, 0, sizeof(t[i].d)); }
// C (16 x 16 fp32) += A (16 rows x 32 bf16) * B (16 K pairs x 16 columns x 2 bf16).
inline void dpbf16ps(int c, int a, int b) {
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 16; ++n) {
      float acc;
      std::memcpy(&acc, &t[c].d[m][4 * n], 4);
      for (int kk = 0; kk < 16; ++kk) {
        for (int j = 0; j < 2; ++j) {
          bf16 av, bv;
          std::memcpy(&av, &t[a].d[m][(2 * kk + j) * 2], 2);
          std::memcpy(&bv, &t[b].d[kk][(2 * n + j) * 2], 2);
          acc += bf16_to_f32(av) * bf16_to_f32(bv);
        }
      }
      std::memcpy(&t[c].d[m][4 * n], &acc, 4);
    }
  }
}

}  // namespace moetune::kernels::amx_emu_tiles

#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#define _tile_loadconfig(cfg) ((void)(cfg))
#define _tile_release() ((void)0)
#define _tile_loadd(i, base, stride) ::moetune::kernels::amx_emu_tiles::loadd(i, base, stride)
#define _tile_stored(i, base, stride) ::moetune::kernels::amx_emu_tiles::stored(i, base, stride)
#define _tile_zero(i) ::moetune::kernels::amx_emu_tiles::zero(i)
#define _tile_dpbf16ps(c, a, b) ::moetune::kernels::amx_emu_tiles::dpbf16ps(c, a, b)
#undef MOETUNE_ISA_UNIT
#define MOETUNE_ISA_UNIT(unit) static_assert(true, "emulated")

namespace moetune::kernels::amx_emu {
using amx::kColBlock;
}
// The file's own namespaces, redirected: amx -> amx_emu (no clash with the
// library's real kernel), its AVX-512 helpers -> the scalar unit.
#define amx amx_emu
#define avx512 scalar
#define avx512bf16 scalar
#include "../../../csrc/kernels/gemm_amx.cc"
#undef amx
#undef avx512
#undef avx512bf16

namespace moetune::kernels {
namespace {

std::vector<bf16> a_operand(int64_t rows, int64_t K, int64_t ld, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<bf16> a(size_t(rows * ld), 0);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t k = 0; k < K; ++k) a[m * ld + k] = f32_to_bf16(d(g));
  return a;
}

TEST(AmxKernelEmulated, FusedQuantizedEqualsBf16KernelOnTheDequantizedPanel) {
  const QuantSpec specs[] = {{WeightFormat::kInt8, 0},
                             {WeightFormat::kInt4, 32},
                             {WeightFormat::kFp8Block, 0},
                             {WeightFormat::kMxfp4, 0}};
  // (M, K, N, n_begin, extra ranks): several 192-row blocks and a 16-row
  // tail; K over 2 K blocks with a 12-row tail; K = 31 (pad row in the main
  // part); K = 20 (no main part); 300 columns cross the 256-column block.
  struct Shape {
    int64_t M, K, N, n0;
    std::vector<int64_t> ranks;
  };
  const Shape shapes[] = {{400, 524, 48, 0, {16}},   {17, 64, 300, 16, {}},   {33, 31, 40, 0, {40}},
                          {5, 20, 36, 16, {16, 40}}, {200, 96, 270, 0, {40}}, {1, 256, 16, 0, {}}};
  std::mt19937_64 g(3);
  std::normal_distribution<float> d(0.0f, 0.02f);
  for (const QuantSpec& spec : specs) {
    for (const Shape& sh : shapes) {
      const int64_t M = sh.M, K = sh.K, N = sh.N, n0 = sh.n0, w = N - n0;
      std::vector<float> rows(size_t(K * N));
      for (float& v : rows) v = d(g);
      std::vector<uint8_t> qb(quant_q_bytes(spec, K, N)), sb(quant_scale_bytes(spec, K, N));
      quantize_pack(rows.data(), SrcType::kF32, K, K, N, spec, qb.data(), sb.data(), "w");
      const QuantB B{spec, qb.data(), sb.data(), K, N};
      const int64_t lda = packed_kp(K) + 4;
      const std::vector<bf16> A = a_operand(M, K, lda, 5 + M + K);
      std::vector<std::vector<bf16>> ea, eb;
      std::vector<Segment> extra;
      for (size_t s = 0; s < sh.ranks.size(); ++s) {
        const int64_t r = sh.ranks[s];
        ea.push_back(a_operand(M, r, packed_kp(r), 50 + s));
        std::vector<float> wr(size_t(r * N));
        for (float& v : wr) v = d(g);
        eb.emplace_back(packed_elems(r, N));
        pack_b(wr.data(), SrcType::kF32, N, /*kn=*/true, r, 0, N, 1.0f, eb.back().data());
      }
      for (size_t s = 0; s < sh.ranks.size(); ++s)
        extra.push_back(
            Segment{ea[s].data(), packed_kp(sh.ranks[s]), PackedB{eb[s].data(), sh.ranks[s], N}});
      std::vector<bf16> panel(packed_elems(K, w));
      scalar::dequant(B, n0, N, 0, K, panel.data());
      std::vector<Segment> ref{Segment{A.data(), lda, PackedB{panel.data(), K, w}}};
      for (const Segment& e : extra) ref.push_back(Segment{e.A, e.lda, packed_slice(e.B, n0, w)});
      const int64_t ldc = N + 3;
      const float poison = kernel_test::float_of(kernel_test::kPoisonBits);
      std::vector<float> want(size_t(M * ldc), poison), got(size_t(M * ldc), poison);
      amx_emu::gemm(M, 0, w, ref.data(), int(ref.size()), want.data() + n0, ldc, false);
      amx_emu::quant_gemm(M, n0, N, A.data(), lda, B, extra.data(), int(extra.size()), got.data(),
                          ldc);
      const std::string what = std::string(weight_format_name(spec.format)) +
                               " M=" + std::to_string(M) + " K=" + std::to_string(K) +
                               " N=" + std::to_string(N) + " n0=" + std::to_string(n0) +
                               " extras=" + std::to_string(extra.size());
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = 0; n < ldc; ++n) {
          const float gv = got[m * ldc + n];
          if (n < n0 || n >= N) {
            ASSERT_EQ(kernel_test::bits_of(gv), kernel_test::kPoisonBits)
                << what << " (" << m << "," << n << ")";
            continue;
          }
          ASSERT_EQ(kernel_test::bits_of(gv), kernel_test::bits_of(want[m * ldc + n]))
              << what << " (" << m << "," << n << ")";
          double exact = 0.0, abs_sum = 0.0;
          int64_t terms = K;
          for (int64_t k = 0; k < K; ++k) {
            const double t =
                double(bf16_to_f32(A[m * lda + k])) *
                double(bf16_to_f32(ref[0].B.panel(
                    (n - n0) / kPanelN)[(k / 2) * 2 * kPanelN + ((n - n0) % kPanelN) * 2 + k % 2]));
            exact += t;
            abs_sum += std::fabs(t);
          }
          for (const Segment& e : extra) {
            terms += e.B.K;
            for (int64_t k = 0; k < e.B.K; ++k) {
              const double t =
                  double(bf16_to_f32(e.A[m * e.lda + k])) *
                  double(bf16_to_f32(
                      e.B.panel(n / kPanelN)[(k / 2) * 2 * kPanelN + (n % kPanelN) * 2 + k % 2]));
              exact += t;
              abs_sum += std::fabs(t);
            }
          }
          ASSERT_LE(std::fabs(double(gv) - exact), kernel_test::tolerance(abs_sum, terms))
              << what << " (" << m << "," << n << ")";
        }
      }
    }
  }
}

}  // namespace
}  // namespace moetune::kernels
