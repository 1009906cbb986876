// AVX2 W^T repack (gemm.h TransposeFn) for the avx2 bundle: transpose_impl.h's
// block walk with a ymm block kernel. A 16 x 16 block's 8 source rows are 16
// ymm (64-bit elements 0-3 and 4-7 of each row); after the word swap inside
// every 64-bit element (vpshufb), the 8 x 8 transpose of 64-bit elements is
// four 4 x 4 transposes (vpunpck[lh]qdq within 128-bit lanes, then
// vperm2i128 across them). Memory bound like the AVX-512 one; replaces the
// scalar unit's word-by-word loop, which made bf16 weights' backward slower
// than the quantized formats' fused dequant_t on AVX2 machines.
// Compiled with its ISA's flags only (isa_table.def).
#include <immintrin.h>

#include "gemm_impl.h"
#include "isa_unit.h"
#include "transpose_impl.h"

MOETUNE_ISA_UNIT(avx2);

namespace moetune::kernels::avx2 {
namespace {

// r[0..3] (rows, 4 x 64-bit each) -> their transpose, in place.
inline void transpose4x64(__m256i (&r)[4]) {
  const __m256i t0 = _mm256_unpacklo_epi64(r[0], r[1]);  // r0.0 r1.0 | r0.2 r1.2
  const __m256i t1 = _mm256_unpackhi_epi64(r[0], r[1]);  // r0.1 r1.1 | r0.3 r1.3
  const __m256i t2 = _mm256_unpacklo_epi64(r[2], r[3]);
  const __m256i t3 = _mm256_unpackhi_epi64(r[2], r[3]);
  r[0] = _mm256_permute2x128_si256(t0, t2, 0x20);
  r[1] = _mm256_permute2x128_si256(t1, t3, 0x20);
  r[2] = _mm256_permute2x128_si256(t0, t2, 0x31);
  r[3] = _mm256_permute2x128_si256(t1, t3, 0x31);
}

}  // namespace

void pack_b_transposed(const PackedB& src, int64_t n_begin, int64_t n_end, bf16* dst) {
  // Words 0 2 1 3 of every 64-bit element (bytes, per 128-bit lane).
  const __m256i swap = _mm256_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15, 0, 1,
                                        4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15);
  pack_b_transposed_blocks(src, n_begin, n_end, dst, [&](const bf16* sblk, bf16* dblk) {
    // q[h][g]: source rows 4g..4g+3, 64-bit elements 4h..4h+3. After the
    // transposes q[h][g][j] is destination row 4h + j, elements 4g..4g+3.
    __m256i q[2][2][4];
    for (int i = 0; i < 8; ++i)
      for (int h = 0; h < 2; ++h)
        q[h][i / 4][i % 4] = _mm256_shuffle_epi8(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sblk + i * 32 + h * 16)), swap);
    for (int h = 0; h < 2; ++h)
      for (int g = 0; g < 2; ++g) transpose4x64(q[h][g]);
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 4; ++j)
        for (int g = 0; g < 2; ++g)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dblk + (4 * h + j) * 32 + g * 16),
                              q[h][g][j]);
  });
}

}  // namespace moetune::kernels::avx2
