// moetune engine: the argument structs of one MoE layer's routed experts.
//
// Dimension names: T tokens, H hidden, I expert intermediate, E experts,
// k top-k, r LoRA rank. All arrays are dense row-major; ownership stays with
// the caller. The bindings layer checks shapes/dtypes/contiguity before any of
// this is reached; the engine itself re-checks only what needs the data
// (expert ids).
#pragma once

#include <cstdint>

#include "kernels/gemm.h"
#include "kernels/quant.h"

namespace moetune {

enum class DType : int { kBf16 = 0, kF32 = 1, kI32 = 2, kI64 = 3 };
const char* dtype_name(DType d);

inline kernels::SrcType src_type(DType d) {
  return d == DType::kBf16 ? kernels::SrcType::kBf16 : kernels::SrcType::kF32;
}

// LoRA of one projection, out = W x + scaling * B (A x).
//   A [E, r, in], B [E, out, r]; bf16 or fp32 (each may differ).
// Disabled when A == nullptr: every LoRA computation of that projection is
// skipped, not multiplied by zero.
struct LoraProj {
  const void* A = nullptr;
  const void* B = nullptr;
  DType a_dtype = DType::kF32;
  DType b_dtype = DType::kF32;
  int r = 0;
  bool enabled() const { return A != nullptr; }
};

struct LoraSet {
  LoraProj gate, up, down;
  float scaling = 1.0f;  // alpha / r
  bool any() const { return gate.enabled() || up.enabled() || down.enabled(); }
};

// LoRA weight gradients, fp32, same shapes as the weights; nullptr = not
// wanted. Fully overwritten (experts without tokens get zeros).
struct LoraGrads {
  float* dA_gate = nullptr;
  float* dB_gate = nullptr;
  float* dA_up = nullptr;
  float* dB_up = nullptr;
  float* dA_down = nullptr;
  float* dB_down = nullptr;
};

struct ForwardArgs {
  int64_t T = 0;
  int k = 0;
  const void* x = nullptr;            // [T, H]
  DType x_dtype = DType::kBf16;       // bf16 | f32
  const void* topk_ids = nullptr;     // [T, k]
  DType ids_dtype = DType::kI64;      // i32 | i64
  const void* topk_weights = nullptr; // [T, k]
  DType w_dtype = DType::kF32;        // bf16 | f32
  const uint8_t* expert_mask = nullptr;  // [E] bool, optional: false = expert contributes 0
  LoraSet lora;
  void* out = nullptr;                // [T, H], dtype out_dtype
  DType out_dtype = DType::kBf16;
};

struct BackwardArgs {
  const void* dout = nullptr;         // [T, H]
  DType dout_dtype = DType::kBf16;
  LoraSet lora;                       // the same weights as the forward (unchanged)
  void* dx = nullptr;                 // [T, H] or nullptr
  DType dx_dtype = DType::kBf16;
  void* dtopk_weights = nullptr;      // [T, k] or nullptr
  DType dw_dtype = DType::kF32;
  LoraGrads grads;
};

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
  kSwiGLU = 0,         // silu(g) * u  (Qwen, Mixtral, DeepSeek, GLM, OLMoE)
  kClampedSwiGLU = 1,  // gpt-oss: (clamp(u, -limit, limit) + 1) * gc * sigmoid(alpha gc), gc = min(g, limit)
};

struct ExpertsOptions {
  BackwardWeights backward_weights = BackwardWeights::kRepack;
  ActivationPolicy activations = ActivationPolicy::kSave;
  Activation activation = Activation::kSwiGLU;
  float swiglu_alpha = 1.702f;  // kClampedSwiGLU only (gpt-oss config.swiglu_alpha); finite
  float swiglu_limit = 7.0f;    // kClampedSwiGLU only (gpt-oss config.swiglu_limit); finite, > 0
  // Frozen weight format (kernels/quant.h): bf16, or int8 / int4 quantized at
  // load and dequantized per GEMM task. group_size: int4 only (32, 64, 128).
  kernels::WeightFormat weight_format = kernels::WeightFormat::kBf16;
  int group_size = 0;
  // Rows of one expert per GEMM task (a tuning knob; results do not depend on
  // it). 0 = auto: up to 768 rows where a task prepares data per weight slice
  // (dequantization; the W^T repack in backward), else the routing's blocks
  // of up to 192. Larger groups share that preparation; smaller ones keep the
  // fp32 task buffers in L2 and give more tasks.
  int row_group = 0;
};

}  // namespace moetune
