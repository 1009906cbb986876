// moetune kernels: weight-only quantized formats for frozen [K, N] operands:
// INT8 / INT4 (moetune's own, quantized here at load) and the published
// FP8_BLOCK / MXFP4 (codes and scales as checkpoints ship them, repacked by
// quant_published.h; also quantized here from bf16 on request). The format
// table (weight_format.h) gives each one's code bits, scale bytes and groups.
//
// Weights are quantized once at load (scalar code, the oracle) into a packed
// layout built for the bf16 GEMM: a GEMM task dequantizes the panel slice it
// is about to use into a bf16 packed operand (gemm.h layout) in its arena and
// hands it to the ISA's unchanged bf16 GEMM. Activations and gradients stay
// bf16; only the weights change. Every ISA's dequant gives bit-identical bf16
// panels (the scalar one is the oracle), so every GEMM kernel sees the same
// operand values.
//
// Quantization (symmetric, no zero point), per logical [K, N] operand whose
// column n is one output channel (row n of an HF [out, in] weight):
//   INT8: one scale per column:            s_n    = amax(|w[:, n]|) / 127
//   INT4: one scale per column and group   s_n,g  = amax(|w[g*G : (g+1)*G, n]|) / 7
//         of G consecutive K (G = group_size in {32, 64, 128}; the last group
//         of a K that is not a multiple of G is shorter and uses its own amax).
//   q = clamp(nearbyint(w / s), -Q, Q)  (Q = 127 or 7; round half to even);
//   s = 0 (all-zero group, or amax below Q * FLT_MIN) gives q = 0.
//   dq = bf16(q * s): the product in fp32 (exact IEEE multiply), rounded to
//   nearest even. Hence |w - q s| <= s/2 (+ 2^-24 |w| from the fp32 w / s)
//   and |w - dq| <= that + 2^-8 |q s|
//   (the second term is bf16's unit roundoff; up to s/4 for int8's |q| = 127,
//   s/73 for int4).
//
// Packed layout (per operand; N in panels of 16 columns as in gemm.h, K padded
// to even Kp, packed row kk = the K pair (2kk, 2kk+1)):
//   INT8: panel p, row kk is 32 bytes: q(2kk, 16p + c) for c = 0..15, then
//         q(2kk + 1, 16p + c) for c = 0..15 (int8). Panel stride Kp * 16 bytes.
//   INT4: panel p, row kk is 16 bytes: byte c = (q(2kk, c) + 8) | (q(2kk+1, c) + 8) << 4.
//         Panel stride Kp * 8 bytes.
//   scales (fp32): panel p, group g, column c at (p * groups + g) * 16 + c,
//         groups = 1 for INT8, ceil(K / G) for INT4. Pad columns/rows hold q = 0
//         and scale 0 (so they dequantize to +0, as pack_b's zero padding).
// A column range starting on a panel is pointer math (quant_slice), like
// packed_slice for bf16.
//
// FP8_BLOCK: the INT8 layout with e4m3fn codes; fp32 inverse scales, one per
//   panel and group of 128 K (a 128 x 128 block spans 8 panels, each holding
//   its copy): panel p, group g at p * groups + g. dq = bf16(e4m3(c) * s).
//   Quantized from bf16 here: s = amax(block) / 448, c = e4m3(w / s) (RNE).
// MXFP4: the INT4 layout with e2m1 codes as the nibbles (no offset); e8m0
//   scales (1 byte) per panel, group of 32 K and column:
//   (p * groups + g) * 16 + c. dq = bf16(e2m1(c) * 2^(s - 127)).
//   Quantized from bf16 here as the OCP MX reference does: s = floor(log2
//   amax) - 2 + 127, c = e2m1(w / 2^(s - 127)) (RNE, saturating at 6).
// Pad columns / rows of both hold code 0 and scale 0 (fp8) / code 0 (mxfp4),
// which dequantize to +0.
#pragma once

#include <cstdint>
#include <string>

#include "gemm.h"
#include "weight_format.h"

