// The AVX-512 F/BW unit's W^T repack (csrc/kernels/transpose_avx512.cc, on
// transpose_impl.h's block walk) on any CPU: that file is compiled here a
// second time, into namespace avx512_emu, with its AVX-512 intrinsics taken
// from SIMDe (Debian libsimde-dev, installed by scripts/test.sh). Checked bit
// for bit against the scalar oracle's repack: whole blocks, edge blocks,
// unaligned ranges, odd K and N. The real instructions are checked on
// AVX-512 hardware by test_kernels_gemm.cc (skipped elsewhere). Without
// SIMDe this test says so and skips.
#include <gtest/gtest.h>
#include <immintrin.h>  // before SIMDe: its native aliases must not rename the compiler's own headers

#include <cstdint>
#include <string>
#include <vector>

#include "kernel_test_support.h"
#include "kernels/gemm_impl.h"

#if __has_include(<simde/x86/avx512.h>)
#define MOETUNE_HAVE_SIMDE 1
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include "kernels/isa_unit.h"
#undef MOETUNE_ISA_UNIT
#define MOETUNE_ISA_UNIT(unit) static_assert(true, "emulated")
// The file's own namespace, redirected (no clash with the library's real unit).
#define avx512 avx512_emu
#include "../../../csrc/kernels/transpose_avx512.cc"
#undef avx512
#endif

namespace moetune::kernel_test {
namespace {

TEST(Avx512TransposeEmulated, BitIdenticalToTheScalarOracle) {
#ifndef MOETUNE_HAVE_SIMDE
  GTEST_SKIP() << "SIMDe (Debian libsimde-dev) not installed: scripts/test.sh installs it";
#else
  // {K, N, n_begin, n_end} of src [K, N]; the repack yields columns [n_begin, n_end) of src^T.
  const int64_t shapes[][4] = {{64, 48, 0, 64},  {256, 96, 96, 160}, {33, 31, 16, 33},
                               {34, 17, 0, 34},  {40, 16, 5, 37},    {255, 7, 32, 255},
                               {64, 64, 16, 16}, {100, 64, 32, 65},  {2048, 48, 0, 768}};
  for (const auto& sh : shapes) {
    const int64_t K = sh[0], N = sh[1], nb = sh[2], ne = sh[3];
    SCOPED_TRACE("K=" + std::to_string(K) + " N=" + std::to_string(N) + " [" + std::to_string(nb) +
                 "," + std::to_string(ne) + ")");
    Gen g(K * 7 + N, Dist::kUniform);
    std::vector<bf16> B(static_cast<size_t>(K * N));
    for (auto& v : B) v = g.bits16();
    std::vector<bf16> pk(static_cast<size_t>(mk::packed_elems(K, N)));
    mk::pack_b(B.data(), mk::SrcType::kBf16, N, true, K, 0, N, 1.0f, pk.data());
    const mk::PackedB src{pk.data(), K, N};
    std::vector<bf16> want(static_cast<size_t>(mk::packed_elems(N, ne - nb)), kDstGarbage);
    std::vector<bf16> got(want);
    mk::scalar::pack_b_transposed(src, nb, ne, want.data());
    mk::avx512_emu::pack_b_transposed(src, nb, ne, got.data());
    for (size_t e = 0; e < want.size(); ++e) ASSERT_EQ(got[e], want[e]) << "element " << e;
  }
#endif
}

}  // namespace
}  // namespace moetune::kernel_test
