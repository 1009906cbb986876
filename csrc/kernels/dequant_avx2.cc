// AVX2 dequant: one packed row of a panel (16 columns x a K pair) per step,
// as the AVX-512 one (dequant_avx512.cc) in two 8-column halves. The scales
// of a row's group are decoded once per group, not per row. Codes decode
// exactly as minifloat.h: e4m3 16 at a time through F16C (the code's
// magnitude bits moved into the fp16 fields, where every e4m3 value,
// subnormals included, is its fp16 value x 2^8; vcvtph2ps is exact and
// ignores DAZ; x 256 is exact), e2m1 magnitudes from an 8-entry permute
// table, e8m0 scales as exponent bits (code 0: the fp32 subnormal 2^-127).
// Products in fp32 (the oracle's one rounding), then fp32 -> bf16 by the
// integer round-to-nearest-even of f32_to_bf16, the even K landing in the
// low and the odd K in the high half of each lane. No NaN can occur:
// weights are checked finite at quantization, published codes and scales
// when repacked (quant_published.cc), and e4m3 0x7f / 0xff decode to +-480
// as the oracle does. dequant_t (the backward's W^T slices) decodes 16 K x
// 16 N blocks the same way and transposes them as four 8 x 8 fp32 blocks in
// registers before rounding, instead of dequantizing a panel and repacking
// it with the scalar unit's transpose. Compiled with its ISA's flags only
// (isa_table.def).
#include <immintrin.h>

#include <algorithm>

#include "isa_unit.h"
#include "quant_impl.h"

MOETUNE_ISA_UNIT(avx2);

namespace moetune::kernels::avx2 {
namespace {

// Lanes of bf16 pairs: RNE(even) in the low, RNE(odd) in the high 16 bits.
inline __m256i rne_pairs(__m256 even, __m256 odd) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
  const __m256i ue = _mm256_castps_si256(even), uo = _mm256_castps_si256(odd);
  const __m256i re =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(ue, bias),
                                         _mm256_and_si256(_mm256_srli_epi32(ue, 16), one)),
                        16);
  const __m256i ro =
      _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(uo, bias),
                                        _mm256_and_si256(_mm256_srli_epi32(uo, 16), one)),
                       _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
  return _mm256_or_si256(re, ro);
}

// fp32 values of 16 e4m3 codes: columns 0..7 in lo, 8..15 in hi.
inline void e4m3_x16(const uint8_t* p, __m256& lo, __m256& hi) {
  // Sign-extended to 16 bits: bit 15 is the sign, bits 0..6 the magnitude.
  const __m256i c = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i h =
      _mm256_or_si256(_mm256_and_si256(c, _mm256_set1_epi16(static_cast<int16_t>(0x8000))),
                      _mm256_and_si256(_mm256_slli_epi16(c, 7), _mm256_set1_epi16(0x3f80)));
  const __m256 k256 = _mm256_set1_ps(256.0f);
  lo = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), k256);
  hi = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), k256);
}
inline __m256 e2m1_ps(__m256i c) {  // c: int32 lanes of nibbles (sign in bit 3)
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
inline __m256 load8_i8_ps(const uint8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// The fp32 values of one packed row (16 columns x a K pair): e0 / e1 the
// even K of columns 0-7 / 8-15, o0 / o1 the odd K.
template <WeightFormat F>
inline void row_values(const uint8_t* row, __m256& e0, __m256& e1, __m256& o0, __m256& o1) {
  const __m256i nib = _mm256_set1_epi32(0x0f), eight = _mm256_set1_epi32(8);
  if constexpr (F == WeightFormat::kInt8) {
    e0 = load8_i8_ps(row);
    e1 = load8_i8_ps(row + 8);
    o0 = load8_i8_ps(row + 16);
    o1 = load8_i8_ps(row + 24);
  } else if constexpr (F == WeightFormat::kFp8Block) {
    e4m3_x16(row, e0, e1);
    e4m3_x16(row + 16, o0, o1);
  } else if constexpr (F == WeightFormat::kMxfp4) {
    const __m256i v0 = load8_u8(row), v1 = load8_u8(row + 8);
    e0 = e2m1_ps(_mm256_and_si256(v0, nib));
    o0 = e2m1_ps(_mm256_srli_epi32(v0, 4));
    e1 = e2m1_ps(_mm256_and_si256(v1, nib));
    o1 = e2m1_ps(_mm256_srli_epi32(v1, 4));
  } else {  // int4
    const __m256i v0 = load8_u8(row), v1 = load8_u8(row + 8);
    e0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v0, nib), eight));
    o0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v0, 4), eight));
    e1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v1, nib), eight));
    o1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v1, 4), eight));
  }
}

// The scales of columns 0-7 / 8-15 of group g of a panel, as fp32.
template <WeightFormat F>
inline void group_scales(const uint8_t* ps, int64_t g, __m256& s0, __m256& s1) {
  if constexpr (F == WeightFormat::kMxfp4) {
    s0 = e8m0_ps(load8_u8(ps + g * kPanelN));
    s1 = e8m0_ps(load8_u8(ps + g * kPanelN + 8));
  } else if constexpr (F == WeightFormat::kFp8Block) {
    s0 = s1 = _mm256_set1_ps(reinterpret_cast<const float*>(ps)[g]);
  } else {
    s0 = _mm256_loadu_ps(reinterpret_cast<const float*>(ps) + g * kPanelN);
    s1 = _mm256_loadu_ps(reinterpret_cast<const float*>(ps) + g * kPanelN + 8);
  }
}

