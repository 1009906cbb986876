// AVX2+FMA kernel for CPUs without AVX512-BF16 (older Xeons, most desktop
// parts): bf16 is widened to fp32 by shifts (a bf16 is the top half of an
// fp32), then FMA. One packed panel row (16 columns x a K pair) is two 256-bit
// loads giving 8 columns of the even and odd K each.
// Compiled with its ISA's flags only (isa_table.def).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "gemm_impl.h"
#include "isa_unit.h"

MOETUNE_ISA_UNIT(avx2);

namespace moetune::kernels::avx2 {
namespace {

constexpr int kMr = 4;

template <int MR>
void micro(const Segment* segs, int nseg, int64_t m0, int64_t p, float* C, int64_t ldc, int64_t c0,
           int valid, bool accumulate) {
  __m256 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int s = 0; s < nseg; ++s) {
    const Segment& sg = segs[s];
    const int64_t kp2 = sg.B.kp() / 2;
    const bf16* bp = sg.B.panel(p);
    const bf16* ap = sg.A + m0 * sg.lda;
    for (int64_t kk = 0; kk < kp2; ++kk) {
      const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + kk * 32));
      const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + kk * 32 + 16));
      const __m256 b0e = _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16));
      const __m256 b0o = _mm256_castsi256_ps(_mm256_and_si256(lo, hi_mask));
      const __m256 b1e = _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16));
      const __m256 b1o = _mm256_castsi256_ps(_mm256_and_si256(hi, hi_mask));
      for (int i = 0; i < MR; ++i) {
        uint32_t pair;
        std::memcpy(&pair, ap + i * sg.lda + 2 * kk, 4);
        const __m256 ae = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(pair << 16)));
        const __m256 ao =
            _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(pair & 0xffff0000u)));
        acc[i][0] = _mm256_fmadd_ps(ae, b0e, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(ae, b1e, acc[i][1]);
        acc[i][0] = _mm256_fmadd_ps(ao, b0o, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(ao, b1o, acc[i][1]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* cp = C + (m0 + i) * ldc + c0;
    if (valid == kPanelN) {
      for (int h = 0; h < 2; ++h) {
        __m256 v = acc[i][h];
        if (accumulate) v = _mm256_add_ps(v, _mm256_loadu_ps(cp + 8 * h));
        _mm256_storeu_ps(cp + 8 * h, v);
      }
    } else {
      alignas(32) float tmp[kPanelN];
      _mm256_store_ps(tmp, acc[i][0]);
      _mm256_store_ps(tmp + 8, acc[i][1]);
      for (int c = 0; c < valid; ++c) cp[c] = accumulate ? cp[c] + tmp[c] : tmp[c];
    }
  }
}

using MicroFn = void (*)(const Segment*, int, int64_t, int64_t, float*, int64_t, int64_t, int,
                         bool);
constexpr MicroFn kTable[kMr + 1] = {nullptr, &micro<1>, &micro<2>, &micro<3>, &micro<4>};

}  // namespace

void gemm(int64_t M, int64_t n_begin, int64_t n_end, const Segment* segs, int nseg, float* C,
          int64_t ldc, bool accumulate) {
  for (int64_t p = n_begin / kPanelN; p * kPanelN < n_end; ++p) {
    const int64_t c0 = p * kPanelN;
    const int valid = static_cast<int>(std::min<int64_t>(kPanelN, n_end - c0));
    for (int64_t m = 0; m < M; m += kMr) {
      const int mr = static_cast<int>(std::min<int64_t>(kMr, M - m));
      kTable[mr](segs, nseg, m, p, C, ldc, c0, valid, accumulate);
    }
  }
}

}  // namespace moetune::kernels::avx2
