// AVX2 element-wise epilogues (eltwise.h) for the avx2 bundle: 8 lanes per
// step, the same formulas and operation order as the AVX-512 set
// (eltwise_avx512.cc), bf16 rounding with integer ops (bit-identical to the
// scalar f32_to_bf16: denormals rounded, NaN quieted), a polynomial exp for
// the sigmoid. The last n % 8 elements run one step on a zero-padded copy,
// whose outputs are copied back (nothing past n is read or written).
// Compiled with its ISA's flags only (isa_table.def).
#include <immintrin.h>

#include <algorithm>

#include "eltwise_impl.h"
#include "isa_unit.h"

MOETUNE_ISA_UNIT(avx2);

namespace moetune::kernels::avx2 {
namespace {

constexpr int64_t kLanes = 8;

inline __m256 widen(const bf16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
// bf16 bits of each lane's rounded value in the low 16 bits (f32_to_bf16).
inline __m256i rne_bf16_lo(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i hi = _mm256_srli_epi32(u, 16);
  const __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(1)),
                                           _mm256_set1_epi32(0x7fff))),
      16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
}
inline __m256 round_bf16(__m256 v) {  // value after a round trip through bf16
  return _mm256_castsi256_ps(_mm256_slli_epi32(rne_bf16_lo(v), 16));
}
inline void store_bf16(bf16* p, __m256 v) {
  const __m256i r = rne_bf16_lo(v);  // lanes <= 0xffff: the unsigned pack is exact
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

// exp(x) as eltwise_impl.h defines it. 2^n (n in [-127, 127]) is applied as
// two normal powers of two, so p * 2^n rounds once, like the AVX-512 one's
// vscalefps.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-kExpClamp)), _mm256_set1_ps(kExpClamp));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (size_t c = 1; c < sizeof(kExpPoly) / sizeof(kExpPoly[0]); ++c)
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[c]));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, p1), p2);
}
inline __m256 sigmoid_ps(__m256 g) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}
inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// The last m < 8 elements of an input, zero-padded to a full step.
template <typename T>
struct Tail {
  T v[kLanes] = {};
  Tail(const T* p, int64_t m) { std::copy_n(p, m, v); }
};
// Runs step(offset) over the full steps of n; returns where the tail starts.
template <typename Step>
inline int64_t full_steps(int64_t n, Step&& step) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) step(i);
  return i;
}

// One step of each function on 8 elements at the given pointers.
inline void swiglu8(const bf16* g, const bf16* u, bf16* h) {
  const __m256 gv = widen(g), uv = widen(u);
  store_bf16(h, _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid_ps(gv)), uv));
}
inline __m256 swiglu_bwd8(const bf16* g, const bf16* u, const float* d, __m256 wv, bf16* h,
                          bf16* dg, bf16* du) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 gv = widen(g), uv = widen(u), dv = _mm256_loadu_ps(d);
  const __m256 sg = sigmoid_ps(gv);
  const __m256 silu = _mm256_mul_ps(gv, sg);
  const __m256 hv = round_bf16(_mm256_mul_ps(silu, uv));
  store_bf16(h, hv);
  const __m256 dh = _mm256_mul_ps(wv, dv);
  const __m256 dsilu = _mm256_mul_ps(sg, _mm256_fmadd_ps(gv, _mm256_sub_ps(one, sg), one));
  store_bf16(dg, _mm256_mul_ps(_mm256_mul_ps(dh, uv), dsilu));
  store_bf16(du, _mm256_mul_ps(dh, silu));
  return _mm256_mul_ps(dv, hv);
}
// min/max operand order: vminps/vmaxps return the second operand when either
// is NaN, so the data goes second and a NaN input propagates (torch.clamp).
struct Clamp {
  __m256 lim, nlim, alpha;
  Clamp(float limit, float a)
      : lim(_mm256_set1_ps(limit)), nlim(_mm256_set1_ps(-limit)), alpha(_mm256_set1_ps(a)) {}
};
inline void clamped8(const bf16* g, const bf16* u, const Clamp& c, bf16* h) {
  const __m256 gc = _mm256_min_ps(c.lim, widen(g));
  const __m256 uc = _mm256_max_ps(c.nlim, _mm256_min_ps(c.lim, widen(u)));
  const __m256 glu = _mm256_mul_ps(gc, sigmoid_ps(_mm256_mul_ps(c.alpha, gc)));
  store_bf16(h, _mm256_mul_ps(_mm256_add_ps(uc, _mm256_set1_ps(1.0f)), glu));
}
inline __m256 clamped_bwd8(const bf16* g, const bf16* u, const float* d, __m256 wv, const Clamp& c,
                           bf16* h, bf16* dg, bf16* du) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 gv = widen(g), uv = widen(u), dv = _mm256_loadu_ps(d);
  const __m256 gc = _mm256_min_ps(c.lim, gv);
  const __m256 uc = _mm256_max_ps(c.nlim, _mm256_min_ps(c.lim, uv));
  const __m256 sa = sigmoid_ps(_mm256_mul_ps(c.alpha, gc));
  const __m256 glu = _mm256_mul_ps(gc, sa);
  const __m256 up1 = _mm256_add_ps(uc, one);
  const __m256 hv = round_bf16(_mm256_mul_ps(up1, glu));
  store_bf16(h, hv);
  const __m256 dh = _mm256_mul_ps(wv, dv);
  // torch.clamp's subgradient: 1 on the closed interval, 0 outside (ordered
  // compares: 0 for NaN).
  const __m256 g_in = _mm256_cmp_ps(gv, c.lim, _CMP_LE_OQ);
  const __m256 u_in =
      _mm256_and_ps(_mm256_cmp_ps(uv, c.lim, _CMP_LE_OQ), _mm256_cmp_ps(uv, c.nlim, _CMP_GE_OQ));
  const __m256 dglu =
      _mm256_mul_ps(sa, _mm256_fmadd_ps(_mm256_mul_ps(c.alpha, gc), _mm256_sub_ps(one, sa), one));
  store_bf16(dg, _mm256_and_ps(g_in, _mm256_mul_ps(_mm256_mul_ps(dh, up1), dglu)));
  store_bf16(du, _mm256_and_ps(u_in, _mm256_mul_ps(dh, glu)));
  return _mm256_mul_ps(dv, hv);
}

}  // namespace

