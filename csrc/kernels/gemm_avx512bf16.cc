// AVX512-BF16 kernel: vdpbf16ps consumes one packed panel row (16 columns x a
// K pair) per instruction against a broadcast pair of A. Register block: up to
// kMr rows x kNb panels of fp32 accumulators, all segments of the call summed
// in registers before one (masked) store, so a LoRA expand fused as a second
// segment costs no extra pass over C.
// Compiled with its ISA's flags only (isa_table.def).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "gemm_impl.h"
#include "isa_unit.h"

MOETUNE_ISA_UNIT(avx512bf16);

namespace moetune::kernels::avx512bf16 {
namespace {

constexpr int kMr = 8;
constexpr int kNb = 2;

inline __m512i bcast_pair(const bf16* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

template <int MR, int NB>
void micro(const Segment* segs, int nseg, int64_t m0, int64_t p0, float* C, int64_t ldc, int64_t c0,
           int valid_last, bool accumulate) {
  __m512 acc[MR][NB];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();

  for (int s = 0; s < nseg; ++s) {
    const Segment& sg = segs[s];
    const int64_t kp2 = sg.B.kp() / 2;
    const bf16* bp[NB];
    for (int j = 0; j < NB; ++j) bp[j] = sg.B.panel(p0 + j);
    const bf16* ap = sg.A + m0 * sg.lda;
    for (int64_t kk = 0; kk < kp2; ++kk) {
      __m512bh b[NB];
      for (int j = 0; j < NB; ++j) b[j] = (__m512bh)_mm512_loadu_si512(bp[j] + kk * 32);
      for (int i = 0; i < MR; ++i) {
        const __m512bh a = (__m512bh)bcast_pair(ap + i * sg.lda + 2 * kk);
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, b[j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* crow = C + (m0 + i) * ldc + c0;
    for (int j = 0; j < NB; ++j) {
      const __mmask16 mask =
          (j == NB - 1) ? static_cast<__mmask16>((1u << valid_last) - 1u) : __mmask16(0xffff);
      float* cp = crow + j * kPanelN;
      __m512 v = acc[i][j];
      if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, cp));
      _mm512_mask_storeu_ps(cp, mask, v);
    }
  }
}

using MicroFn = void (*)(const Segment*, int, int64_t, int64_t, float*, int64_t, int64_t, int,
                         bool);

template <int MR>
constexpr MicroFn pick(int nb) {
  return nb == 1 ? &micro<MR, 1> : &micro<MR, 2>;
}

MicroFn table(int mr, int nb) {
  switch (mr) {
    case 1:
      return pick<1>(nb);
    case 2:
      return pick<2>(nb);
    case 3:
      return pick<3>(nb);
    case 4:
      return pick<4>(nb);
    case 5:
      return pick<5>(nb);
    case 6:
      return pick<6>(nb);
    case 7:
      return pick<7>(nb);
    default:
      return pick<8>(nb);
  }
}

}  // namespace

void gemm(int64_t M, int64_t n_begin, int64_t n_end, const Segment* segs, int nseg, float* C,
          int64_t ldc, bool accumulate) {
  const int64_t p_begin = n_begin / kPanelN;
  const int64_t p_end = (n_end + kPanelN - 1) / kPanelN;
  for (int64_t p = p_begin; p < p_end; p += kNb) {
    const int nb = static_cast<int>(std::min<int64_t>(kNb, p_end - p));
    const int64_t c0 = p * kPanelN;
    const int valid_last =
        static_cast<int>(std::min<int64_t>(kPanelN, n_end - (p + nb - 1) * kPanelN));
    for (int64_t m = 0; m < M; m += kMr) {
      const int mr = static_cast<int>(std::min<int64_t>(kMr, M - m));
      table(mr, nb)(segs, nseg, m, p, C, ldc, c0, valid_last, accumulate);
    }
  }
}

}  // namespace moetune::kernels::avx512bf16
