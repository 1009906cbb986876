// AVX2 dequant: as the AVX-512 one (dequant_avx512.cc) in two 8-column
// halves; fp32 -> bf16 by the integer round-to-nearest-even of f32_to_bf16
// (no NaN can occur: weights are checked finite at quantization, published
// codes and scales when repacked). Codes decode exactly as minifloat.h:
// e4m3 normals by moving the bits into fp32's fields (exponent rebias + 120),
// subnormals as m * 2^-9; e2m1 magnitudes from an 8-entry permute table;
// e8m0 scales as exponent bits (code 0: the fp32 subnormal 2^-127).
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

namespace {

// fp32 values of 8 codes (int32 lanes, zero-extended bytes / nibbles).
inline __m256 e4m3_ps(__m256i c) {
  const __m256i mag = _mm256_and_si256(c, _mm256_set1_epi32(0x7f));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x80)), 24);
  const __m256 normal = _mm256_castsi256_ps(
      _mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_set1_epi32(120 << 23)));
  const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(mag), _mm256_set1_ps(1.0f / 512.0f));
  const __m256 is_sub = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), mag));
  return _mm256_or_ps(_mm256_blendv_ps(normal, sub, is_sub), _mm256_castsi256_ps(sign));
}
inline __m256 e2m1_ps(__m256i c) {
  const __m256 mag = _mm256_permutevar8x32_ps(
      _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f), c);  // uses bits 0..2
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(8)), 28);
  return _mm256_or_ps(mag, _mm256_castsi256_ps(sign));
}
inline __m256 e8m0_ps(__m256i s) {
  const __m256i bits = _mm256_slli_epi32(s, 23);
  const __m256i zero = _mm256_cmpeq_epi32(s, _mm256_setzero_si256());
  return _mm256_castsi256_ps(_mm256_blendv_epi8(bits, _mm256_set1_epi32(0x00400000), zero));
}
inline __m256i load8_u8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

}  // namespace

void dequant(const QuantB& src, int64_t n_begin, int64_t n_end, int64_t k0, int64_t k1, bf16* dst) {
  const WeightFormat f = src.spec.format;
  const int64_t Nd = n_end - n_begin, Kd = k1 - k0, kpd = packed_kp(Kd);
  const int64_t G = quant_group_k(src.spec, src.K);
  const int64_t rb = quant_row_bytes(f);
  const bool per_col = quant_scale_cols(f) == kPanelN;
  const __m256i nib = _mm256_set1_epi32(0x0f), eight = _mm256_set1_epi32(8);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t qd = 0; qd < packed_panels(Nd); ++qd) {
    const int64_t p = n_begin / kPanelN + qd;
    const int64_t valid = std::min<int64_t>({kPanelN, n_end - p * kPanelN, src.N - p * kPanelN});
    const uint8_t* pq = src.panel_q(p);
    const uint8_t* ps = src.panel_scale_bytes(p);
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
      const int64_t g = k / G;
      for (int h = 0; h < 2; ++h) {
        __m256 ev, ov, sv;
        switch (f) {
          case WeightFormat::kInt8:
            ev = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * h))));
            ov = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 16 + 8 * h))));
            break;
          case WeightFormat::kFp8Block:
            ev = e4m3_ps(load8_u8(row + 8 * h));
            ov = e4m3_ps(load8_u8(row + 16 + 8 * h));
            break;
          case WeightFormat::kMxfp4: {
            const __m256i v = load8_u8(row + 8 * h);
            ev = e2m1_ps(_mm256_and_si256(v, nib));
            ov = e2m1_ps(_mm256_srli_epi32(v, 4));
            break;
          }
          default: {  // int4
            const __m256i v = load8_u8(row + 8 * h);
            ev = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v, nib), eight));
            ov = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v, 4), eight));
            break;
          }
        }
        if (f == WeightFormat::kMxfp4) {
          sv = e8m0_ps(load8_u8(ps + g * kPanelN + 8 * h));
        } else if (per_col) {
          sv = _mm256_loadu_ps(reinterpret_cast<const float*>(ps) + g * kPanelN + 8 * h);
        } else {
          sv = _mm256_set1_ps(reinterpret_cast<const float*>(ps)[g]);
        }
        const __m256i be = rne_bf16(_mm256_mul_ps(ev, sv));
        __m256i bo = rne_bf16(_mm256_mul_ps(ov, sv));
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
