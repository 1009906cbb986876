// AVX2 dequant: as the AVX-512 one (dequant_avx512.cc) in two 8-column
// halves; fp32 -> bf16 by the integer round-to-nearest-even of f32_to_bf16
// (no NaN can occur: weights are checked finite at quantization).
// Compiled with its ISA's flags only (isa_table.def).
#include <immintrin.h>

#include <algorithm>

#include "isa_unit.h"
#include "quant_impl.h"

MOETUNE_ISA_UNIT(avx2);

namespace moetune::kernels::avx2 {
namespace {

inline __m256i rne_bf16(__m256 f) {  // bf16 bits in the low half of each lane
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb),
                           16);
}

}  // namespace

void dequant(const QuantB& src, int64_t n_begin, int64_t n_end, int64_t k0, int64_t k1, bf16* dst) {
  const int64_t Nd = n_end - n_begin, Kd = k1 - k0, kpd = packed_kp(Kd);
  const bool int8 = src.spec.format == WeightFormat::kInt8;
  const int64_t G = int8 ? 0 : src.spec.group_size;
  const int64_t rb = quant_row_bytes(src.spec.format);
  const __m256i nib = _mm256_set1_epi32(0x0f), eight = _mm256_set1_epi32(8);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t qd = 0; qd < packed_panels(Nd); ++qd) {
    const int64_t p = n_begin / kPanelN + qd;
    const int64_t valid = std::min<int64_t>({kPanelN, n_end - p * kPanelN, src.N - p * kPanelN});
    const uint8_t* pq = src.panel_q(p);
    const float* ps = src.panel_scales(p);
    bf16* dp = dst + qd * kpd * kPanelN;
    for (int64_t kd = 0; kd < kpd; kd += 2) {
      const int64_t k = k0 + kd;
      bf16* out = dp + (kd / 2) * 2 * kPanelN;
      if (!(k < src.K && kd < Kd)) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_setzero_si256());
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), _mm256_setzero_si256());
        continue;
      }
      const bool odd_pad = kd + 1 >= Kd || k + 1 >= src.K;
      const uint8_t* row = pq + (k / 2) * rb;
      const float* s = ps + (G ? k / G : 0) * kPanelN;
      for (int h = 0; h < 2; ++h) {
        __m256i e, o;
        if (int8) {
          e = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * h)));
          o = _mm256_cvtepi8_epi32(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 16 + 8 * h)));
        } else {
          const __m256i v =
              _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * h)));
          e = _mm256_sub_epi32(_mm256_and_si256(v, nib), eight);
          o = _mm256_sub_epi32(_mm256_srli_epi32(v, 4), eight);
        }
        const __m256 sv = _mm256_loadu_ps(s + 8 * h);
        const __m256i be = rne_bf16(_mm256_mul_ps(_mm256_cvtepi32_ps(e), sv));
        __m256i bo = rne_bf16(_mm256_mul_ps(_mm256_cvtepi32_ps(o), sv));
        if (odd_pad) bo = _mm256_setzero_si256();
        __m256i pairs = _mm256_or_si256(be, _mm256_slli_epi32(bo, 16));
        // Columns past n_end / N: zero.
        const __m256i keep =
            _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid - 8 * h)), lane);
        pairs = _mm256_and_si256(pairs, keep);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * h), pairs);
      }
    }
  }
}

}  // namespace moetune::kernels::avx2
