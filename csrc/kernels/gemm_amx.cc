// AMX-BF16 kernel (Sapphire/Emerald Rapids and later). The packed panel
// layout is the AMX B-tile layout already: 16 consecutive packed rows of one
// panel (32 values of K x 16 columns) are one B tile with a 64-byte stride,
// so weights are used in place. Register block: 2 x 2 C tiles (32 x 32 fp32)
// fed by 2 A tiles and 2 B tiles per K step of 32; blocking below gemm().
//
// What AMX does not cover goes to the AVX512-BF16 kernel in accumulate mode:
// each segment's K tail (K mod 32) and segments shorter than 32 (LoRA
// expands with small r) — the same arithmetic, fp32 accumulation.
// Row tails are zero rows of the packed A block, column tails the zero
// columns of the last packed panel, and C goes through an fp32 staging block,
// so no read or write ever goes past the caller's buffers.
//
// The tile configuration is loaded on entry and released on exit (RAII), so
// a worker thread never leaves AMX state configured between calls.
// Compiled with -mamx-tile -mamx-bf16 plus the AVX-512 flags.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "gemm_impl.h"

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

}  // namespace

// A is copied per (32-row block, K block) into a contiguous
// buffer of 1 KiB tiles (64-byte row stride), so A tiles load from L1 and
// never alias in the cache the way rows of a 4 KiB-strided activation matrix
// do; C lives in an fp32 staging block (32 rows x kNc columns) across K
// blocks; only the B tiles stream from L2.
namespace {
constexpr int64_t kKc = 256;  // K block: A block = 32 x 256 bf16 = 16 KiB
constexpr int64_t kNc = 256;  // columns per staging block: 32 x 256 fp32 = 32 KiB
}  // namespace

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
      tails[ntail++] = Segment{segs[s].A + kmain, segs[s].lda,
                               k_range(segs[s].B, kmain, segs[s].B.K - kmain)};
    }
  }
  if (nmain == 0 || M == 0 || n_end <= n_begin) {
    avx512bf16::gemm(M, n_begin, n_end, segs, nseg, C, ldc, accumulate);
    return;
  }

  TileScope tiles;
  // apack[h][ks]: tile of rows 16h..16h+15, K columns 32ks..32ks+31 of the block.
  alignas(64) bf16 apack[2][kKc / kTileK][16 * kTileK];
  alignas(64) float cst[32 * kNc];

  for (int64_t nb = n_begin; nb < n_end; nb += kNc) {
    const int64_t ne = std::min(n_end, nb + kNc);
    const int64_t p_begin = nb / kPanelN;
    const int64_t p_end = (ne + kPanelN - 1) / kPanelN;
    for (int64_t m0 = 0; m0 < M; m0 += 32) {
      const int64_t rows = std::min<int64_t>(32, M - m0);
      bool first = true;
      for (int s = 0; s < nmain; ++s) {
        const Segment& sg = main_part[s];
        const int64_t kp = sg.B.kp();
        for (int64_t k0 = 0; k0 < kp; k0 += kKc) {
          const int64_t kc = std::min(kKc, kp - k0);
          const int64_t ksteps = kc / kTileK;
          for (int64_t r = 0; r < 32; ++r) {
            bf16* dst0 = apack[r / 16][0] + (r % 16) * kTileK;
            if (r < rows) {
              const bf16* src = sg.A + (m0 + r) * sg.lda + k0;
              for (int64_t ks = 0; ks < ksteps; ++ks)
                std::memcpy(dst0 + ks * 16 * kTileK, src + ks * kTileK, kTileK * sizeof(bf16));
            } else {
              for (int64_t ks = 0; ks < ksteps; ++ks)
                std::memset(dst0 + ks * 16 * kTileK, 0, kTileK * sizeof(bf16));
            }
          }
          for (int64_t p = p_begin; p < p_end; p += 2) {
            const bool two = p + 1 < p_end;
            float* c = cst + (p - p_begin) * kPanelN;  // row stride kNc
            if (first) {
              _tile_zero(0);
              _tile_zero(1);
              _tile_zero(2);
              _tile_zero(3);
            } else {
              _tile_loadd(0, c, kNc * 4);
              _tile_loadd(2, c + 16 * kNc, kNc * 4);
              if (two) {
                _tile_loadd(1, c + 16, kNc * 4);
                _tile_loadd(3, c + 16 * kNc + 16, kNc * 4);
              }
            }
            const bf16* b0 = sg.B.panel(p) + k0 * kPanelN;
            const bf16* b1 = two ? sg.B.panel(p + 1) + k0 * kPanelN : nullptr;
            for (int64_t ks = 0; ks < ksteps; ++ks) {
              _tile_loadd(4, apack[0][ks], 64);
              _tile_loadd(5, apack[1][ks], 64);
              _tile_loadd(6, b0 + ks * kTileK * kPanelN, 64);
              _tile_dpbf16ps(0, 4, 6);
              _tile_dpbf16ps(2, 5, 6);
              if (two) {
                _tile_loadd(7, b1 + ks * kTileK * kPanelN, 64);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(3, 5, 7);
              }
            }
            _tile_stored(0, c, kNc * 4);
            _tile_stored(2, c + 16 * kNc, kNc * 4);
            if (two) {
              _tile_stored(1, c + 16, kNc * 4);
              _tile_stored(3, c + 16 * kNc + 16, kNc * 4);
            }
          }
          first = false;
        }
      }
      const int64_t nc = ne - nb;
      for (int64_t r = 0; r < rows; ++r) {
        float* crow = C + (m0 + r) * ldc + nb;
        const float* srow = cst + r * kNc;
        if (accumulate) {
          for (int64_t j = 0; j < nc; ++j) crow[j] += srow[j];
        } else {
          std::memcpy(crow, srow, nc * sizeof(float));
        }
      }
    }
  }
  if (ntail > 0) avx512bf16::gemm(M, n_begin, n_end, tails, ntail, C, ldc, true);
}

}  // namespace moetune::kernels::amx
