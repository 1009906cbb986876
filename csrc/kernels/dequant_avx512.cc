// AVX-512 dequant (also what feeds AMX tiles): one packed row of a panel
// (16 columns x a K pair) per step. The even-K and odd-K halves are widened
// to 16 int32 lanes each (int8: sign-extend; int4: nibbles minus 8), scaled
// in fp32 by the 16 column scales of the row's group, rounded to bf16
// (RNE with integer ops, avx512_round.h: no BF16 instruction, so the avx512,
// avx512_bf16 and amx ISAs share this one) and interleaved into the pair
// layout with one shift + or. Bit-identical to the scalar oracle.
// Compiled with its ISA's flags only (isa_table.def).
#include <immintrin.h>

#include <algorithm>

#include "avx512_round.h"
#include "isa_unit.h"
#include "quant_impl.h"

MOETUNE_ISA_UNIT(avx512);

namespace moetune::kernels::avx512 {
namespace {

inline __m512i to_pairs(__m512 even, __m512 odd) {
  return _mm512_or_si512(rne_bf16_lo(even), _mm512_slli_epi32(rne_bf16_lo(odd), 16));
}

}  // namespace

void dequant(const QuantB& src, int64_t n_begin, int64_t n_end, int64_t k0, int64_t k1, bf16* dst) {
  const int64_t Nd = n_end - n_begin, Kd = k1 - k0, kpd = packed_kp(Kd);
  const bool int8 = src.spec.format == WeightFormat::kInt8;
  const int64_t G = int8 ? 0 : src.spec.group_size;
  const int64_t rb = quant_row_bytes(src.spec.format);
  const __m512i nib = _mm512_set1_epi32(0x0f), eight = _mm512_set1_epi32(8);
  for (int64_t qd = 0; qd < packed_panels(Nd); ++qd) {
    const int64_t p = n_begin / kPanelN + qd;
    const int64_t valid = std::min<int64_t>({kPanelN, n_end - p * kPanelN, src.N - p * kPanelN});
    const __mmask16 cols = static_cast<__mmask16>(
        valid >= kPanelN ? 0xffffu : (1u << std::max<int64_t>(valid, 0)) - 1u);
    const uint8_t* pq = src.panel_q(p);
    const float* ps = src.panel_scales(p);
    bf16* dp = dst + qd * kpd * kPanelN;
    for (int64_t kd = 0; kd < kpd; kd += 2) {
      const int64_t k = k0 + kd;
      __m512i out = _mm512_setzero_si512();
      if (k < src.K && kd < Kd) {
        const uint8_t* row = pq + (k / 2) * rb;
        __m512i e, o;
        if (int8) {
          e = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
          o = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16)));
        } else {
          const __m512i v =
              _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
          e = _mm512_sub_epi32(_mm512_and_si512(v, nib), eight);
          o = _mm512_sub_epi32(_mm512_srli_epi32(v, 4), eight);
        }
        const __m512 s = _mm512_loadu_ps(ps + (G ? k / G : 0) * kPanelN);
        out = to_pairs(_mm512_mul_ps(_mm512_cvtepi32_ps(e), s),
                       _mm512_mul_ps(_mm512_cvtepi32_ps(o), s));
        if (kd + 1 >= Kd || k + 1 >= src.K) out = _mm512_and_si512(out, _mm512_set1_epi32(0xffff));
        out = _mm512_maskz_mov_epi32(cols, out);
      }
      _mm512_storeu_si512(dp + (kd / 2) * 2 * kPanelN, out);
    }
  }
}

}  // namespace moetune::kernels::avx512