// In-register transpose of 8 x 8 fp32: r[i] lane j <- r[j] lane i.
inline void transpose8(__m256 (&r)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

template <WeightFormat F>
void dequant_t_impl(const QuantB& src, int64_t k0, int64_t k1, bf16* dst) {
  constexpr int64_t rb = weight_format_info(F).code_bits == 8 ? 32 : 16;
  dequant_t_blocks(
      src, k0, k1, dst,
      [](const uint8_t* pq, const uint8_t* ps, int64_t kb, int64_t g, bf16* rows) {
        __m256 s0, s1;
        group_scales<F>(ps, g, s0, s1);
        // Per half h (K = kb + 8h .. +7, rows 4h..4h+3): lo[i] / hi[i] hold
        // K = kb + 8h + i, columns 0-7 / 8-15, scaled; after the transposes
        // lo[c] / hi[c] hold column c / 8 + c, lanes K = kb + 8h + (0..7): the
        // half h of output rows (n pairs) 0-3 / 4-7.
        for (int h = 0; h < 2; ++h) {
          __m256 lo[8], hi[8];
          for (int r = 0; r < 4; ++r) {
            const int i = 2 * r;
            row_values<F>(pq + (kb / 2 + 4 * h + r) * rb, lo[i], hi[i], lo[i + 1], hi[i + 1]);
            lo[i] = _mm256_mul_ps(lo[i], s0);
            lo[i + 1] = _mm256_mul_ps(lo[i + 1], s0);
            hi[i] = _mm256_mul_ps(hi[i], s1);
            hi[i + 1] = _mm256_mul_ps(hi[i + 1], s1);
          }
          transpose8(lo);
          transpose8(hi);
          for (int r = 0; r < 8; ++r) {
            const __m256* cols = r < 4 ? lo : hi;
            const int c = 2 * (r % 4);
            bf16* out = rows + r * 2 * kPanelN + h * 2 * 8;
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), rne_pairs(cols[c], cols[c + 1]));
          }
        }
        return true;
      });
}

}  // namespace

void dequant_t(const QuantB& src, int64_t k0, int64_t k1, bf16* dst) {
  with_quant_format(src.spec.format,
                    [&](auto f) { dequant_t_impl<decltype(f)::value>(src, k0, k1, dst); });
}

namespace {

template <WeightFormat F>
void dequant_impl(const QuantB& src, int64_t n_begin, int64_t n_end, int64_t k0, int64_t k1,
                  bf16* dst) {
  const int64_t Nd = n_end - n_begin, Kd = k1 - k0, kpd = packed_kp(Kd);
  const int64_t G = quant_group_k(src.spec, src.K);
  constexpr int64_t rb = weight_format_info(F).code_bits == 8 ? 32 : 16;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i low16 = _mm256_set1_epi32(0xffff);
  for (int64_t qd = 0; qd < packed_panels(Nd); ++qd) {
    const int64_t p = n_begin / kPanelN + qd;
    const int64_t valid = std::min<int64_t>({kPanelN, n_end - p * kPanelN, src.N - p * kPanelN});
    // Columns past n_end / N: zero.
    const bool full = valid >= kPanelN;
    const __m256i keep0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid)), lane);
    const __m256i keep1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid - 8)), lane);
    const uint8_t* pq = src.panel_q(p);
    const uint8_t* ps = src.panel_scale_bytes(p);
    bf16* dp = dst + qd * kpd * kPanelN;
    int64_t cur_g = -1;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();  // scales of columns 0-7, 8-15
    for (int64_t kd = 0; kd < kpd; kd += 2) {
      const int64_t k = k0 + kd;
      bf16* out = dp + (kd / 2) * 2 * kPanelN;
      if (!(k < src.K && kd < Kd)) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_setzero_si256());
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), _mm256_setzero_si256());
        continue;
      }
      const int64_t g = k / G;
      if (g != cur_g) {
        cur_g = g;
        group_scales<F>(ps, g, s0, s1);
      }
      __m256 e0, e1, o0, o1;  // even / odd K x columns 0-7 / 8-15
      row_values<F>(pq + (k / 2) * rb, e0, e1, o0, o1);
      __m256i lo = rne_pairs(_mm256_mul_ps(e0, s0), _mm256_mul_ps(o0, s0));
      __m256i hi = rne_pairs(_mm256_mul_ps(e1, s1), _mm256_mul_ps(o1, s1));
      if (kd + 1 >= Kd || k + 1 >= src.K) {  // the pad row of an odd K
        lo = _mm256_and_si256(lo, low16);
        hi = _mm256_and_si256(hi, low16);
      }
      if (!full) {
        lo = _mm256_and_si256(lo, keep0);
        hi = _mm256_and_si256(hi, keep1);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), lo);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), hi);
    }
  }
}

}  // namespace

void dequant(const QuantB& src, int64_t n_begin, int64_t n_end, int64_t k0, int64_t k1, bf16* dst) {
  with_quant_format(src.spec.format, [&](auto f) {
    dequant_impl<decltype(f)::value>(src, n_begin, n_end, k0, k1, dst);
  });
}

}  // namespace moetune::kernels::avx2
