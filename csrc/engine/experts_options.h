// moetune engine: the options of one layer's routed experts — the one
// definition of each option, its default and its validation.
//
// Everything else derives from this file: the bindings expose the struct and
// its enums to Python (value names = option_name below), the Python
// `moetune.ExpertsOptions` reads its defaults from there, and the engine
// sizes its buffers from it (WeightStore::bytes_for). Options here describe
// the packed bytes and the math of the experts; where the experts run
// (placement) is not one of them.
#pragma once

#include <cstdint>

#include "kernels/quant.h"

namespace moetune {

enum class BackwardWeights : int {
  kRepack = 0,          // 1x memory: transpose slices of the packed weights per backward task
  kTransposedCopy = 1,  // 2x memory: a second packed copy in the transposed orientation
};

enum class ActivationPolicy : int {
  kSave = 0,       // keep gate/up pre-activations (bf16) from forward for backward
  kRecompute = 1,  // recompute them in backward (less memory, one more pass of gate/up GEMMs)
};

// The experts' gated activation h(g, u) (see moe_experts.h for the math).
enum class Activation : int {
  kSwiGLU = 0,  // silu(g) * u  (Qwen, Mixtral, DeepSeek, GLM, OLMoE)
  kClampedSwiGLU =
      1,  // gpt-oss: (clamp(u, -limit, limit) + 1) * gc * sigmoid(alpha gc), gc = min(g, limit)
};

// How a GEMM task multiplies by quantized weights (a speed knob: results are
// bit-identical either way; kernels/quant.h).
enum class DequantPath : int {
  kPanels = 0,  // dequantize a column slice into a bf16 panel, then the bf16 GEMM
  kTiles = 1,   // the ISA's fused kernel dequantizes each K block right before its
                // tiles use it (AMX; kernels/quant.h QuantGemmFn); kPanels where the ISA has none
};

using kernels::WeightFormat;  // bf16 | int8 | int4 | fp8_block | mxfp4 (kernels/weight_format.h)

// Every value of each option enum, and its name: the spelling Python users
// pass ("repack", "gpt_oss", "int4", ...) and error messages print. A value
// outside these lists is invalid (validate() says which option).
inline constexpr BackwardWeights kAllBackwardWeights[] = {BackwardWeights::kRepack,
                                                          BackwardWeights::kTransposedCopy};
inline constexpr ActivationPolicy kAllActivationPolicies[] = {ActivationPolicy::kSave,
                                                              ActivationPolicy::kRecompute};
inline constexpr Activation kAllActivations[] = {Activation::kSwiGLU, Activation::kClampedSwiGLU};
inline constexpr DequantPath kAllDequantPaths[] = {DequantPath::kPanels, DequantPath::kTiles};
inline constexpr WeightFormat kAllWeightFormats[] = {WeightFormat::kBf16, WeightFormat::kInt8,
                                                     WeightFormat::kInt4, WeightFormat::kFp8Block,
                                                     WeightFormat::kMxfp4};
static_assert(sizeof(kAllWeightFormats) / sizeof(WeightFormat) == kernels::kNumWeightFormats,
              "kAllWeightFormats lists every row of kernels/weight_format.h");
const char* option_name(BackwardWeights v);   // "repack" | "transposed_copy"
const char* option_name(ActivationPolicy v);  // "save" | "recompute"
const char* option_name(Activation v);        // "swiglu" | "gpt_oss"
const char* option_name(DequantPath v);       // "panels" | "tiles"
inline const char* option_name(WeightFormat v) { return kernels::weight_format_name(v); }

// The int4 group size used when none is given; 0 for formats without groups.
// (The C++ struct below has no "unset" value: its group_size must be valid
// for its format; Python fills it in from here when the user gives none.)
inline constexpr int kDefaultInt4GroupSize = 128;
inline int default_group_size(WeightFormat f) {
  return f == WeightFormat::kInt4 ? kDefaultInt4GroupSize : 0;
}

struct ExpertsOptions {
  BackwardWeights backward_weights = BackwardWeights::kRepack;
  ActivationPolicy activations = ActivationPolicy::kSave;
  Activation activation = Activation::kSwiGLU;
  // kClampedSwiGLU's constants (gpt-oss config.swiglu_alpha / swiglu_limit);
  // unused by kSwiGLU but still validated (finite; limit > 0).
  float swiglu_alpha = 1.702f;
  float swiglu_limit = 7.0f;
  // Frozen weight format (kernels/weight_format.h): bf16; int8 / int4
  // quantized at load; fp8_block / mxfp4 (and int4) also as published
  // (load_expert_published); all dequantized per GEMM task. group_size: int4
  // only (32, 64, 128; default_group_size), 0 for the other formats.
  WeightFormat weight_format = WeightFormat::kBf16;
  int group_size = 0;
  // Rows of one expert per GEMM task (a tuning knob; results do not depend on
  // it). 0 = auto: up to 768 rows where a task prepares data per weight slice
  // (dequantization; the W^T repack in backward), else the routing's blocks
  // of up to 192. Larger groups share that preparation; smaller ones keep the
  // fp32 task buffers in L2 and give more tasks.
  int row_group = 0;
  // Quantized formats only, speed knobs (results do not depend on them):
  // the dequantization path, and the columns per dequantized slice of the
  // panels path (and of the backward's W^T slices): 0 = auto (the kernel
  // bundle's L2 budget for the operand's K: kernels/kernel_bundle.h), else a
  // multiple of 16. The default path stays kPanels until the fused AMX kernel
  // is confirmed on AMX hardware.
  DequantPath dequant_path = DequantPath::kPanels;
  int dequant_cols = 0;

  // Throws std::invalid_argument naming the first bad option and its value
  // (unknown enum value, non-finite alpha / limit or limit <= 0, group size
  // not valid for the format, row_group < 0, dequant_cols < 0 or not a
  // multiple of 16).
  void validate() const;
  kernels::QuantSpec quant_spec() const { return kernels::QuantSpec{weight_format, group_size}; }
  bool operator==(const ExpertsOptions& o) const;
  bool operator!=(const ExpertsOptions& o) const { return !(*this == o); }
};

}  // namespace moetune
