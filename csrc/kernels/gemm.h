// moetune kernels: bf16 GEMM micro-kernel interface and the packed-B layout.
//
// Kernels know nothing about MoE. They compute
//
//     C[M, n_begin:n_end] (+)= sum_s  A_s[M, K_s] * B_s[K_s, n_begin:n_end]
//
// with bf16 inputs and fp32 accumulation, where every B_s is in the *packed
// panel layout* below. The engine expresses every product of a MoE layer's
// forward and backward (base weights, transposed base weights, LoRA reduce /
// expand, LoRA gradients) as such a call, so a new ISA provides this one entry
// point (plus a W^T repack, or shares one) in its kernel bundle
// (kernel_bundle.h). Quantized weights are dequantized into this layout
// first (quant.h), so there is one packed layout for every ISA.
//
// Packed panel layout: N is cut into panels of kPanelN = 16 columns; K is
// padded with zeros to an even Kp. Panel p holds Kp/2 rows of 16 column-pairs:
//     element (k, n) lives at  p*Kp*16 + (k/2)*32 + (n%16)*2 + (k%2)
// i.e. each 32-bit lane carries the two K-neighbours of one column, the
// operand order of vdpbf16ps, of AMX B tiles, and cheap to widen on AVX2.
// Columns past N in the last panel and rows past K are zero.
//
// A operands are row-major bf16 with a leading dimension lda >= Kp, and the
// element A[m, K] (when K is odd) MUST be zero: kernels read A in pairs.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moetune::kernels {

using bf16 = uint16_t;  // raw bfloat16 bits

// Header helpers are force-inlined: the per-ISA translation units include
// this header with wider -m flags, and an out-of-line (weak) copy emitted
// there could be the one the linker keeps for baseline code, which would
// then fault on a CPU without that ISA (e.g. in an -O0 build).
#define MOETUNE_INLINE inline __attribute__((always_inline))

constexpr int kPanelN = 16;

MOETUNE_INLINE int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
MOETUNE_INLINE int64_t packed_kp(int64_t K) { return round_up(K, 2); }
MOETUNE_INLINE int64_t packed_panels(int64_t N) { return (N + kPanelN - 1) / kPanelN; }
// Number of bf16 elements of a packed [K, N] operand.
MOETUNE_INLINE int64_t packed_elems(int64_t K, int64_t N) {
  return packed_panels(N) * packed_kp(K) * kPanelN;
}

// ---- bf16 <-> fp32 (round to nearest even; NaN stays NaN) ----
MOETUNE_INLINE float bf16_to_f32(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
MOETUNE_INLINE bf16 f32_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<bf16>(u >> 16);
}

// A read-only view of one packed [K, N] operand.
struct PackedB {
  const bf16* data = nullptr;
  int64_t K = 0;
  int64_t N = 0;
  // Elements between panels; 0 means packed_kp(K) * kPanelN (a whole packed
  // operand). Set when viewing a K-range of a larger operand (see k_range).
  int64_t panel_stride = 0;
  MOETUNE_INLINE int64_t kp() const { return packed_kp(K); }
  MOETUNE_INLINE int64_t stride() const { return panel_stride ? panel_stride : kp() * kPanelN; }
  MOETUNE_INLINE const bf16* panel(int64_t p) const { return data + p * stride(); }
};

// Rows [k0, k0 + kc) of a packed operand as an operand of its own (k0 even).
MOETUNE_INLINE PackedB k_range(const PackedB& b, int64_t k0, int64_t kc) {
  return PackedB{b.data + (k0 / 2) * 2 * kPanelN, kc, b.N, b.stride()};
}

// One term of a fused multi-segment GEMM. All segments of a call share M and
// the N range; their K may differ (e.g. H for the base weight, r for LoRA).
struct Segment {
  const bf16* A = nullptr;  // [M, lda], see the padding contract above
  int64_t lda = 0;
  PackedB B;
};

inline constexpr int kMaxSegments = 4;

// The micro-kernel entry point. Computes columns [n_begin, n_end) of C, all
// M rows; n_begin must be a multiple of kPanelN. If accumulate, adds to C,
// else overwrites it (C is never read then, so it may hold NaN poison).
// Thread-safety: pure function of its arguments; callers split N or M.
using GemmFn = void (*)(int64_t M, int64_t n_begin, int64_t n_end, const Segment* segs, int nseg,
                        float* C, int64_t ldc, bool accumulate);

// Packs columns [n_begin, n_end) of the transpose of a packed operand:
// src is packed [K, N]; dst becomes packed [K' = N, n_end - n_begin] holding
// src^T's columns n_begin.. (= src's K rows n_begin..). This is how backward
// gets W^T slices from the forward-packed W without a second copy. Per ISA
// (a bundle member) because it is on the backward hot path.
using TransposeFn = void (*)(const PackedB& src, int64_t n_begin, int64_t n_end, bf16* dst);

// ---- packing (layout-only, ISA-independent; memory bound) ----
// Source element types accepted when packing.
enum class SrcType : int { kBf16 = 0, kF32 = 1 };

// Packs columns [n_begin, n_end) of a logical [K, N] matrix into `dst`
// (packed_elems(K, n_end - n_begin) elements), the panel layout above, with
// every value multiplied by `scale` (1 keeps bf16 input bit-exact).
//   kn = true : source is row-major [K, N] with row stride ld  (B itself)
//   kn = false: source is row-major [N, K] with row stride ld  (B transposed,
//               e.g. an nn.Linear weight [out, in] used as x * W^T)
void pack_b(const void* src, SrcType type, int64_t ld, bool kn, int64_t K, int64_t n_begin,
            int64_t n_end, float scale, bf16* dst);

// dst[c, r] = bf16(scale * src[r, c]) for a row-major [rows, cols] source, dst
// row stride ld_dst >= round_up(rows, 2); pad column `rows` (if odd) zeroed.
// Used to turn token-major activations into A operands whose K is the token
// axis (LoRA weight gradients).
void transpose_to_a(const void* src, SrcType type, int64_t ld_src, int64_t rows, int64_t cols,
                    const float* row_scale, bf16* dst, int64_t ld_dst);

// A view of columns [n_begin, n_begin + n) of a packed operand; n_begin must
// be a multiple of kPanelN (panels are contiguous, so this is pointer math).
MOETUNE_INLINE PackedB packed_slice(const PackedB& b, int64_t n_begin, int64_t n) {
  return PackedB{b.panel(n_begin / kPanelN), b.K, n, b.panel_stride};
}

}  // namespace moetune::kernels
