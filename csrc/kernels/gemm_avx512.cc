// AVX-512 (F/BW/VL/DQ, no BF16) kernel for Skylake-SP, Cascade Lake and Ice
// Lake server Xeons: bf16 operands widened to fp32 (a bf16 is the top half of
// an fp32), then FMA into fp32 accumulators.
//
// One packed panel row (16 columns x a K pair, 64 bytes) widens into two zmm
// (even K: shift left 16; odd K: mask the high half). A is widened once per
// (row block, K chunk) into a small fp32 buffer on the stack, so each A
// value reaches the FMAs through a broadcast load (vbroadcastss m32: a
// load-port op only): on these cores every 512-bit ALU op competes with the
// FMAs for ports 0 and 5, so widening A inside the micro-kernel (two ops per
// row per K pair) would cost up to a third of the FMA rate; done once per row
// block it is amortised over all panels of the call. (GCC 12 also emits a
// register copy per row per K pair here, vfmadd132ps + vmovaps; an asm inner
// loop could drop those.)
//
// Register block: MR rows x NB panels of accumulators (MR * NB zmm) plus
// 2 * NB widened B rows, within the 32 zmm registers: 8 x 3 (24 + 6). Of
// the blocks measured side by side (BENCHMARKS.md: 12x2, 8x3, 6x4, 8x2) all
// were equal with B in cache; 8x3 and 6x4 were ahead with B from DRAM, and
// 8x3 needs fewer widening ops per FMA than 6x4. All segments of the
// call are summed in registers within a K chunk (LoRA terms fused for free);
// K beyond one chunk (kKc pairs) adds into C between chunks.
// Compiled with its ISA's flags only (isa_table.def).
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "gemm_impl.h"
#include "isa_unit.h"

MOETUNE_ISA_UNIT(avx512);

namespace moetune::kernels::avx512 {
namespace {

// K pairs per chunk: the widened A block (MR * kKc * 8 bytes, 16 KiB at
// MR = 8, rows kKc * 8 bytes apart) stays in L1 while the chunk's B panels stream through.
constexpr int64_t kKc = 256;
constexpr int kMaxPieces = kMaxSegments + 2;

// A contiguous K-pair range of one segment inside the current chunk; its
// widened A rows start at pair `off` of the chunk buffer.
struct Piece {
  const Segment* sg;
  int64_t kk0, n, off;
};

// ROWS rows (<= the block's MR), NB panels.
template <int ROWS, int NB>
void micro(const Piece* pcs, int npc, const float* aw, int64_t p0, float* C, int64_t ldc,
           int64_t c0, int valid_last, bool load_c) {
  __m512 acc[ROWS][NB];
  for (int i = 0; i < ROWS; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int q = 0; q < npc; ++q) {
    const Piece& pc = pcs[q];
    const bf16* bp[NB];
    for (int j = 0; j < NB; ++j) bp[j] = pc.sg->B.panel(p0 + j) + pc.kk0 * 2 * kPanelN;
    const float* ap = aw + pc.off * 2;
    for (int64_t kk = 0; kk < pc.n; ++kk) {
      __m512 be[NB], bo[NB];
      for (int j = 0; j < NB; ++j) {
        const __m512i v = _mm512_loadu_si512(bp[j] + kk * 2 * kPanelN);
        be[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        bo[j] = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
      }
      const float* a = ap + kk * 2;
      for (int i = 0; i < ROWS; ++i) {
        const __m512 ae = _mm512_set1_ps(a[i * kKc * 2]), ao = _mm512_set1_ps(a[i * kKc * 2 + 1]);
        for (int j = 0; j < NB; ++j) {
          acc[i][j] = _mm512_fmadd_ps(ae, be[j], acc[i][j]);
          acc[i][j] = _mm512_fmadd_ps(ao, bo[j], acc[i][j]);
        }
      }
    }
  }
  for (int i = 0; i < ROWS; ++i) {
    float* crow = C + i * ldc + c0;
    for (int j = 0; j < NB; ++j) {
      const __mmask16 mask =
          (j == NB - 1) ? static_cast<__mmask16>((1u << valid_last) - 1u) : __mmask16(0xffff);
      float* cp = crow + j * kPanelN;
      __m512 v = acc[i][j];
      if (load_c) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, cp));
      _mm512_mask_storeu_ps(cp, mask, v);
    }
  }
}

using MicroFn = void (*)(const Piece*, int, const float*, int64_t, float*, int64_t, int64_t, int,
                         bool);

// table[(rows - 1) * NB + (nb - 1)] for rows in 1..MR, nb in 1..NB.
template <int MR, int NB, size_t... I>
constexpr auto make_table(std::index_sequence<I...>) {
  return std::array<MicroFn, sizeof...(I)>{&micro<int(I / NB) + 1, int(I % NB) + 1>...};
}

// Widens rows [0, rows) of A, pairs [kk0, kk0 + n), into
// aw[i * kKc * 2 + (off + kk) * 2 + {0, 1}]: each row's fp32 values in K
// order, 8 pairs (one 256-bit load) at a time.
inline void widen_a(const bf16* A, int64_t lda, int rows, int64_t kk0, int64_t n, int64_t off,
                    float* aw) {
  for (int i = 0; i < rows; ++i) {
    const bf16* ar = A + i * lda + 2 * kk0;
    float* dst = aw + i * kKc * 2 + off * 2;
    for (int64_t e = 0; e < 2 * n; e += 16) {
      const int64_t left = 2 * n - e;
      const __mmask16 m =
          left >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
      const __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, ar + e));
      _mm512_mask_storeu_ps(dst + e, m, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    }
  }
}

