// Private to the engine: pieces the forward and backward passes share.
#pragma once

#include <cstdint>

#include "engine/arena.h"
#include "engine/moe_types.h"
#include "engine/routing.h"
#include "kernels/eltwise.h"
#include "kernels/gemm.h"
#include "kernels/kernel_bundle.h"

namespace moetune::common {

// Token rows per task of the per-token loops (gathers, combines).
inline constexpr int64_t kTokenBlock = 64;

inline size_t esize(DType d) { return d == DType::kBf16 ? 2 : 4; }

// n values of an fp32 or bf16 row as bf16 (fp32 rounded by the ISA's kernel).
void row_to_bf16(const kernels::EltwiseKernel& ew, const void* src, DType dtype, int64_t n,
                 kernels::bf16* dst);

// Stores an fp32 row into an output of dtype f32 or bf16.
void store_row(const kernels::EltwiseKernel& ew, const float* src, int64_t n, void* dst,
               DType dtype);

// Expert-major rows [r0, r1) as bf16 A-operand rows (zero-padded to ld),
// each copied from its token's row of a token-major [T, H] source.
void gather_token_rows(const kernels::EltwiseKernel& ew, const Routing& rt, int64_t r0, int64_t r1,
                       const void* src, DType dtype, int64_t H, kernels::bf16* dst, int64_t ld);

// out[m, :] = bf16(s * (a[m, :K] * W)) for n rows, where W is one expert's
// rank-side LoRA factor used as a [K, r] operand: stored [r, K] (kn = false,
// LoRA A in the reduce x -> A x) or [K, r] (kn = true, LoRA B in the
// backward reduce g -> B^T g). Rows of out are zero-padded to ldr.
void reduce_to_rank(const kernels::KernelBundle& k, const kernels::EltwiseKernel& ew, const void* w,
                    DType w_dtype, bool kn, int64_t K, int64_t r, const kernels::bf16* a,
                    int64_t lda, int64_t n, float s, Arena& arena, kernels::bf16* out, int64_t ldr);

}  // namespace moetune::common