void to_bf16(const float* src, float scale, bf16* dst, int64_t n) {
  const __m256 s = _mm256_set1_ps(scale);
  const int64_t i = full_steps(
      n, [&](int64_t o) { store_bf16(dst + o, _mm256_mul_ps(s, _mm256_loadu_ps(src + o))); });
  if (i == n) return;
  const Tail<float> t(src + i, n - i);
  bf16 out[kLanes];
  store_bf16(out, _mm256_mul_ps(s, _mm256_loadu_ps(t.v)));
  std::copy_n(out, n - i, dst + i);
}

void swiglu(const bf16* g, const bf16* u, bf16* h, int64_t n) {
  const int64_t i = full_steps(n, [&](int64_t o) { swiglu8(g + o, u + o, h + o); });
  if (i == n) return;
  const Tail<bf16> tg(g + i, n - i), tu(u + i, n - i);
  bf16 th[kLanes];
  swiglu8(tg.v, tu.v, th);
  std::copy_n(th, n - i, h + i);
}

float swiglu_bwd(const bf16* g, const bf16* u, const float* d, float w, bf16* h, bf16* dg, bf16* du,
                 int64_t n) {
  const __m256 wv = _mm256_set1_ps(w);
  __m256 dot = _mm256_setzero_ps();
  const int64_t i = full_steps(n, [&](int64_t o) {
    dot = _mm256_add_ps(dot, swiglu_bwd8(g + o, u + o, d + o, wv, h + o, dg + o, du + o));
  });
  if (i < n) {
    const int64_t m = n - i;
    const Tail<bf16> tg(g + i, m), tu(u + i, m);
    const Tail<float> td(d + i, m);  // padded d = 0: no contribution to the dot
    bf16 th[kLanes], tdg[kLanes], tdu[kLanes];
    dot = _mm256_add_ps(dot, swiglu_bwd8(tg.v, tu.v, td.v, wv, th, tdg, tdu));
    std::copy_n(th, m, h + i);
    std::copy_n(tdg, m, dg + i);
    std::copy_n(tdu, m, du + i);
  }
  return hsum(dot);
}

void clamped_swiglu(const bf16* g, const bf16* u, float alpha, float limit, bf16* h, int64_t n) {
  const Clamp c(limit, alpha);
  const int64_t i = full_steps(n, [&](int64_t o) { clamped8(g + o, u + o, c, h + o); });
  if (i == n) return;
  const Tail<bf16> tg(g + i, n - i), tu(u + i, n - i);
  bf16 th[kLanes];
  clamped8(tg.v, tu.v, c, th);
  std::copy_n(th, n - i, h + i);
}

float clamped_swiglu_bwd(const bf16* g, const bf16* u, const float* d, float w, float alpha,
                         float limit, bf16* h, bf16* dg, bf16* du, int64_t n) {
  const Clamp c(limit, alpha);
  const __m256 wv = _mm256_set1_ps(w);
  __m256 dot = _mm256_setzero_ps();
  const int64_t i = full_steps(n, [&](int64_t o) {
    dot = _mm256_add_ps(dot, clamped_bwd8(g + o, u + o, d + o, wv, c, h + o, dg + o, du + o));
  });
  if (i < n) {
    const int64_t m = n - i;
    const Tail<bf16> tg(g + i, m), tu(u + i, m);
    const Tail<float> td(d + i, m);  // padded d = 0: no contribution to the dot
    bf16 th[kLanes], tdg[kLanes], tdu[kLanes];
    dot = _mm256_add_ps(dot, clamped_bwd8(tg.v, tu.v, td.v, wv, c, th, tdg, tdu));
    std::copy_n(th, m, h + i);
    std::copy_n(tdg, m, dg + i);
    std::copy_n(tdu, m, du + i);
  }
  return hsum(dot);
}

}  // namespace moetune::kernels::avx2