template <int MR, int NB>
void gemm_blocked(int64_t M, int64_t n_begin, int64_t n_end, const Segment* segs, int nseg,
                  float* C, int64_t ldc, bool accumulate) {
  static constexpr auto kTable = make_table<MR, NB>(std::make_index_sequence<MR * NB>{});
  if (M <= 0 || n_end <= n_begin) return;  // nothing to write
  alignas(64) float aw[kKc * MR * 2];
  const int64_t p_begin = n_begin / kPanelN;
  const int64_t p_end = (n_end + kPanelN - 1) / kPanelN;
  int64_t total = 0;  // K pairs over all segments
  for (int s = 0; s < nseg; ++s) total += segs[s].B.kp() / 2;
  for (int64_t m = 0; m < M; m += MR) {
    const int rows = static_cast<int>(std::min<int64_t>(MR, M - m));
    bool first = true;
    // Walk the concatenated K of all segments in chunks of kKc pairs.
    int s = 0;
    int64_t kk = 0;
    for (int64_t done = 0; done < total || first;) {
      Piece pcs[kMaxPieces];
      int npc = 0;
      int64_t used = 0;
      while (s < nseg && used < kKc) {
        const int64_t kp2 = segs[s].B.kp() / 2;
        const int64_t n = std::min(kp2 - kk, kKc - used);
        if (n > 0) {
          pcs[npc] = Piece{&segs[s], kk, n, used};
          widen_a(segs[s].A + m * segs[s].lda, segs[s].lda, rows, kk, n, used, aw);
          ++npc;
          used += n;
          kk += n;
        }
        if (kk >= kp2) {
          ++s;
          kk = 0;
        }
      }
      done += used;
      const bool load_c = accumulate || !first;
      for (int64_t p = p_begin; p < p_end; p += NB) {
        const int nb = static_cast<int>(std::min<int64_t>(NB, p_end - p));
        const int valid_last =
            static_cast<int>(std::min<int64_t>(kPanelN, n_end - (p + nb - 1) * kPanelN));
        kTable[(rows - 1) * NB + (nb - 1)](pcs, npc, aw, p, C + m * ldc, ldc, p * kPanelN,
                                           valid_last, load_c);
      }
      first = false;
    }
  }
}

}  // namespace

void gemm(int64_t M, int64_t n_begin, int64_t n_end, const Segment* segs, int nseg, float* C,
          int64_t ldc, bool accumulate) {
  gemm_blocked<8, 3>(M, n_begin, n_end, segs, nseg, C, ldc, accumulate);
}

}  // namespace moetune::kernels::avx512

namespace moetune::kernels::avx512 {

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
    // Source panel outermost: the slice of one source panel (rows n_begin..
    // n_end, contiguous) is read front to back, and the next panel's is
    // prefetched, instead of 512-byte pieces 64 KiB apart (DRAM latency
    // bound: source panels of a K = 2048 weight are 64 KiB long).
    for (int64_t P = 0; P * kPanelN < Kd; ++P) {
      const bool full_rows = (P + 1) * kPanelN <= kpd;
      for (int64_t q = 0; q < panels_d; ++q) {
        const int64_t ks0 = n_begin + q * kPanelN;  // first source k of this block column
        const bool full_cols = (q + 1) * kPanelN <= Nd && ks0 + kPanelN <= kps;
        bf16* dpanel = dst + q * kpd * kPanelN;
        if (!(full_cols && full_rows)) {
          any_partial = true;
          continue;
        }
        const bf16* sblk = src.data + P * kps * kPanelN + (ks0 / 2) * 2 * kPanelN;
        if ((P + 1) * kPanelN < Kd) {
          const char* nxt = reinterpret_cast<const char*>(sblk + kps * kPanelN);
          for (int l = 0; l < 8; ++l) _mm_prefetch(nxt + l * 64, _MM_HINT_T0);
        }
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
            v = src.data[P * kps * kPanelN + (ks / 2) * 2 * kPanelN + (kd % kPanelN) * 2 +
                         (ks % 2)];
          dpanel[(kd / 2) * 2 * kPanelN + c * 2 + (kd % 2)] = v;
        }
      }
    }
  }
}

}  // namespace moetune::kernels::avx512
