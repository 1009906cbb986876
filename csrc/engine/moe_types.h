// moetune engine: the argument structs of one MoE layer's routed experts
// (their options: experts_options.h).
//
// Dimension names: T tokens, H hidden, I expert intermediate, E experts,
// k top-k, r LoRA rank. All arrays are dense row-major; ownership stays with
// the caller. The bindings layer checks shapes/dtypes/contiguity before any of
// this is reached; the engine itself re-checks only what needs the data
// (expert ids).
#pragma once

#include <cstdint>

#include "engine/experts_options.h"
#include "kernels/gemm.h"

namespace moetune {

enum class DType : int { kBf16 = 0, kF32 = 1, kI32 = 2, kI64 = 3, kU8 = 4 };
const char* dtype_name(DType d);

inline kernels::SrcType src_type(DType d) {
  return d == DType::kBf16 ? kernels::SrcType::kBf16 : kernels::SrcType::kF32;
}

// The three projections of a gated expert. As forward GEMM operands [K, N]
// (K = in, N = out): gate, up [H, I]; down [I, H]. HF stores each [out, in].
enum class Proj : int { kGate = 0, kUp = 1, kDown = 2 };
inline constexpr Proj kAllProjs[] = {Proj::kGate, Proj::kUp, Proj::kDown};
inline constexpr int idx(Proj p) { return static_cast<int>(p); }
const char* proj_name(Proj p);  // "gate" | "up" | "down"

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
  const LoraProj& operator[](Proj p) const {
    return p == Proj::kGate ? gate : p == Proj::kUp ? up : down;
  }
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
  float* dA(Proj p) const { return p == Proj::kGate ? dA_gate : p == Proj::kUp ? dA_up : dA_down; }
  float* dB(Proj p) const { return p == Proj::kGate ? dB_gate : p == Proj::kUp ? dB_up : dB_down; }
};

struct ForwardArgs {
  int64_t T = 0;
  int k = 0;
  const void* x = nullptr;               // [T, H]
  DType x_dtype = DType::kBf16;          // bf16 | f32
  const void* topk_ids = nullptr;        // [T, k]
  DType ids_dtype = DType::kI64;         // i32 | i64
  const void* topk_weights = nullptr;    // [T, k]
  DType w_dtype = DType::kF32;           // bf16 | f32
  const uint8_t* expert_mask = nullptr;  // [E] bool, optional: false = expert contributes 0
  LoraSet lora;
  void* out = nullptr;  // [T, H], dtype out_dtype
  DType out_dtype = DType::kBf16;
};

struct BackwardArgs {
  const void* dout = nullptr;  // [T, H]
  DType dout_dtype = DType::kBf16;
  LoraSet lora;        // the same weights as the forward (unchanged)
  void* dx = nullptr;  // [T, H] or nullptr
  DType dx_dtype = DType::kBf16;
  void* dtopk_weights = nullptr;  // [T, k] or nullptr
  DType dw_dtype = DType::kF32;
  LoraGrads grads;
};

}  // namespace moetune
