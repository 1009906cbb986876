// AMX-BF16 kernel (Sapphire/Emerald Rapids and later). The packed panel
// layout is the AMX B-tile layout already: 16 consecutive packed rows of one
// panel (32 values of K x 16 columns) are one B tile with a 64-byte stride,
// so weights are used in place. Register block: 2 x 2 C tiles (32 x 32 fp32)
// fed by 2 A tiles and 2 B tiles per K step of 32 (1 x 2 when a row block
// has at most 16 rows).
//
// Cache blocking, K outermost (per block of up to kMc rows x kNc columns):
//   for each K block of kKc (over every segment's main part):
//     for each 32-row block: copy A (32 x kKc, 16 KiB) into contiguous tiles,
//       so A tiles load from L1 without the 4 KiB aliasing of rows of a
//       K = 2048 activation matrix;
//       for each pair of panels: C tiles from / to the fp32 staging block,
//         B tiles of the K block (kKc x kNc, 128 KiB) from L2.
// So each B byte comes from DRAM once per call and from L2 once per 32 rows,
// while the next K block's B is software-prefetched into L2 during this one
// (expert weights are streamed, and a tile load that misses L2 stalls the
// TMUL for the whole DRAM latency). The staging block (kMc x kNc fp32,
// 192 KiB, on the stack: callers' threads need the usual >= 1 MiB stacks)
// lives in L2.
//
// What AMX does not cover goes to the AVX512-BF16 kernel in accumulate mode
// (so the amx_bf16 row of isa_table.def includes avx512_bf16): each
// segment's K tail (K mod 32) and segments shorter than 32 (LoRA expands with
// small r) — the same arithmetic, fp32 accumulation.
// Row tails are zero rows of the packed A block, column tails the zero
// columns of the last packed panel, and C goes through the staging block,
// so no read or write ever goes past the caller's buffers.
//
// The tile configuration is loaded on entry and released on exit (RAII), so
// a worker thread never leaves AMX state configured between calls.
// Compiled with its ISA's flags only (isa_table.def).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "gemm_impl.h"
#include "isa_unit.h"
#include "quant_impl.h"

MOETUNE_ISA_UNIT(amx);

namespace moetune::kernels::amx {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

class TileScope {
 public:
  TileScope() {
    TileConfig cfg;
    std::memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
      cfg.rows[t] = 16;
      cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
  }
  ~TileScope() { _tile_release(); }
};

constexpr int64_t kTileK = 32;
constexpr int64_t kNc = kColBlock;  // columns per block (16 panels)
constexpr int64_t kMc = 192;        // rows per block (the engine's row blocks)

// The K blocks of a call, in order: (segment, k0) over every main part.
struct KCursor {
  int s = 0;
  int64_t k0 = 0;
};

// Prefetches the B of one K block (panels [p_begin, p_end)) into L2, a few
// lines per K step, so it is there when the next K block starts. `first`:
// the block's bytes in panel p_begin, `panel_stride` bytes apart, `bytes`
// per panel (bf16 panels, or a quantized operand's codes).
class BPrefetch {
 public:
  BPrefetch(const char* first, int64_t panel_stride, int64_t bytes, int64_t panels, int64_t steps)
      : base_(first), stride_(panel_stride), lines_(bytes / 64), p_end_(first ? panels : 0) {
    const int64_t total = p_end_ * lines_;
    per_step_ = steps > 0 ? (total + steps - 1) / steps : 0;
  }
  MOETUNE_INLINE void step() {
    for (int64_t i = 0; i < per_step_ && p_ < p_end_; ++i) {
      _mm_prefetch(base_ + p_ * stride_ + l_ * 64, _MM_HINT_T1);
      if (++l_ == lines_) {
        l_ = 0;
        ++p_;
      }
    }
  }

