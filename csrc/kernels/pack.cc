// Layout conversions into the packed panel format and A-operand transposes.
// Plain loops: these are memory bound and run once per weight (load time) or
// once per expert slice per step; the compiler vectorises the inner copies.
#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "gemm.h"
#include "isa_unit.h"

MOETUNE_ISA_UNIT(scalar);

namespace moetune::kernels {
namespace {

inline float load(const void* src, SrcType type, int64_t i) {
  return type == SrcType::kBf16 ? bf16_to_f32(static_cast<const bf16*>(src)[i])
                                : static_cast<const float*>(src)[i];
}

}  // namespace

namespace {

// bf16(scale * src[i]) for a contiguous run, written branch-free so the
// compiler vectorises it (round to nearest even, NaN kept quiet).
void cvt_run(const void* src, SrcType type, float scale, int64_t n, bf16* dst) {
  if (type == SrcType::kBf16) {
    const bf16* s = static_cast<const bf16*>(src);
    if (scale == 1.0f) {
      std::memcpy(dst, s, n * sizeof(bf16));
      return;
    }
    for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(scale * bf16_to_f32(s[i]));
    return;
  }
  const float* s = static_cast<const float*>(src);
  for (int64_t i = 0; i < n; ++i) {
    float f = scale * s[i];
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = (u >> 16) | 0x40u;
    dst[i] = static_cast<bf16>(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
  }
}

inline size_t elem_size(SrcType t) { return t == SrcType::kBf16 ? 2 : 4; }

}  // namespace

void pack_b(const void* src, SrcType type, int64_t ld, bool kn, int64_t K, int64_t n_begin,
            int64_t n_end, float scale, bf16* dst) {
  const int64_t N = n_end - n_begin;
  const int64_t kp = packed_kp(K);
  const int64_t panels = packed_panels(N);
  const char* base = static_cast<const char*>(src);
  const size_t es = elem_size(type);
  // One converted source row (plus a zero pad element for odd K).
  std::vector<bf16> row0(std::max<int64_t>(kn ? N : kp, 1) + kPanelN, 0), row1(row0.size(), 0);
  if (kn && type == SrcType::kBf16 && scale == 1.0f) {
    // bf16 taken as is (the backward's token packs: K = tokens, per expert
    // and step): interleave the two source rows straight from the source,
    // 8 columns per SSE2 unpack (x86-64 baseline, no dispatch needed).
    const bf16* s = static_cast<const bf16*>(src) + n_begin;
    for (int64_t kk = 0; kk < kp / 2; ++kk) {
      const bf16* r0 = s + (2 * kk) * ld;
      const bf16* r1 = 2 * kk + 1 < K ? s + (2 * kk + 1) * ld : nullptr;
      for (int64_t p = 0; p < panels; ++p) {
        bf16* out = dst + p * kp * kPanelN + kk * 2 * kPanelN;
        const int64_t c0 = p * kPanelN;
        const int64_t cols = std::min<int64_t>(kPanelN, N - c0);
#if defined(__SSE2__)
        if (cols == kPanelN) {
          const __m128i a0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + c0));
          const __m128i a1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + c0 + 8));
          const __m128i b0 =
              r1 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(r1 + c0)) : _mm_setzero_si128();
          const __m128i b1 = r1 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(r1 + c0 + 8))
                                : _mm_setzero_si128();
          __m128i* o = reinterpret_cast<__m128i*>(out);
          _mm_storeu_si128(o + 0, _mm_unpacklo_epi16(a0, b0));
          _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(a0, b0));
          _mm_storeu_si128(o + 2, _mm_unpacklo_epi16(a1, b1));
          _mm_storeu_si128(o + 3, _mm_unpackhi_epi16(a1, b1));
          continue;
        }
#endif
        for (int64_t c = 0; c < kPanelN; ++c) {
          out[2 * c] = c < cols ? r0[c0 + c] : bf16(0);
          out[2 * c + 1] = (c < cols && r1) ? r1[c0 + c] : bf16(0);
        }
      }
    }
    return;
  }
  if (kn) {
    // Source [K, N]: packed row kk interleaves source rows 2kk and 2kk+1.
    for (int64_t kk = 0; kk < kp / 2; ++kk) {
      cvt_run(base + ((2 * kk) * ld + n_begin) * es, type, scale, N, row0.data());
      if (2 * kk + 1 < K) {
        cvt_run(base + ((2 * kk + 1) * ld + n_begin) * es, type, scale, N, row1.data());
      } else {
        std::fill(row1.begin(), row1.end(), bf16(0));
      }
      for (int64_t p = 0; p < panels; ++p) {
        bf16* out = dst + p * kp * kPanelN + kk * 2 * kPanelN;
        const int64_t c0 = p * kPanelN;
        const int64_t cols = std::min<int64_t>(kPanelN, N - c0);
        if (cols == kPanelN) {
          const bf16* a = row0.data() + c0;
          const bf16* b = row1.data() + c0;
          for (int c = 0; c < kPanelN; ++c) {
            out[2 * c] = a[c];
            out[2 * c + 1] = b[c];
          }
        } else {
          for (int64_t c = 0; c < kPanelN; ++c) {
            out[2 * c] = c < cols ? row0[c0 + c] : bf16(0);
            out[2 * c + 1] = c < cols ? row1[c0 + c] : bf16(0);
          }
        }
      }
    }
    return;
  }
  // Source [N, K]: every 32-bit lane of a packed row is one (k, k+1) pair of
  // one source row, so after conversion each column is a strided 32-bit copy.
  for (int64_t p = 0; p < panels; ++p) {
    uint32_t* panel = reinterpret_cast<uint32_t*>(dst + p * kp * kPanelN);
    const int64_t c0 = p * kPanelN;
    const int64_t cols = std::min<int64_t>(kPanelN, N - c0);
    for (int64_t c = 0; c < kPanelN; ++c) {
      if (c >= cols) {
        for (int64_t kk = 0; kk < kp / 2; ++kk) panel[kk * kPanelN + c] = 0;
        continue;
      }
      cvt_run(base + ((n_begin + c0 + c) * ld) * es, type, scale, K, row0.data());
      row0[K] = 0;  // pad pair for odd K
      const uint32_t* pairs = reinterpret_cast<const uint32_t*>(row0.data());
      for (int64_t kk = 0; kk < kp / 2; ++kk) {
        uint32_t v;
        std::memcpy(&v, pairs + kk, 4);
        panel[kk * kPanelN + c] = v;
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

// The scalar unit's W^T repack: the oracle of the SIMD ones (transpose_avx2.cc,
// transpose_avx512.cc).
namespace moetune::kernels::scalar {

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

}  // namespace moetune::kernels::scalar
