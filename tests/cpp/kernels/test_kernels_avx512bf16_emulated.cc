// The AVX512-BF16 dequant unit (csrc/kernels/dequant_avx512bf16.cc) on any
// CPU: that file is compiled here a second time, into namespace
// avx512bf16_emu, with its AVX-512 intrinsics taken from SIMDe (portable
// implementations; Debian libsimde-dev, installed by scripts/test.sh) and the
// few SIMDe lacks written below in plain C++ from Intel's pseudo-code —
// vcvtne2ps2bf16 included with its denormals-are-zero input and flush-to-zero
// output, so a group the fast path takes wrongly (a product that turns
// denormal) shows up as a mismatch. What it checks: the fast / exact path
// choice per group, every format's decode, the in-register transposes of
// dequant_t, edges and tails, bit for bit against the scalar oracle, with
// crafted codes (every byte) and scales at the edges. The real instructions
// are checked on AVX512-BF16 hardware by test_kernels_quant.cc (skipped
// elsewhere). Without SIMDe this test says so and skips.
#include <gtest/gtest.h>
#include <immintrin.h>  // before SIMDe: its native aliases must not rename the compiler's own headers

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/kernel_bundle.h"
#include "kernels/quant.h"
#include "quant_test_support.h"

#if __has_include(<simde/x86/avx512.h>)
#define MOETUNE_HAVE_SIMDE 1
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

namespace moetune::kernels::avx512bf16_shim {

// vcvtne2ps2bf16 (Intel SDM): RNE, denormal inputs as zero, denormal
// results flushed to zero, NaN quieted.
inline uint16_t cvtne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  uint16_t r = uint16_t(u >> 16);
  if ((r & 0x7f80) == 0) r &= 0x8000;
  return r;
}
inline simde__m512i cvtne2ps_pbh(simde__m512 a, simde__m512 b) {
  float fa[16], fb[16];
  uint16_t w[32];
  simde_mm512_storeu_ps(fa, a);
  simde_mm512_storeu_ps(fb, b);
  for (int i = 0; i < 16; ++i) {
    w[i] = cvtne(fb[i]);
    w[16 + i] = cvtne(fa[i]);
  }
  return simde_mm512_loadu_si512(w);
}
inline simde__m512 cvtph_ps(simde__m256i h) {  // exact, subnormals included
  uint16_t w[16];
  float f[16];
  std::memcpy(w, &h, 32);
  for (int i = 0; i < 16; ++i) {
    const int e = (w[i] >> 10) & 31, m = w[i] & 1023;
    const float v = e == 0 ? std::ldexp(float(m), -24) : std::ldexp(float(1024 + m), e - 25);
    f[i] = (w[i] >> 15) ? -v : v;
  }
  return simde_mm512_loadu_ps(f);
}
inline simde__m512 cvtepi32_ps(simde__m512i a) {
  int32_t v[16];
  float f[16];
  simde_mm512_storeu_si512(v, a);
  for (int i = 0; i < 16; ++i) f[i] = float(v[i]);
  return simde_mm512_loadu_ps(f);
}
template <typename T>
inline simde__m512i widen16(__m128i a) {
  T b[16];
  int32_t v[16];
  std::memcpy(b, &a, 16);
  for (int i = 0; i < 16; ++i) v[i] = b[i];
  return simde_mm512_loadu_si512(v);
}
inline __m256i cvtepi32_epi16(simde__m512i a) {
  int32_t v[16];
  int16_t w[16];
  simde_mm512_storeu_si512(v, a);
  for (int i = 0; i < 16; ++i) w[i] = int16_t(v[i]);
  __m256i r;
  std::memcpy(&r, w, 32);
  return r;
}

}  // namespace moetune::kernels::avx512bf16_shim

