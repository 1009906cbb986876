// moetune kernels: THE table of frozen expert weight formats. Everything else
// derives from it: the WeightFormat enum's names, the bytes per weight code and
// per scale, the group shape of a scale (quant.h's sizes and layouts, the
// engine's host_bytes), the option names Python sees (`moetune.weight_formats()`,
// `ExpertsOptions.weight_format`) and the GPU decoder's sizes
// (python/moetune/placement/formats.py reads this table through the bindings).
//
// A quantized weight is codes + scales; the value of one weight is
// dq = bf16(decode(code) * decode(scale)), the product in fp32 rounded to
// nearest even (quant.h). Per format:
//   bf16       the weights themselves (no codes, no scales)
//   int8       int8 codes, fp32 scale per output channel (moetune's own)
//   int4       int4 codes stored as nibble = q + 8 (q in [-8, 7]), fp32 scale
//              per output channel and group of `group_size` inputs (32 / 64 /
//              128). Also what compressed-tensors "pack-quantized" symmetric
//              INT4 checkpoints (Kimi-K2) hold, bit-exactly: their int32 words
//              are 8 nibbles q + 8, lowest nibble = lowest input, bf16 scales
//              (widened to fp32 exactly); quant_published.h.
//   fp8_block  e4m3fn codes (OCP FP8, 448 max, no infinities), fp32 inverse
//              scale per 128 x 128 block of the [out, in] weight (DeepSeek-V3,
//              Qwen3-FP8 `weight_scale_inv`); stored once per 16-column panel.
//   mxfp4      e2m1 codes (OCP MX FP4: 0, 0.5, 1, 1.5, 2, 3, 4, 6, sign bit
//              3), e8m0 scale (2^(s - 127)) per output channel and 32 inputs
//              (gpt-oss `*_blocks` / `*_scales`).
#pragma once

#include <cstdint>

namespace moetune::kernels {

enum class WeightFormat : int { kBf16 = 0, kInt8 = 1, kInt4 = 2, kFp8Block = 3, kMxfp4 = 4 };

// How a scale is stored.
enum class ScaleType : int { kNone = 0, kF32 = 1, kE8m0 = 2 };

// group_k values with a meaning beyond a count of inputs.
inline constexpr int kGroupWholeK = 0;   // one group spans all K (per output channel)
inline constexpr int kGroupOption = -1;  // the ExpertsOptions group_size (int4)

struct WeightFormatInfo {
  WeightFormat format;
  const char* name;       // the option value users pass ("fp8_block")
  int code_bits;          // bits of one stored weight code (16: bf16 itself)
  ScaleType scale_type;   // kNone for bf16
  int scale_bytes;        // bytes of one stored scale (0 for bf16)
  int group_k;            // inputs (K) sharing one scale: a count, kGroupWholeK or kGroupOption
  int group_n;            // outputs (N) sharing one scale: 1 (per channel) or a multiple of 16
  const char* published;  // the checkpoints that publish it (for `moetune info` and docs)
};

inline constexpr WeightFormatInfo kWeightFormats[] = {
    {WeightFormat::kBf16, "bf16", 16, ScaleType::kNone, 0, kGroupWholeK, 1,
     "unquantized checkpoints"},
    {WeightFormat::kInt8, "int8", 8, ScaleType::kF32, 4, kGroupWholeK, 1,
     "moetune's own (quantized at load)"},
    {WeightFormat::kInt4, "int4", 4, ScaleType::kF32, 4, kGroupOption, 1,
     "moetune's own (quantized at load); compressed-tensors pack-quantized INT4 (Kimi-K2)"},
    {WeightFormat::kFp8Block, "fp8_block", 8, ScaleType::kF32, 4, 128, 128,
     "block FP8 e4m3 (DeepSeek-V3, Qwen3-FP8)"},
    {WeightFormat::kMxfp4, "mxfp4", 4, ScaleType::kE8m0, 1, 32, 1, "MXFP4 e2m1 (gpt-oss)"},
};
inline constexpr int kNumWeightFormats = sizeof(kWeightFormats) / sizeof(kWeightFormats[0]);

constexpr bool weight_format_table_ok() {
  for (int i = 0; i < kNumWeightFormats; ++i) {
    const WeightFormatInfo& w = kWeightFormats[i];
    if (static_cast<int>(w.format) != i) return false;        // indexed by the enum
    if (w.group_n != 1 && w.group_n % 16 != 0) return false;  // whole panels share a scale
    if (w.group_k > 0 && w.group_k % 2 != 0) return false;    // a packed K pair shares a scale
    if ((w.scale_type == ScaleType::kNone) != (w.scale_bytes == 0)) return false;
  }
  return true;
}
static_assert(weight_format_table_ok(), "weight_format.h: bad kWeightFormats row");

// The row of a format; nullptr for a value outside the enum.
constexpr const WeightFormatInfo* find_weight_format(WeightFormat f) {
  const int i = static_cast<int>(f);
  return i >= 0 && i < kNumWeightFormats ? &kWeightFormats[i] : nullptr;
}
// The row of a valid format (callers validated it: check_quant_spec).
constexpr const WeightFormatInfo& weight_format_info(WeightFormat f) {
  return kWeightFormats[static_cast<int>(f)];
}

}  // namespace moetune::kernels
