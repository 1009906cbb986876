// AVX512-BF16 kernel: vdpbf16ps consumes one packed panel row (16 columns x a
// K pair) per instruction against a broadcast pair of A. Register block: up to
// kMr rows x kNb panels of fp32 accumulators, all segments of the call summed
// in registers before one (masked) store, so a LoRA expand fused as a second
// segment costs no extra pass over C.
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512bf16 only.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "gemm_impl.h"

namespace moetune::kernels::avx512bf16 {
namespace {

constexpr int kMr = 8;
constexpr int kNb = 2;

inline __m512i bcast_pair(const bf16* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

template <int MR, int NB>
void micro(const Segment* segs, int nseg, int64_t m0, int64_t p0, float* C, int64_t ldc,
           int64_t c0, int valid_last, bool accumulate) {
  __m512 acc[MR][NB];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();

  for (int s = 0; s < nseg; ++s) {
    const Segment& sg = segs[s];
    const int64_t kp2 = sg.B.kp() / 2;
    const bf16* bp[NB];
    for (int j = 0; j < NB; ++j) bp[j] = sg.B.panel(p0 + j);
    const bf16* ap = sg.A + m0 * sg.lda;
    for (int64_t kk = 0; kk < kp2; ++kk) {
      __m512bh b[NB];
      for (int j = 0; j < NB; ++j) b[j] = (__m512bh)_mm512_loadu_si512(bp[j] + kk * 32);
      for (int i = 0; i < MR; ++i) {
        const __m512bh a = (__m512bh)bcast_pair(ap + i * sg.lda + 2 * kk);
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, b[j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* crow = C + (m0 + i) * ldc + c0;
    for (int j = 0; j < NB; ++j) {
      const __mmask16 mask =
          (j == NB - 1) ? static_cast<__mmask16>((1u << valid_last) - 1u) : __mmask16(0xffff);
      float* cp = crow + j * kPanelN;
      __m512 v = acc[i][j];
      if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, cp));
      _mm512_mask_storeu_ps(cp, mask, v);
    }
  }
}

using MicroFn = void (*)(const Segment*, int, int64_t, int64_t, float*, int64_t, int64_t, int,
                         bool);

template <int MR>
constexpr MicroFn pick(int nb) {
  return nb == 1 ? &micro<MR, 1> : &micro<MR, 2>;
}

MicroFn table(int mr, int nb) {
  switch (mr) {
    case 1: return pick<1>(nb);
    case 2: return pick<2>(nb);
    case 3: return pick<3>(nb);
    case 4: return pick<4>(nb);
    case 5: return pick<5>(nb);
    case 6: return pick<6>(nb);
    case 7: return pick<7>(nb);
    default: return pick<8>(nb);
  }
}

}  // namespace

void gemm(int64_t M, int64_t n_begin, int64_t n_end, const Segment* segs, int nseg, float* C,
          int64_t ldc, bool accumulate) {
  const int64_t p_begin = n_begin / kPanelN;
  const int64_t p_end = (n_end + kPanelN - 1) / kPanelN;
  for (int64_t p = p_begin; p < p_end; p += kNb) {
    const int nb = static_cast<int>(std::min<int64_t>(kNb, p_end - p));
    const int64_t c0 = p * kPanelN;
    const int valid_last =
        static_cast<int>(std::min<int64_t>(kPanelN, n_end - (p + nb - 1) * kPanelN));
    for (int64_t m = 0; m < M; m += kMr) {
      const int mr = static_cast<int>(std::min<int64_t>(kMr, M - m));
      table(mr, nb)(segs, nseg, m, p, C, ldc, c0, valid_last, accumulate);
    }
  }
}

}  // namespace moetune::kernels::avx512bf16

namespace moetune::kernels::avx512bf16 {

// W^T slices for backward, 16x16 blocks at a time. A source block (8 packed
// rows of one panel, 512 contiguous bytes) becomes a destination block (8
// packed rows of one destination panel): destination row q, word 2c + b holds
// src(k = c, n = 2q + b) = source row c/2, word 4q + 2b + c%2. Swapping the
// middle words of every 4-word group (vpermw) turns that into a plain 8x8
// transpose of 64-bit elements (three vpermt2q butterfly stages).
void pack_b_transposed(const PackedB& src, int64_t n_begin, int64_t n_end, bf16* dst) {
  const int64_t Kd = src.N, kpd = packed_kp(Kd), Nd = n_end - n_begin, kps = src.kp();
  const int64_t panels_d = packed_panels(Nd);
  const bool aligned = (n_begin % 16) == 0;
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
  bool any_partial = !aligned;
  if (aligned) {
    for (int64_t q = 0; q < panels_d; ++q) {
      const int64_t ks0 = n_begin + q * kPanelN;  // first source k of this block column
      const bool full_cols = (q + 1) * kPanelN <= Nd && ks0 + kPanelN <= kps;
      bf16* dpanel = dst + q * kpd * kPanelN;
      for (int64_t P = 0; P * kPanelN < Kd; ++P) {
        const bool full_rows = (P + 1) * kPanelN <= kpd;
        if (!(full_cols && full_rows)) {
          any_partial = true;
          continue;
        }
        const bf16* sblk = src.data + P * kps * kPanelN + (ks0 / 2) * 2 * kPanelN;
        __m512i r[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm512_permutexvar_epi16(swap, _mm512_loadu_si512(sblk + i * 32));
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
        bf16* dblk = dpanel + P * 8 * 2 * kPanelN;
        for (int i = 0; i < 8; ++i) _mm512_storeu_si512(dblk + i * 32, t[i]);
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
            v = src.data[P * kps * kPanelN + (ks / 2) * 2 * kPanelN + (kd % kPanelN) * 2 + (ks % 2)];
          dpanel[(kd / 2) * 2 * kPanelN + c * 2 + (kd % 2)] = v;
        }
      }
    }
  }
}

}  // namespace moetune::kernels::avx512bf16
