// Private to the engine: leading dimensions and work chunking shared by the
// forward and backward passes.
#pragma once

#include <cstdint>

#include "kernels/gemm.h"

namespace moetune::layout {

// Task granularity along N (columns of I or H): a multiple of 32 so chunks
// start on panel pairs; small enough that a 16-core machine gets several
// tasks per expert even at Qwen3-30B shapes (I = 768 -> 3 chunks).
inline constexpr int64_t kChunk = 256;

inline int64_t chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }
// Row stride of a bf16 A-operand buffer with K columns (even, 64-byte rows).
inline int64_t ld_bf16(int64_t K) { return kernels::round_up(K, 32); }
inline int64_t ld_tok(int64_t n) { return kernels::round_up(n, 2); }

// Context workspace slots (each a grow-only buffer reused across jobs).
enum Slot : int {
  kWsX = 0,
  kWsG,
  kWsU,
  kWsH,
  kWsY,
  kWsDout,
  kWsQ,
  kWsDg,
  kWsDu,
  kWsDwPart,
  kWsPg,
  kWsPu,
  kWsDx
};

}  // namespace moetune::layout