#define __m512bh simde__m512i
#undef _mm512_cvtne2ps_pbh
#define _mm512_cvtne2ps_pbh(a, b) ::moetune::kernels::avx512bf16_shim::cvtne2ps_pbh(a, b)
#undef _mm512_cvtph_ps
#define _mm512_cvtph_ps(h) ::moetune::kernels::avx512bf16_shim::cvtph_ps(h)
#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps(a) ::moetune::kernels::avx512bf16_shim::cvtepi32_ps(a)
#undef _mm512_cvtepi8_epi32
#define _mm512_cvtepi8_epi32(a) ::moetune::kernels::avx512bf16_shim::widen16<int8_t>(a)
#undef _mm512_cvtepu8_epi32
#define _mm512_cvtepu8_epi32(a) ::moetune::kernels::avx512bf16_shim::widen16<uint8_t>(a)
#undef _mm512_cvtepi32_epi16
#define _mm512_cvtepi32_epi16(a) ::moetune::kernels::avx512bf16_shim::cvtepi32_epi16(a)

#include "kernels/isa_unit.h"
#undef MOETUNE_ISA_UNIT
#define MOETUNE_ISA_UNIT(unit) static_assert(true, "emulated")
// The file's own namespaces, redirected (no clash with the library's real units).
#define avx512bf16 avx512bf16_emu
#define avx512 avx512_emu
#include "../../../csrc/kernels/dequant_avx512bf16.cc"
#undef avx512bf16
#undef avx512
#endif

namespace moetune::kernels {
namespace {

TEST(Avx512Bf16DequantEmulated, BitIdenticalToTheScalarOracle) {
#ifndef MOETUNE_HAVE_SIMDE
  GTEST_SKIP() << "SIMDe (Debian libsimde-dev) not installed: scripts/test.sh installs it";
#else
  const QuantSpec specs[] = {{WeightFormat::kInt8, 0},
                             {WeightFormat::kInt4, 32},
                             {WeightFormat::kInt4, 128},
                             {WeightFormat::kFp8Block, 0},
                             {WeightFormat::kMxfp4, 0}};
  const int64_t shapes[][2] = {{128, 32}, {33, 17}, {200, 40}, {1, 1},    {130, 5}, {64, 16},
                               {258, 33}, {7, 48},  {96, 64},  {512, 48}, {256, 64}};
  const KernelBundle& oracle = kernels_for(Isa::kScalar);
  for (const QuantSpec& sp : specs) {
    for (const auto& sh : shapes) {
      for (int variant = 0; variant < 3; ++variant) {
        const int64_t K = sh[0], N = sh[1];
        const kernel_test::Crafted c =
            kernel_test::craft(sp, K, N, variant, uint64_t(K * 1000 + N + variant));
        const QuantB qb = c.view(sp, K, N);
        const std::string what = std::string(weight_format_name(sp.format)) + " g" +
                                 std::to_string(sp.group_size) + " K=" + std::to_string(K) +
                                 " N=" + std::to_string(N) + " variant " + std::to_string(variant);
        const int64_t nr[][2] = {{0, N}, {N > 16 ? 16 : 0, N}, {0, N > 3 ? N - 3 : 1}};
        const int64_t kr[][2] = {
            {0, K}, {K > 2 ? 2 : 0, K}, {0, K > 1 ? K - 1 : K}, {K > 16 ? 16 : 0, K}};
        for (const auto& r : kr) {
          for (const auto& cr : nr) {
            const size_t elems = packed_elems(r[1] - r[0], cr[1] - cr[0]);
            std::vector<bf16> want(elems, 0xFFFF), got(elems, 0xFFFF);
            oracle.dequant(qb, cr[0], cr[1], r[0], r[1], want.data());
            avx512bf16_emu::dequant(qb, cr[0], cr[1], r[0], r[1], got.data());
            for (size_t e = 0; e < elems; ++e)
              ASSERT_EQ(got[e], want[e])
                  << "dequant " << what << " rows [" << r[0] << "," << r[1] << ") cols [" << cr[0]
                  << "," << cr[1] << ") element " << e;
          }
          const std::vector<bf16> want = kernel_test::dequant_t_reference(qb, r[0], r[1]);
          std::vector<bf16> got(want.size(), 0xFFFF);
          avx512bf16_emu::dequant_t(qb, r[0], r[1], got.data());
          for (size_t e = 0; e < want.size(); ++e)
            ASSERT_EQ(got[e], want[e])
                << "dequant_t " << what << " rows [" << r[0] << "," << r[1] << ") element " << e;
        }
      }
    }
  }
#endif
}

}  // namespace
}  // namespace moetune::kernels