namespace moetune::kernels {

// Version of the packed weight layouts (gemm.h panels, the quantized layout
// below). Bump it whenever either changes: disk caches of packed experts
// record it and are rebuilt on a mismatch.
inline constexpr int kPackedLayoutVersion = 1;  // (new formats add layouts, change none)
const char* weight_format_name(WeightFormat f);

// The format plus its group size (INT4 only; 0 otherwise: the other formats'
// groups are fixed by the table).
struct QuantSpec {
  WeightFormat format = WeightFormat::kBf16;
  int group_size = 0;
};
// Throws std::invalid_argument naming the problem (a format outside the
// table, group size not in {32, 64, 128} for INT4, or given for another format).
void check_quant_spec(const QuantSpec& spec);

MOETUNE_INLINE int quant_qmax(WeightFormat f) { return f == WeightFormat::kInt8 ? 127 : 7; }
// Inputs (K) per scale group of a validated spec: K itself for whole-column formats.
MOETUNE_INLINE int64_t quant_group_k(const QuantSpec& s, int64_t K) {
  const int g = weight_format_info(s.format).group_k;
  return g == kGroupOption ? s.group_size : (g == kGroupWholeK ? (K > 0 ? K : 1) : g);
}
MOETUNE_INLINE int64_t quant_groups(const QuantSpec& s, int64_t K) {
  const int64_t G = quant_group_k(s, K);
  return (K + G - 1) / G > 0 ? (K + G - 1) / G : 1;
}
// Scales per panel and group: one per column, or one for the whole panel
// (formats whose scale spans several panels' columns).
MOETUNE_INLINE int64_t quant_scale_cols(WeightFormat f) {
  return weight_format_info(f).group_n == 1 ? kPanelN : 1;
}
MOETUNE_INLINE int64_t quant_scale_bytes_each(WeightFormat f) {
  return weight_format_info(f).scale_bytes;
}
// Bytes of packed q values of one [K, N] operand, and its scale count / bytes.
MOETUNE_INLINE int64_t quant_row_bytes(WeightFormat f) {
  return weight_format_info(f).code_bits == 8 ? 32 : 16;
}
MOETUNE_INLINE int64_t quant_panel_bytes(WeightFormat f, int64_t K) {
  return packed_kp(K) / 2 * quant_row_bytes(f);
}
MOETUNE_INLINE int64_t quant_q_bytes(const QuantSpec& s, int64_t K, int64_t N) {
  return packed_panels(N) * quant_panel_bytes(s.format, K);
}
MOETUNE_INLINE int64_t quant_scale_count(const QuantSpec& s, int64_t K, int64_t N) {
  return packed_panels(N) * quant_groups(s, K) * quant_scale_cols(s.format);
}
MOETUNE_INLINE int64_t quant_scale_bytes(const QuantSpec& s, int64_t K, int64_t N) {
  return quant_scale_count(s, K, N) * quant_scale_bytes_each(s.format);
}

// ---- value-level oracle (what every packed layout and kernel must match) ----
// Scale of a group with the given amax (see the header comment).
float quant_scale(float amax, WeightFormat f);
// q for one weight w with scale s.
int quantize_value(float w, float s, WeightFormat f);
MOETUNE_INLINE bf16 dequant_value(int q, float s) { return f32_to_bf16(static_cast<float>(q) * s); }
// Every format: the fp32 value of one stored code (int8: the byte as int8;
// int4: nibble - 8; fp8_block: e4m3fn; mxfp4: e2m1) and of one stored scale
// (fp32, or e8m0), and dq = bf16(code value * scale value).
float quant_code_value(uint8_t code, WeightFormat f);
float quant_scale_value(const uint8_t* scale, WeightFormat f);
MOETUNE_INLINE bf16 dequant_code(uint8_t code, const uint8_t* scale, WeightFormat f) {
  return f32_to_bf16(quant_code_value(code, f) * quant_scale_value(scale, f));
}

// A read-only view of one quantized [K, N] operand (or a column range of one).
struct QuantB {
  QuantSpec spec;
  const uint8_t* q = nullptr;
  const void* scales = nullptr;  // fp32 or e8m0 bytes (the format's ScaleType)
  int64_t K = 0;
  int64_t N = 0;
  MOETUNE_INLINE int64_t groups() const { return quant_groups(spec, K); }
  MOETUNE_INLINE const uint8_t* panel_q(int64_t p) const {
    return q + p * quant_panel_bytes(spec.format, K);
  }
  // Panel p's scales (groups() x quant_scale_cols), as bytes and as fp32
  // (fp32-scale formats only).
  MOETUNE_INLINE const uint8_t* panel_scale_bytes(int64_t p) const {
    return static_cast<const uint8_t*>(scales) +
           p * groups() * quant_scale_cols(spec.format) * quant_scale_bytes_each(spec.format);
  }
  MOETUNE_INLINE const float* panel_scales(int64_t p) const {
    return reinterpret_cast<const float*>(panel_scale_bytes(p));
  }
};

// Columns [n_begin, n_begin + n) as an operand of its own (n_begin % 16 == 0).
MOETUNE_INLINE QuantB quant_slice(const QuantB& b, int64_t n_begin, int64_t n) {
  QuantB s = b;
  s.q = b.panel_q(n_begin / kPanelN);
  s.scales = b.panel_scale_bytes(n_begin / kPanelN);
  s.N = n;
  return s;
}

// Quantizes a logical [K, N] operand given as HF rows: source row-major
// [N, K] (row n = output channel n) with row stride ld, bf16 or fp32, into
// `q` (quant_q_bytes) and `scales` (quant_scale_bytes). Scalar, the oracle;
// runs once per weight at load. Non-finite weights throw std::invalid_argument
// (`what` names the tensor in the message).
void quantize_pack(const void* src, SrcType type, int64_t ld, int64_t K, int64_t N,
                   const QuantSpec& spec, uint8_t* q, void* scales, const std::string& what);

// Dequantizes rows [k0, k1) (k0 even) of columns [n_begin, n_end) (n_begin a
// multiple of 16) of a quantized operand into a bf16 packed operand
// [K = k1 - k0, N = n_end - n_begin] (gemm.h layout, packed_elems elements,
// pads zeroed). Pure function of its arguments. Per ISA: a member of the
// kernel bundle (kernel_bundle.h); every ISA's is bit-identical to the
// scalar one.
using DequantFn = void (*)(const QuantB& src, int64_t n_begin, int64_t n_end, int64_t k0,
                           int64_t k1, bf16* dst);

// Dequantizes rows [k0, k1) (k0 even) of every column of a quantized [K, N]
// operand into their transpose, a bf16 packed operand [K' = N, N' = k1 - k0]
// (gemm.h layout, packed_elems(N, k1 - k0) elements, pads zeroed): exactly
// the bundle's transpose_packed of DequantFn's [k1 - k0, N] panel, without
// the panel (the backward's W^T slices). Pure function of its arguments. A
// kernel bundle member where the ISA has one, else nullptr (kernel_bundle.h).
using DequantTFn = void (*)(const QuantB& src, int64_t k0, int64_t k1, bf16* dst);

// A GEMM that dequantizes inside (a kernel bundle member where the ISA has
// one, else nullptr; kernel_bundle.h). Computes, overwriting C,
//     C[M, n_begin:n_end] = A * dq(B)[:, n_begin:n_end] + sum_s segs[s].A * segs[s].B
// (A: [M, lda] with the gemm.h padding contract for B.K; segs: nseg <
// kMaxSegments bf16 segments covering the same columns, e.g. a LoRA expand;
// n_begin a multiple of 16, n_end <= B.N), bit-identical to dequantizing
// B's columns into a bf16 panel (DequantFn) and running the same bundle's
// GemmFn on the segments {A, panel}, segs... with accumulate = false: every
// C element sees the same bf16 products in the same fp32 order.
// Thread-safety: pure function of its arguments.
using QuantGemmFn = void (*)(int64_t M, int64_t n_begin, int64_t n_end, const bf16* A, int64_t lda,
                             const QuantB& B, const Segment* segs, int nseg, float* C, int64_t ldc);

}  // namespace moetune::kernels
