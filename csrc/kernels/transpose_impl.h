// Private: the block walk the SIMD W^T repacks share (gemm.h TransposeFn), for
// the per-ISA translation units (force-inlined, instantiated with each
// unit's own block kernel).
//
// The repack maps 16 x 16 blocks: 8 packed rows of one source panel (512
// contiguous bytes: source k = ks0..ks0+15, n = 16P..16P+15) become 8 packed
// rows of one destination panel. Destination row q, word 2c + b holds
// src(k = ks0 + c, n = 16P + 2q + b) = source row c/2, word 4q + 2b + c%2:
// with the middle two words of every 4-word (64-bit) group swapped, that is a
// plain 8 x 8 transpose of 64-bit elements, which each unit does with its own
// shuffles in `block(sblk, dblk)` (both pointers to 32 x 8 bf16, rows 32
// words apart). Blocks at an edge (or every block of a range whose n_begin is
// not a multiple of 16) go through the element formula here.
#pragma once

#include <immintrin.h>

#include <algorithm>

#include "gemm.h"

namespace moetune::kernels {

template <typename Block>
MOETUNE_INLINE void pack_b_transposed_blocks(const PackedB& src, int64_t n_begin, int64_t n_end,
                                             bf16* dst, Block&& block) {
  const int64_t Kd = src.N, kpd = packed_kp(Kd), Nd = n_end - n_begin, kps = src.kp();
  const int64_t panels_d = packed_panels(Nd);
  const bool aligned = (n_begin % kPanelN) == 0;
  bool any_partial = !aligned;
  if (aligned) {
    // Source panel outermost: the slice of one source panel (rows n_begin..
    // n_end, contiguous) is read front to back, and the next panel's is
    // prefetched, instead of 512-byte pieces 64 KiB apart (DRAM latency
    // bound: source panels of a K = 2048 weight are 64 KiB long).
    for (int64_t P = 0; P * kPanelN < Kd; ++P) {
      const bool full_rows = (P + 1) * kPanelN <= kpd;
      for (int64_t q = 0; q < panels_d; ++q) {
        const int64_t ks0 = n_begin + q * kPanelN;  // first source k of this block column
        const bool full_cols = (q + 1) * kPanelN <= Nd && ks0 + kPanelN <= kps;
        if (!(full_cols && full_rows)) {
          any_partial = true;
          continue;
        }
        const bf16* sblk = src.data + P * kps * kPanelN + (ks0 / 2) * 2 * kPanelN;
        if ((P + 1) * kPanelN < Kd) {
          const char* nxt = reinterpret_cast<const char*>(sblk + kps * kPanelN);
          for (int l = 0; l < 8; ++l) _mm_prefetch(nxt + l * 64, _MM_HINT_T0);
        }
        block(sblk, dst + q * kpd * kPanelN + P * 8 * 2 * kPanelN);
      }
    }
  }
  if (!any_partial) return;
  // Edge blocks (and unaligned ranges): element by element, same formula.
  for (int64_t q = 0; q < panels_d; ++q) {
    bf16* dpanel = dst + q * kpd * kPanelN;
    const int64_t ks0 = n_begin + q * kPanelN;
    const bool full_cols = aligned && (q + 1) * kPanelN <= Nd && ks0 + kPanelN <= kps;
    for (int64_t P = 0; P * kPanelN < Kd; ++P) {
      const bool full_rows = (P + 1) * kPanelN <= kpd;
      if (full_cols && full_rows) continue;
      const int64_t kd_end = std::min<int64_t>(kpd, (P + 1) * kPanelN);
      for (int64_t kd = P * kPanelN; kd < kd_end; ++kd) {
        for (int64_t c = 0; c < kPanelN; ++c) {
          const int64_t ks = ks0 + c;
          bf16 v = 0;
          if (c < Nd - q * kPanelN && kd < Kd && ks < src.K)
            v = src.data[P * kps * kPanelN + (ks / 2) * 2 * kPanelN + (kd % kPanelN) * 2 +
                         (ks % 2)];
          dpanel[(kd / 2) * 2 * kPanelN + c * 2 + (kd % 2)] = v;
        }
      }
    }
  }
}

}  // namespace moetune::kernels
