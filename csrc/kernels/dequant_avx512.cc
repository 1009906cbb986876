// AVX-512 dequant (the avx512 bundle's; avx512_bf16 and amx_bf16 have their
// own, dequant_avx512bf16.cc, with the same values): one packed row of a panel
// (16 columns x a K pair) per step. The even-K and odd-K halves are widened
// to 16 int32 lanes each (int8: sign-extend; int4: nibbles minus 8), scaled
// in fp32 by the 16 column scales of the row's group, rounded to bf16
// (RNE with integer ops, avx512_round.h: no BF16 instruction) and interleaved into the pair
// layout with one shift + or. Bit-identical to the scalar oracle. fp8_block
// / mxfp4 codes and e8m0 scales decode as in dequant_avx2.cc (minifloat.h's
// values, exactly), e2m1 through a 16-entry permute table.
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

namespace {

inline __m512 e4m3_ps(__m512i c) {
  const __m512i mag = _mm512_and_si512(c, _mm512_set1_epi32(0x7f));
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(c, _mm512_set1_epi32(0x80)), 24);
  const __m512 normal = _mm512_castsi512_ps(
      _mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23)));
  const __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(1.0f / 512.0f));
  const __mmask16 is_sub = _mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(8));
  return _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_castps_si512(_mm512_mask_mov_ps(normal, is_sub, sub)), sign));
}
inline __m512 e2m1_ps(__m512i c) {  // c: nibbles 0..15 (sign in bit 3)
  const __m512 lut = _mm512_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f, -0.0f, -0.5f,
                                    -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f);
  return _mm512_permutexvar_ps(c, lut);
}
inline __m512 e8m0_ps(__m512i s) {
  const __m512i bits = _mm512_slli_epi32(s, 23);
  const __mmask16 zero = _mm512_cmpeq_epi32_mask(s, _mm512_setzero_si512());
  return _mm512_castsi512_ps(_mm512_mask_mov_epi32(bits, zero, _mm512_set1_epi32(0x00400000)));
}
inline __m512i load16_u8(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

}  // namespace

void dequant(const QuantB& src, int64_t n_begin, int64_t n_end, int64_t k0, int64_t k1, bf16* dst) {
  const WeightFormat f = src.spec.format;
  const int64_t Nd = n_end - n_begin, Kd = k1 - k0, kpd = packed_kp(Kd);
  const int64_t G = quant_group_k(src.spec, src.K);
  const int64_t rb = quant_row_bytes(f);
  const bool per_col = quant_scale_cols(f) == kPanelN;
  const __m512i nib = _mm512_set1_epi32(0x0f), eight = _mm512_set1_epi32(8);
  for (int64_t qd = 0; qd < packed_panels(Nd); ++qd) {
    const int64_t p = n_begin / kPanelN + qd;
    const int64_t valid = std::min<int64_t>({kPanelN, n_end - p * kPanelN, src.N - p * kPanelN});
    const __mmask16 cols = static_cast<__mmask16>(
        valid >= kPanelN ? 0xffffu : (1u << std::max<int64_t>(valid, 0)) - 1u);
    const uint8_t* pq = src.panel_q(p);
    const uint8_t* ps = src.panel_scale_bytes(p);
    bf16* dp = dst + qd * kpd * kPanelN;
    for (int64_t kd = 0; kd < kpd; kd += 2) {
      const int64_t k = k0 + kd;
      __m512i out = _mm512_setzero_si512();
      if (k < src.K && kd < Kd) {
        const uint8_t* row = pq + (k / 2) * rb;
        const int64_t g = k / G;
        __m512 e, o, s;
        switch (f) {
          case WeightFormat::kInt8:
            e = _mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row))));
            o = _mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16))));
            break;
          case WeightFormat::kFp8Block:
            e = e4m3_ps(load16_u8(row));
            o = e4m3_ps(load16_u8(row + 16));
            break;
          case WeightFormat::kMxfp4: {
            const __m512i v = load16_u8(row);
            e = e2m1_ps(_mm512_and_si512(v, nib));
            o = e2m1_ps(_mm512_srli_epi32(v, 4));
            break;
          }
          default: {  // int4
            const __m512i v = load16_u8(row);
            e = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, nib), eight));
            o = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(v, 4), eight));
            break;
          }
        }
        if (f == WeightFormat::kMxfp4) {
          s = e8m0_ps(load16_u8(ps + g * kPanelN));
        } else if (per_col) {
          s = _mm512_loadu_ps(reinterpret_cast<const float*>(ps) + g * kPanelN);
        } else {
          s = _mm512_set1_ps(reinterpret_cast<const float*>(ps)[g]);
        }
        out = to_pairs(_mm512_mul_ps(e, s), _mm512_mul_ps(o, s));
        if (kd + 1 >= Kd || k + 1 >= src.K) out = _mm512_and_si512(out, _mm512_set1_epi32(0xffff));
        out = _mm512_maskz_mov_epi32(cols, out);
      }
      _mm512_storeu_si512(dp + (kd / 2) * 2 * kPanelN, out);
    }
  }
}

}  // namespace moetune::kernels::avx512
