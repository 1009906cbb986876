// Layout conversions into the packed panel format and A-operand transposes.
// Plain loops: these are memory bound and run once per weight (load time) or
// once per expert slice per step; the compiler vectorises the inner copies.
#include <algorithm>
#include <cstring>

#include "gemm.h"

namespace moetune::kernels {
namespace {

inline float load(const void* src, SrcType type, int64_t i) {
  return type == SrcType::kBf16 ? bf16_to_f32(static_cast<const bf16*>(src)[i])
                                : static_cast<const float*>(src)[i];
}

}  // namespace

void pack_b(const void* src, SrcType type, int64_t ld, bool kn, int64_t K, int64_t n_begin,
            int64_t n_end, float scale, bf16* dst) {
  const int64_t N = n_end - n_begin;
  const int64_t kp = packed_kp(K);
  const int64_t panels = packed_panels(N);
  const bool exact = (type == SrcType::kBf16 && scale == 1.0f);
  if (panels == 0 || kp == 0) return;  // empty destination: dst may be null (memset UB)
  if (exact && kn) {
    // Row-major [K, N] bf16: each packed row interleaves two source rows.
    // Rows outer so the source is read sequentially; every write is one
    // 64-byte panel row. The inner loop vectorises to unpack instructions.
    const bf16* s = static_cast<const bf16*>(src);
    static const bf16 zeros[kPanelN] = {};
    for (int64_t kk = 0; kk < kp / 2; ++kk) {
      const bf16* r0 = s + (2 * kk) * ld + n_begin;
      const bool has1 = 2 * kk + 1 < K;
      const bf16* r1 = has1 ? r0 + ld : nullptr;
      for (int64_t p = 0; p < panels; ++p) {
        bf16* out = dst + p * kp * kPanelN + kk * 2 * kPanelN;
        const int64_t c0 = p * kPanelN;
        const int64_t cols = std::min<int64_t>(kPanelN, N - c0);
        if (cols == kPanelN) {
          const bf16* a = r0 + c0;
          const bf16* b = has1 ? r1 + c0 : zeros;
          for (int c = 0; c < kPanelN; ++c) {
            out[2 * c] = a[c];
            out[2 * c + 1] = b[c];
          }
        } else {
          for (int64_t c = 0; c < kPanelN; ++c) {
            out[2 * c] = c < cols ? r0[c0 + c] : bf16(0);
            out[2 * c + 1] = (c < cols && has1) ? r1[c0 + c] : bf16(0);
          }
        }
      }
    }
    return;
  }
  std::memset(dst, 0, sizeof(bf16) * panels * kp * kPanelN);
  for (int64_t p = 0; p < panels; ++p) {
    bf16* panel = dst + p * kp * kPanelN;
    const int64_t c0 = p * kPanelN;
    const int64_t cols = std::min<int64_t>(kPanelN, N - c0);
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t n = n_begin + c0 + c;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t idx = kn ? k * ld + n : n * ld + k;
        bf16 v;
        if (exact) {
          v = static_cast<const bf16*>(src)[idx];
        } else {
          v = f32_to_bf16(scale * load(src, type, idx));
        }
        panel[(k / 2) * 2 * kPanelN + c * 2 + (k % 2)] = v;
      }
    }
  }
}

void transpose_to_a(const void* src, SrcType type, int64_t ld_src, int64_t rows, int64_t cols,
                    const float* row_scale, bf16* dst, int64_t ld_dst) {
  for (int64_t c = 0; c < cols; ++c) {
    bf16* out = dst + c * ld_dst;
    for (int64_t r = 0; r < rows; ++r) {
      const float s = row_scale ? row_scale[r] : 1.0f;
      if (type == SrcType::kBf16 && !row_scale) {
        out[r] = static_cast<const bf16*>(src)[r * ld_src + c];
      } else {
        out[r] = f32_to_bf16(s * load(src, type, r * ld_src + c));
      }
    }
    if (rows % 2) out[rows] = 0;
  }
}

}  // namespace moetune::kernels

namespace moetune::kernels {

void pack_b_transposed(const PackedB& src, int64_t n_begin, int64_t n_end, bf16* dst) {
  // dst(k', c) = src(k = n_begin + c, n = k'). Walk 16x16 blocks: one src
  // panel (16 n) x 16 k rows is 512 contiguous bytes, so each block is read
  // from L1 once and written as 8 destination rows.
  const int64_t Kd = src.N;  // K' of the destination
  const int64_t kpd = packed_kp(Kd);
  const int64_t Nd = n_end - n_begin;
  const int64_t kps = src.kp();
  const int64_t panels_d = packed_panels(Nd);
  if (panels_d == 0 || kpd == 0) return;  // empty destination: dst may be null (memset UB)
  std::memset(dst, 0, sizeof(bf16) * panels_d * kpd * kPanelN);
  for (int64_t q = 0; q < panels_d; ++q) {
    bf16* dpanel = dst + q * kpd * kPanelN;
    const int64_t cols = std::min<int64_t>(kPanelN, Nd - q * kPanelN);
    for (int64_t kd0 = 0; kd0 < Kd; kd0 += kPanelN) {
      const bf16* spanel = src.data + (kd0 / kPanelN) * kps * kPanelN;
      const int64_t kd_end = std::min<int64_t>(kPanelN, Kd - kd0);
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t ks = n_begin + q * kPanelN + c;  // src k
        const bf16* srow = spanel + (ks / 2) * 2 * kPanelN + (ks % 2);
        for (int64_t j = 0; j < kd_end; ++j) {  // src n within panel = kd0 + j
          const int64_t kd = kd0 + j;
          dpanel[(kd / 2) * 2 * kPanelN + c * 2 + (kd % 2)] = srow[j * 2];
        }
      }
    }
  }
}

}  // namespace moetune::kernels
