// AVX-512 F/BW W^T repack (gemm.h TransposeFn), shared by the avx512,
// avx512_bf16 and amx bundles: transpose_impl.h's block walk with a zmm block
// kernel (one source row per zmm; vpermw swaps the middle words of every
// 64-bit element, three vpermt2q butterfly stages transpose the 8 x 8 64-bit
// elements). Compiled with its ISA's flags only (isa_table.def).
#include <immintrin.h>

#include "gemm_impl.h"
#include "isa_unit.h"
#include "transpose_impl.h"

MOETUNE_ISA_UNIT(avx512);

namespace moetune::kernels::avx512 {

void pack_b_transposed(const PackedB& src, int64_t n_begin, int64_t n_end, bf16* dst) {
  alignas(64) static constexpr uint16_t kSwap[32] = {0,  2,  1,  3,  4,  6,  5,  7,  8,  10, 9,
                                                     11, 12, 14, 13, 15, 16, 18, 17, 19, 20, 22,
                                                     21, 23, 24, 26, 25, 27, 28, 30, 29, 31};
  const __m512i swap = _mm512_load_si512(kSwap);
  const __m512i lo4 = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11);
  const __m512i hi4 = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
  const __m512i lo2 = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
  const __m512i hi2 = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  const __m512i lo1 = _mm512_setr_epi64(0, 8, 2, 10, 4, 12, 6, 14);
  const __m512i hi1 = _mm512_setr_epi64(1, 9, 3, 11, 5, 13, 7, 15);
  pack_b_transposed_blocks(src, n_begin, n_end, dst, [&](const bf16* sblk, bf16* dblk) {
    __m512i r[8];
    for (int i = 0; i < 8; ++i)
      r[i] = _mm512_permutexvar_epi16(swap, _mm512_loadu_si512(sblk + i * 32));
    __m512i t[8];
    for (int i = 0; i < 4; ++i) {
      t[i] = _mm512_permutex2var_epi64(r[i], lo4, r[i + 4]);
      t[i + 4] = _mm512_permutex2var_epi64(r[i], hi4, r[i + 4]);
    }
    for (int g = 0; g < 8; g += 4)
      for (int i = 0; i < 2; ++i) {
        r[g + i] = _mm512_permutex2var_epi64(t[g + i], lo2, t[g + i + 2]);
        r[g + i + 2] = _mm512_permutex2var_epi64(t[g + i], hi2, t[g + i + 2]);
      }
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm512_permutex2var_epi64(r[i], lo1, r[i + 1]);
      t[i + 1] = _mm512_permutex2var_epi64(r[i], hi1, r[i + 1]);
    }
    for (int i = 0; i < 8; ++i) _mm512_storeu_si512(dblk + i * 32, t[i]);
  });
}

}  // namespace moetune::kernels::avx512
