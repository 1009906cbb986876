// AVX512-BF16 dequant (the avx512_bf16 and amx_bf16 bundles; the AMX fused
// kernel feeds its tiles with it too). Same values as every other ISA's
// (bit-identical to the scalar oracle); what differs is the cost per weight,
// which is what a memory-bound (few tokens per expert) quantized layer pays:
//   - codes decode to exact fp32 values (int8 / int4: integers; e2m1: a
//     16-entry permute table; e4m3: moved into fp16 fields and widened by
//     vcvtph2ps, exact for subnormals and independent of MXCSR, its 2^-8
//     folded into the group's scale), times the group's scale in fp32 (the
//     oracle's one rounding);
//   - fp32 -> bf16 by vcvtne2ps2bf16 (one instruction for 32 values, RNE)
//     instead of the integer rounding sequence. That instruction treats
//     denormal inputs as zero and flushes denormal results, so it is used
//     only for a group whose 16 column scales are 0 or in [2^-117, 2^100]:
//     then every product is 0 or normal (the smallest nonzero code value is
//     2^-9, e4m3's subnormal) and finite-or-overflowing exactly as the oracle's;
//     other groups (denormal or huge scales; e8m0 codes below 10) take the
//     integer rounding of avx512_round.h. No NaN can occur: codes and scales
//     are checked finite when stored (quant.cc, quant_published.cc).
// The backward's W^T slices come from dequant_t: 16 K x 16 N blocks decoded
// as above, transposed in registers (three vpermt2ps stages) and converted
// once, instead of dequantizing into a panel and repacking it.
// Compiled with its ISA's flags only (isa_table.def).
#include <immintrin.h>

#include <algorithm>

#include "avx512_round.h"
#include "isa_unit.h"
#include "quant_impl.h"

MOETUNE_ISA_UNIT(avx512bf16);

namespace moetune::kernels::avx512bf16 {
namespace {

// The fp32 values of one packed row (16 columns x a K pair): the even K in
// e, the odd K in o, column c in lane c. For fp8_block the values are
// e4m3 / 256 (exact), the group scale carrying the 256 (Scales below).
template <WeightFormat F>
MOETUNE_INLINE void row_values(const uint8_t* row, __m512& e, __m512& o) {
  if constexpr (F == WeightFormat::kInt8) {
    e = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row))));
    o = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16))));
  } else if constexpr (F == WeightFormat::kFp8Block) {
    // Sign-extended to 16 bits then << 7: bit 15 the sign, bits 13..7 the
    // magnitude (exponent in the fp16 exponent field, mantissa on top of
    // the fp16 mantissa); bit 14 (a sign copy) cleared. fp16 value = e4m3 / 256.
    const __m512i w =
        _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)));
    const __m512i h =
        _mm512_and_si512(_mm512_slli_epi16(w, 7), _mm512_set1_epi16(static_cast<short>(0xbf80)));
    e = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    o = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
  } else {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
    const __m512i lo = _mm512_and_si512(v, _mm512_set1_epi32(0x0f)), hi = _mm512_srli_epi32(v, 4);
    if constexpr (F == WeightFormat::kMxfp4) {
      const __m512 lut = _mm512_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f, -0.0f,
                                        -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f);
      e = _mm512_permutexvar_ps(lo, lut);
      o = _mm512_permutexvar_ps(hi, lut);
    } else {  // int4: nibble - 8
      const __m512i eight = _mm512_set1_epi32(8);
      e = _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, eight));
      o = _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, eight));
    }
  }
}

// The 16 column scales of group g of a panel as fp32 (`exact`; `s` is
// exact x 256 for fp8_block, see row_values), and whether vcvtne2ps2bf16 is
// exact for them (header). Off the fast path fp8_block's values are scaled
// back by 256 (exact) and multiplied by `exact`: 256 x a huge scale could
// overflow.
struct GroupScale {
  __m512 s, exact;
  bool fast;
};
template <WeightFormat F>
MOETUNE_INLINE GroupScale group_scale(const uint8_t* ps, int64_t g) {
  __m512 s;
  if constexpr (F == WeightFormat::kMxfp4) {
    const __m512i c =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ps + g * kPanelN)));
    const __mmask16 zero = _mm512_cmpeq_epi32_mask(c, _mm512_setzero_si512());
    s = _mm512_castsi512_ps(
        _mm512_mask_mov_epi32(_mm512_slli_epi32(c, 23), zero, _mm512_set1_epi32(0x00400000)));
  } else if constexpr (F == WeightFormat::kFp8Block) {
    s = _mm512_set1_ps(reinterpret_cast<const float*>(ps)[g]);
  } else {
    s = _mm512_loadu_ps(reinterpret_cast<const float*>(ps) + g * kPanelN);
  }
  const __m512 a = _mm512_abs_ps(s);
  const __mmask16 ok = _mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_EQ_OQ) |
                       (_mm512_cmp_ps_mask(a, _mm512_set1_ps(0x1p-117f), _CMP_GE_OQ) &
                        _mm512_cmp_ps_mask(a, _mm512_set1_ps(0x1p100f), _CMP_LE_OQ));
  const __m512 exact = s;
  if constexpr (F == WeightFormat::kFp8Block) s = _mm512_mul_ps(s, _mm512_set1_ps(256.0f));
  return GroupScale{s, exact, ok == 0xffff};
}

