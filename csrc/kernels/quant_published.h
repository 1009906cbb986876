// moetune kernels: published quantized checkpoints' codes and scales taken
// as they are (no re-quantization) into the engine's packed layouts
// (quant.h). The values are the published ones bit for bit: every code byte
// is moved, never decoded and re-encoded; scales are copied (bf16 scales
// widened to fp32, exactly).
//
// Sources, per [out = N, in = K] weight in HF rows (row n = output channel):
//   fp8_block  codes: e4m3fn bytes [N, K] (row stride code_ld bytes);
//              scales: fp32 or bf16 `weight_scale_inv` [ceil(N/128), ceil(K/128)]
//              (row stride scale_ld elements). DeepSeek-V3 / Qwen3-FP8.
//   mxfp4      codes: bytes [N, K/2], byte j = code(2j) | code(2j+1) << 4
//              (gpt-oss `*_blocks` [..., K/32, 16] flattened per row);
//              scales: e8m0 bytes [N, K/32] (gpt-oss `*_scales`).
//   int4       codes: bytes [N, K/2], byte j = (q(2j) + 8) | (q(2j+1) + 8) << 4:
//              compressed-tensors pack-quantized int32 words [N, K/8] read as
//              little-endian bytes (its nibble i of word w is input 8w + i);
//              scales: bf16 or fp32 `weight_scale` [N, ceil(K/G)], G = spec.group_size.
// In the 4-bit formats the engine's packed byte (row pair kk, column n) is the
// published byte (n, kk): the repack is a byte transpose.
//
// Checks (std::invalid_argument naming `what`, the element and the value):
// K even for the 4-bit formats; fp8 codes not NaN (0x7f / 0xff); fp32 / bf16
// scales finite; e8m0 scales not NaN (0xff).
#pragma once

#include <cstdint>
#include <string>

#include "quant.h"

namespace moetune::kernels {

enum class ScaleSrc : int { kF32 = 0, kBf16 = 1, kE8m0 = 2 };
const char* scale_src_name(ScaleSrc s);  // "float32" | "bfloat16" | "uint8 (e8m0)"

// The published scale tensor's [rows, cols] for a [K, N] operand of `spec`
// (fp8_block: blocks; mxfp4 / int4: [N, groups]) and whether `s` may feed it.
struct PublishedScaleShape {
  int64_t rows, cols;
};
PublishedScaleShape published_scale_shape(const QuantSpec& spec, int64_t K, int64_t N);
// Bytes of one row of the published codes [N, ...]: K (fp8) or K / 2 (4-bit).
int64_t published_code_row_bytes(const QuantSpec& spec, int64_t K);
bool scale_src_ok(const QuantSpec& spec, ScaleSrc s);

// Writes q (quant_q_bytes) and scales (quant_scale_bytes) of the [K, N]
// operand from published codes / scales (layouts above). Scalar; once per
// weight at load.
void pack_published(const QuantSpec& spec, int64_t K, int64_t N, const uint8_t* codes,
                    int64_t code_ld, const void* scales, ScaleSrc scale_src, int64_t scale_ld,
                    uint8_t* q, void* q_scales, const std::string& what);

}  // namespace moetune::kernels
