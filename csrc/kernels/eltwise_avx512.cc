// AVX-512 element-wise epilogues, one set for the avx512, avx512_bf16 and amx
// ISAs: bf16 rounding with integer ops (avx512_round.h; bit-identical to the
// scalar f32_to_bf16, denormals included), a polynomial exp for the sigmoid.
// Compiled with its ISA's flags only (isa_table.def).
#include <immintrin.h>

#include "avx512_round.h"
#include "eltwise_impl.h"
#include "isa_unit.h"

MOETUNE_ISA_UNIT(avx512);

namespace moetune::kernels::avx512 {
namespace {

inline __m512 widen(const bf16* p, __mmask16 m) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline __m512 round_bf16(__m512 v) {  // value after a round trip through bf16
  return _mm512_castsi512_ps(_mm512_slli_epi32(rne_bf16_lo(v), 16));
}
inline void store_bf16(bf16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, cvt_bf16(v));
}

// exp(x) as eltwise_impl.h defines it; vscalefps applies 2^n with one rounding.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-kExpClamp)), _mm512_set1_ps(kExpClamp));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (size_t c = 1; c < sizeof(kExpPoly) / sizeof(kExpPoly[0]); ++c)
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[c]));
  return _mm512_scalef_ps(p, n);
}
inline __m512 sigmoid_ps(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}
inline __mmask16 tail(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
}

}  // namespace

void to_bf16(const float* src, float scale, bf16* dst, int64_t n) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail(n - i);
    store_bf16(dst + i, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, src + i)), m);
  }
}

void swiglu(const bf16* g, const bf16* u, bf16* h, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail(n - i);
    const __m512 gv = widen(g + i, m), uv = widen(u + i, m);
    store_bf16(h + i, _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid_ps(gv)), uv), m);
  }
}

float swiglu_bwd(const bf16* g, const bf16* u, const float* d, float w, bf16* h, bf16* dg, bf16* du,
                 int64_t n) {
  __m512 dot = _mm512_setzero_ps();
  const __m512 wv = _mm512_set1_ps(w), one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail(n - i);
    const __m512 gv = widen(g + i, m), uv = widen(u + i, m);
    const __m512 dv = _mm512_maskz_loadu_ps(m, d + i);
    const __m512 sg = sigmoid_ps(gv);
    const __m512 silu = _mm512_mul_ps(gv, sg);
    const __m512 hv = round_bf16(_mm512_mul_ps(silu, uv));
    store_bf16(h + i, hv, m);
    dot = _mm512_fmadd_ps(dv, hv, dot);  // masked lanes are 0
    const __m512 dh = _mm512_mul_ps(wv, dv);
    const __m512 dsilu = _mm512_mul_ps(sg, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, sg), one));
    store_bf16(dg + i, _mm512_mul_ps(_mm512_mul_ps(dh, uv), dsilu), m);
    store_bf16(du + i, _mm512_mul_ps(dh, silu), m);
  }
  return _mm512_reduce_add_ps(dot);
}

// min/max operand order: vminps/vmaxps return the second operand when either
// is NaN, so the data goes second and a NaN input propagates (torch.clamp).
void clamped_swiglu(const bf16* g, const bf16* u, float alpha, float limit, bf16* h, int64_t n) {
  const __m512 lim = _mm512_set1_ps(limit), nlim = _mm512_set1_ps(-limit);
  const __m512 av = _mm512_set1_ps(alpha), one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail(n - i);
    const __m512 gc = _mm512_min_ps(lim, widen(g + i, m));
    const __m512 uc = _mm512_max_ps(nlim, _mm512_min_ps(lim, widen(u + i, m)));
    const __m512 glu = _mm512_mul_ps(gc, sigmoid_ps(_mm512_mul_ps(av, gc)));
    store_bf16(h + i, _mm512_mul_ps(_mm512_add_ps(uc, one), glu), m);
  }
}

float clamped_swiglu_bwd(const bf16* g, const bf16* u, const float* d, float w, float alpha,
                         float limit, bf16* h, bf16* dg, bf16* du, int64_t n) {
  __m512 dot = _mm512_setzero_ps();
  const __m512 lim = _mm512_set1_ps(limit), nlim = _mm512_set1_ps(-limit);
  const __m512 av = _mm512_set1_ps(alpha), one = _mm512_set1_ps(1.0f);
  const __m512 wv = _mm512_set1_ps(w);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail(n - i);
    const __m512 gv = widen(g + i, m), uv = widen(u + i, m);
    const __m512 dv = _mm512_maskz_loadu_ps(m, d + i);
    const __m512 gc = _mm512_min_ps(lim, gv);
    const __m512 uc = _mm512_max_ps(nlim, _mm512_min_ps(lim, uv));
    const __m512 sa = sigmoid_ps(_mm512_mul_ps(av, gc));
    const __m512 glu = _mm512_mul_ps(gc, sa);
    const __m512 up1 = _mm512_add_ps(uc, one);
    const __m512 hv = round_bf16(_mm512_mul_ps(up1, glu));
    store_bf16(h + i, hv, m);
    dot = _mm512_fmadd_ps(dv, hv, dot);  // masked lanes are 0
    const __m512 dh = _mm512_mul_ps(wv, dv);
    // torch.clamp's subgradient: 1 on the closed interval, 0 outside (ordered
    // compares: 0 for NaN).
    const __mmask16 g_in = _mm512_cmp_ps_mask(gv, lim, _CMP_LE_OQ);
    const __mmask16 u_in =
        _mm512_cmp_ps_mask(uv, lim, _CMP_LE_OQ) & _mm512_cmp_ps_mask(uv, nlim, _CMP_GE_OQ);
    const __m512 dglu =
        _mm512_mul_ps(sa, _mm512_fmadd_ps(_mm512_mul_ps(av, gc), _mm512_sub_ps(one, sa), one));
    store_bf16(dg + i, _mm512_maskz_mov_ps(g_in, _mm512_mul_ps(_mm512_mul_ps(dh, up1), dglu)), m);
    store_bf16(du + i, _mm512_maskz_mov_ps(u_in, _mm512_mul_ps(dh, glu)), m);
  }
  return _mm512_reduce_add_ps(dot);
}

}  // namespace moetune::kernels::avx512