// One packed row's 32 bf16 in the pair layout (lane c: even K low, odd K
// high) from the scaled values.
MOETUNE_INLINE __m512i pairs_fast(__m512 e, __m512 o) {
  const __m512i inter =
      _mm512_setr_epi32(0x00100000, 0x00110001, 0x00120002, 0x00130003, 0x00140004, 0x00150005,
                        0x00160006, 0x00170007, 0x00180008, 0x00190009, 0x001a000a, 0x001b000b,
                        0x001c000c, 0x001d000d, 0x001e000e,
                        0x001f000f);             // word 2c + b <- word c + 16 b
  const __m512bh b = _mm512_cvtne2ps_pbh(o, e);  // words 0..15: e, 16..31: o
  return _mm512_permutexvar_epi16(inter, reinterpret_cast<const __m512i&>(b));
}
MOETUNE_INLINE __m512i pairs_exact(__m512 e, __m512 o) {
  return _mm512_or_si512(avx512::rne_bf16_lo(e), _mm512_slli_epi32(avx512::rne_bf16_lo(o), 16));
}

template <WeightFormat F>
void dequant_impl(const QuantB& src, int64_t n_begin, int64_t n_end, int64_t k0, int64_t k1,
                  bf16* dst) {
  const int64_t Nd = n_end - n_begin, Kd = k1 - k0, kpd = packed_kp(Kd);
  const int64_t G = quant_group_k(src.spec, src.K);
  constexpr int64_t rb = weight_format_info(F).code_bits == 8 ? 32 : 16;
  // Rows both in [k0, k1) and in K (whole K pairs); the last row may be a
  // pair whose odd half is past one of them.
  const int64_t k_end = std::min(k1, src.K);
  for (int64_t qd = 0; qd < packed_panels(Nd); ++qd) {
    const int64_t p = n_begin / kPanelN + qd;
    const int64_t valid = std::min<int64_t>({kPanelN, n_end - p * kPanelN, src.N - p * kPanelN});
    const __mmask16 cols = static_cast<__mmask16>(
        valid >= kPanelN ? 0xffffu : (1u << std::max<int64_t>(valid, 0)) - 1u);
    const uint8_t* pq = src.panel_q(p);
    const uint8_t* ps = src.panel_scale_bytes(p);
    bf16* dp = dst + qd * kpd * kPanelN;
    int64_t cur_g = -1;
    GroupScale gs{_mm512_setzero_ps(), _mm512_setzero_ps(), false};
    int64_t kd = 0;
    for (; kd < kpd && k0 + kd < k_end; kd += 2) {
      const int64_t k = k0 + kd;
      const int64_t g = k / G;
      if (g != cur_g) {
        cur_g = g;
        gs = group_scale<F>(ps, g);
      }
      __m512 e, o;
      row_values<F>(pq + (k / 2) * rb, e, o);
      __m512i out;
      if (gs.fast) {
        out = pairs_fast(_mm512_mul_ps(e, gs.s), _mm512_mul_ps(o, gs.s));
      } else {
        if constexpr (F == WeightFormat::kFp8Block) {
          e = _mm512_mul_ps(e, _mm512_set1_ps(256.0f));
          o = _mm512_mul_ps(o, _mm512_set1_ps(256.0f));
        }
        out = pairs_exact(_mm512_mul_ps(e, gs.exact), _mm512_mul_ps(o, gs.exact));
      }
      if (k + 1 >= k_end)
        out = _mm512_and_si512(out, _mm512_set1_epi32(0xffff));  // odd half past K / k1
      _mm512_storeu_si512(dp + (kd / 2) * 2 * kPanelN, _mm512_maskz_mov_epi32(cols, out));
    }
    for (; kd < kpd; kd += 2)
      _mm512_storeu_si512(dp + (kd / 2) * 2 * kPanelN, _mm512_setzero_si512());
  }
}

// ---- dequant_t ----