 private:
  const char* base_;
  int64_t stride_, lines_, p_end_, p_ = 0, l_ = 0, per_step_ = 0;
};

// The prefetch of segment s's K block [k0, k0 + kc) over panels [p_begin,
// p_end): the bf16 panel rows, or for the quantized segment (s == 0 with q)
// the codes the dequantization will read.
BPrefetch prefetch_of(const Segment* segs, int nseg, const QuantB* q, int s, int64_t k0, int64_t kc,
                      int64_t p_begin, int64_t p_end, int64_t steps) {
  if (s >= nseg) return BPrefetch(nullptr, 0, 0, 0, steps);
  if (s == 0 && q) {
    const int64_t rb = quant_row_bytes(q->spec.format);
    return BPrefetch(reinterpret_cast<const char*>(q->panel_q(p_begin) + (k0 / 2) * rb),
                     quant_panel_bytes(q->spec.format, q->K), (kc / 2) * rb, p_end - p_begin,
                     steps);
  }
  const PackedB& b = segs[s].B;
  return BPrefetch(reinterpret_cast<const char*>(b.panel(p_begin) + k0 * kPanelN),
                   b.stride() * int64_t(sizeof(bf16)), kc * kPanelN * int64_t(sizeof(bf16)),
                   p_end - p_begin, steps);
}

// K rows per block (a multiple of kTileK): of 128, 256 and 512, with and
// without the next block's prefetch, 256 + prefetch was the best overall
// (BENCHMARKS.md, "GEMM micro-kernel at the engine's task shapes").
constexpr int64_t kKc = 256;

// q: segment 0 is quantized (its B only gives the K of its main part):
// each K block of it is dequantized (the AVX512-BF16 dequant, bit-identical
// to the scalar oracle) into bstage (kKc x kNc bf16, the packed layout with panel stride
// kc * 16) panel pair by panel pair, in the first 32-row pass, right before
// those tiles are first used; the other row blocks read it from L1 / L2.
// So the tile loads and tdpbf16ps are exactly the bf16 path's, on the same
// values, in the same order.
void gemm_main(int64_t M, int64_t n_begin, int64_t n_end, const Segment* segs, int nseg, float* C,
               int64_t ldc, bool accumulate, const QuantB* q = nullptr, bf16* bstage = nullptr) {
  TileScope tiles;
  // apack[h][ks]: tile of rows 16h..16h+15, K columns 32ks..32ks+31 of the block.
  alignas(64) bf16 apack[2][kKc / kTileK][16 * kTileK];
  alignas(64) float cst[kMc * kNc];

  auto next = [&](KCursor c) {
    c.k0 += kKc;
    if (c.k0 >= segs[c.s].B.kp()) {
      ++c.s;
      c.k0 = 0;
    }
    return c;
  };

  for (int64_t nb = n_begin; nb < n_end; nb += kNc) {
    const int64_t ne = std::min(n_end, nb + kNc);
    const int64_t p_begin = nb / kPanelN;
    const int64_t p_end = (ne + kPanelN - 1) / kPanelN;
    const int64_t pairs = (p_end - p_begin + 1) / 2;
    for (int64_t mb = 0; mb < M; mb += kMc) {
      const int64_t mrows = std::min(kMc, M - mb);
      const int64_t mblocks = (mrows + 31) / 32;
      bool first = true;
      for (KCursor cur; cur.s < nseg; cur = next(cur)) {
        const Segment& sg = segs[cur.s];
        const int64_t k0 = cur.k0;
        const int64_t kc = std::min(kKc, sg.B.kp() - k0);
        const int64_t ksteps = kc / kTileK;
        const KCursor nx = next(cur);
        const bool has_next = nx.s < nseg;
        BPrefetch pf = prefetch_of(segs, nseg, q, nx.s, nx.k0,
                                   has_next ? std::min(kKc, segs[nx.s].B.kp() - nx.k0) : 0, p_begin,
                                   p_end, mblocks * pairs * ksteps);
        const bool dq = q && cur.s == 0;  // B of this K block from bstage
        for (int64_t m0 = 0; m0 < mrows; m0 += 32) {
          const int64_t rows = std::min<int64_t>(32, mrows - m0);
          const bool two_rows = rows > 16;
          for (int64_t r = 0; r < (two_rows ? 32 : 16); ++r) {
            bf16* dst0 = apack[r / 16][0] + (r % 16) * kTileK;
            if (r < rows) {
              const bf16* src = sg.A + (mb + m0 + r) * sg.lda + k0;
              for (int64_t ks = 0; ks < ksteps; ++ks)
                std::memcpy(dst0 + ks * 16 * kTileK, src + ks * kTileK, kTileK * sizeof(bf16));
            } else {
              for (int64_t ks = 0; ks < ksteps; ++ks)
                std::memset(dst0 + ks * 16 * kTileK, 0, kTileK * sizeof(bf16));
            }
          }
          for (int64_t p = p_begin; p < p_end; p += 2) {
            const bool two = p + 1 < p_end;
            float* c = cst + m0 * kNc + (p - p_begin) * kPanelN;  // row stride kNc
            if (first) {
              _tile_zero(0);
              _tile_zero(1);
              _tile_zero(2);
              _tile_zero(3);
            } else {
              _tile_loadd(0, c, kNc * 4);
              if (two) _tile_loadd(1, c + 16, kNc * 4);
              if (two_rows) {
                _tile_loadd(2, c + 16 * kNc, kNc * 4);
                if (two) _tile_loadd(3, c + 16 * kNc + 16, kNc * 4);
              }
            }
            const bf16* b0;
            const bf16* b1;
            if (dq) {
              bf16* st = bstage + (p - p_begin) * kc * kPanelN;
              if (m0 == 0) {
                avx512bf16::dequant(*q, p * kPanelN, std::min(ne, (p + 2) * kPanelN), k0,
                                    std::min(k0 + kc, q->K), st);
              }
              b0 = st;
              b1 = two ? st + kc * kPanelN : nullptr;
            } else {
              b0 = sg.B.panel(p) + k0 * kPanelN;
              b1 = two ? sg.B.panel(p + 1) + k0 * kPanelN : nullptr;
            }
            if (two_rows && two) {
              for (int64_t ks = 0; ks < ksteps; ++ks) {
                _tile_loadd(4, apack[0][ks], 64);
                _tile_loadd(6, b0 + ks * kTileK * kPanelN, 64);
                _tile_loadd(5, apack[1][ks], 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_loadd(7, b1 + ks * kTileK * kPanelN, 64);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(3, 5, 7);
                pf.step();
              }
            } else {
              for (int64_t ks = 0; ks < ksteps; ++ks) {
                _tile_loadd(4, apack[0][ks], 64);
                _tile_loadd(6, b0 + ks * kTileK * kPanelN, 64);
                _tile_dpbf16ps(0, 4, 6);
                if (two_rows) {
                  _tile_loadd(5, apack[1][ks], 64);
                  _tile_dpbf16ps(2, 5, 6);
                }
                if (two) {
                  _tile_loadd(7, b1 + ks * kTileK * kPanelN, 64);
                  _tile_dpbf16ps(1, 4, 7);
                }
                pf.step();
              }
            }
            _tile_stored(0, c, kNc * 4);
            if (two) _tile_stored(1, c + 16, kNc * 4);
            if (two_rows) {
              _tile_stored(2, c + 16 * kNc, kNc * 4);
              if (two) _tile_stored(3, c + 16 * kNc + 16, kNc * 4);
            }
          }
        }
        first = false;
      }
      const int64_t nc = ne - nb;
      for (int64_t r = 0; r < mrows; ++r) {
        float* crow = C + (mb + r) * ldc + nb;
        const float* srow = cst + r * kNc;
        if (accumulate) {
          for (int64_t j = 0; j < nc; ++j) crow[j] += srow[j];
        } else {
          std::memcpy(crow, srow, nc * sizeof(float));
        }
      }
    }
  }
}

}  // namespace

// Splits the segments into AMX main parts (K a multiple of 32) and tails.
void gemm(int64_t M, int64_t n_begin, int64_t n_end, const Segment* segs, int nseg, float* C,
          int64_t ldc, bool accumulate) {
  Segment main_part[kMaxSegments];
  Segment tails[kMaxSegments];
  int nmain = 0, ntail = 0;
  for (int s = 0; s < nseg; ++s) {
    const int64_t kp = segs[s].B.kp();
    const int64_t kmain = kp / kTileK * kTileK;
    if (kmain > 0) {
      main_part[nmain++] = Segment{segs[s].A, segs[s].lda, k_range(segs[s].B, 0, kmain)};
    }
    if (kp > kmain) {
      tails[ntail++] =
          Segment{segs[s].A + kmain, segs[s].lda, k_range(segs[s].B, kmain, segs[s].B.K - kmain)};
    }
  }
  if (nmain == 0 || M == 0 || n_end <= n_begin) {
    avx512bf16::gemm(M, n_begin, n_end, segs, nseg, C, ldc, accumulate);
    return;
  }
  gemm_main(M, n_begin, n_end, main_part, nmain, C, ldc, accumulate);
  if (ntail > 0) avx512bf16::gemm(M, n_begin, n_end, tails, ntail, C, ldc, true);
}

// The fused quantized GEMM: segment 0's main part (K rounded down to 32) is
// dequantized per K block inside gemm_main; the K tails of every segment go
// to the AVX512-BF16 kernel in accumulate mode, as gemm() sends them, one
// column block at a time (its columns are independent, so the per-column
// result is that of one call), segment 0's tail dequantized per block.
// Segment 0 with no main part (K < 32) or M == 0: the panels path itself
// (dequantize a column block, gemm()), which the contract compares against.
void quant_gemm(int64_t M, int64_t n_begin, int64_t n_end, const bf16* A, int64_t lda,
                const QuantB& B, const Segment* segs, int nseg, float* C, int64_t ldc) {
  if (M == 0 || n_end <= n_begin) return;
  // Segment 0's tail rows (< 32) x one column block; the whole operand when K < 32.
  alignas(64) bf16 tail_panel[kTileK * kColBlock];
  const int64_t kp = packed_kp(B.K);
  const int64_t kmain = kp / kTileK * kTileK;
  if (kmain == 0) {
    Segment local[kMaxSegments];
    for (int64_t nb = n_begin; nb < n_end; nb += kColBlock) {
      const int64_t w = std::min(kColBlock, n_end - nb);
      avx512bf16::dequant(B, nb, nb + w, 0, B.K, tail_panel);
      local[0] = Segment{A, lda, PackedB{tail_panel, B.K, w}};
      for (int s = 0; s < nseg; ++s)
        local[s + 1] = Segment{segs[s].A, segs[s].lda, packed_slice(segs[s].B, nb, w)};
      gemm(M, 0, w, local, nseg + 1, C + nb, ldc, false);
    }
    return;
  }
  Segment main_part[kMaxSegments];
  Segment tails[kMaxSegments];
  int nmain = 0, ntail = 0;
  main_part[nmain++] = Segment{A, lda, PackedB{nullptr, kmain, B.N}};  // B read through q
  const bool qtail = kp > kmain;
  if (qtail) tails[ntail++] = Segment{A + kmain, lda, PackedB{}};  // B: per column block below
  for (int s = 0; s < nseg; ++s) {
    const int64_t skp = segs[s].B.kp();
    const int64_t smain = skp / kTileK * kTileK;
    if (smain > 0)
      main_part[nmain++] = Segment{segs[s].A, segs[s].lda, k_range(segs[s].B, 0, smain)};
    if (skp > smain) {
      tails[ntail++] =
          Segment{segs[s].A + smain, segs[s].lda, k_range(segs[s].B, smain, segs[s].B.K - smain)};
    }
  }
  {
    alignas(64) bf16 bstage[kKc * kNc];
    gemm_main(M, n_begin, n_end, main_part, nmain, C, ldc, false, &B, bstage);
  }
  if (ntail == 0) return;
  Segment local[kMaxSegments];
  for (int64_t nb = n_begin; nb < n_end; nb += kColBlock) {
    const int64_t w = std::min(kColBlock, n_end - nb);
    for (int t = 0; t < ntail; ++t) {
      if (qtail && t == 0) {
        avx512bf16::dequant(B, nb, nb + w, kmain, B.K, tail_panel);
        local[0] = Segment{tails[0].A, tails[0].lda, PackedB{tail_panel, B.K - kmain, w}};
      } else {
        local[t] = Segment{tails[t].A, tails[t].lda, packed_slice(tails[t].B, nb, w)};
      }
    }
    avx512bf16::gemm(M, 0, w, local, ntail, C + nb, ldc, true);
  }
}

}  // namespace moetune::kernels::amx
