// Private: fp32 -> bf16 round-to-nearest-even with AVX-512 F integer ops, for
// the translation units compiled with -mavx512f/bw/vl/dq only (no
// vcvtneps2bf16). Same result as f32_to_bf16 in gemm.h for every input:
// denormals are rounded (not flushed), NaN becomes a quiet NaN.
// Include only from those translation units (the helpers are force-inlined).
#pragma once

#include <immintrin.h>

#include "gemm.h"

namespace moetune::kernels::avx512 {

// bf16 bits of each lane's rounded value, in the low 16 bits of the lane
// (high 16 bits zero).
MOETUNE_INLINE __m512i rne_bf16_lo(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r =
      _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
}

// 16 rounded values packed to 16 bf16 (vpmovdw).
MOETUNE_INLINE __m256i cvt_bf16(__m512 v) { return _mm512_cvtepi32_epi16(rne_bf16_lo(v)); }

}  // namespace moetune::kernels::avx512