// Lane index vectors of one transpose stage that exchanges lane bit y with
// the bit telling the two registers apart (a: 0, b: 1): a' takes the
// elements whose lane bit y is 0, b' those with 1, each at its old lane with
// bit y replaced by the register bit (permutex2var: index 16+ reads b).
template <int y>
MOETUNE_INLINE void stage(__m512& a, __m512& b) {
  alignas(64) static constexpr int lo_idx[16] = {
#define MOETUNE_IDX(l) ((l) & ~(1 << y)) + (((l) >> y) & 1) * 16
      MOETUNE_IDX(0),  MOETUNE_IDX(1),  MOETUNE_IDX(2),  MOETUNE_IDX(3),
      MOETUNE_IDX(4),  MOETUNE_IDX(5),  MOETUNE_IDX(6),  MOETUNE_IDX(7),
      MOETUNE_IDX(8),  MOETUNE_IDX(9),  MOETUNE_IDX(10), MOETUNE_IDX(11),
      MOETUNE_IDX(12), MOETUNE_IDX(13), MOETUNE_IDX(14), MOETUNE_IDX(15)};
#undef MOETUNE_IDX
  alignas(64) static constexpr int hi_idx[16] = {
#define MOETUNE_IDX(l) ((l) | (1 << y)) + (((l) >> y) & 1) * 16
      MOETUNE_IDX(0),  MOETUNE_IDX(1),  MOETUNE_IDX(2),  MOETUNE_IDX(3),
      MOETUNE_IDX(4),  MOETUNE_IDX(5),  MOETUNE_IDX(6),  MOETUNE_IDX(7),
      MOETUNE_IDX(8),  MOETUNE_IDX(9),  MOETUNE_IDX(10), MOETUNE_IDX(11),
      MOETUNE_IDX(12), MOETUNE_IDX(13), MOETUNE_IDX(14), MOETUNE_IDX(15)};
#undef MOETUNE_IDX
  const __m512i il = _mm512_load_si512(lo_idx), ih = _mm512_load_si512(hi_idx);
  const __m512 na = _mm512_permutex2var_ps(a, il, b);
  b = _mm512_permutex2var_ps(a, ih, b);
  a = na;
}

template <WeightFormat F>
void dequant_t_impl(const QuantB& src, int64_t k0, int64_t k1, bf16* dst) {
  constexpr int64_t rb = weight_format_info(F).code_bits == 8 ? 32 : 16;
  dequant_t_blocks(src, k0, k1, dst,
                   [](const uint8_t* pq, const uint8_t* ps, int64_t kb, int64_t g, bf16* rows) {
                     const GroupScale gs = group_scale<F>(ps, g);
                     if (!gs.fast) return false;
                     // x[k]: row K = kb + k, lane n (the 16 columns of the panel), scaled.
                     __m512 x[16];  // all in registers: every loop below unrolls
#pragma GCC unroll 8
                     for (int r = 0; r < 8; ++r) {
                       row_values<F>(pq + (kb / 2 + r) * rb, x[2 * r], x[2 * r + 1]);
                       x[2 * r] = _mm512_mul_ps(x[2 * r], gs.s);
                       x[2 * r + 1] = _mm512_mul_ps(x[2 * r + 1], gs.s);
                     }
    // Register index bits (k3 k2 k1 k0), lane bits (n3 n2 n1 n0) ->
    // register (k3 n3 n2 n1), lane (k2 k1 k0 n0): swap k2 <-> n3, k1 <->
    // n2, k0 <-> n1 (register bit 2 with lane bit 3, 1 with 2, 0 with 1).
#pragma GCC unroll 16
                     for (int i = 0; i < 16; ++i)
                       if (!(i & 4)) stage<3>(x[i], x[i + 4]);
#pragma GCC unroll 16
                     for (int i = 0; i < 16; ++i)
                       if (!(i & 2)) stage<2>(x[i], x[i + 2]);
#pragma GCC unroll 16
                     for (int i = 0; i < 16; ++i)
                       if (!(i & 1)) stage<1>(x[i], x[i + 1]);
    // x[8h + r]: W^T rows n = 2r, 2r+1 (of this panel) x K = kb + 8h + (0..7),
    // lane 2j + b = (K kb + 8h + j, n = 2r + b): with h = 0 low, h = 1 high,
    // one packed output row.
#pragma GCC unroll 8
                     for (int r = 0; r < 8; ++r) {
                       const __m512bh b = _mm512_cvtne2ps_pbh(x[8 + r], x[r]);
                       _mm512_storeu_si512(rows + r * 2 * kPanelN,
                                           reinterpret_cast<const __m512i&>(b));
                     }
                     return true;
                   });
}

}  // namespace

void dequant(const QuantB& src, int64_t n_begin, int64_t n_end, int64_t k0, int64_t k1, bf16* dst) {
  with_quant_format(src.spec.format, [&](auto f) {
    dequant_impl<decltype(f)::value>(src, n_begin, n_end, k0, k1, dst);
  });
}

void dequant_t(const QuantB& src, int64_t k0, int64_t k1, bf16* dst) {
  with_quant_format(src.spec.format,
                    [&](auto f) { dequant_t_impl<decltype(f)::value>(src, k0, k1, dst); });
}

}  // namespace moetune::kernels::avx512bf16
