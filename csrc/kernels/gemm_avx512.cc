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
