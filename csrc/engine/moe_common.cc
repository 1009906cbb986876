#include "engine/moe_common.h"

#include <algorithm>
#include <cstring>

namespace moetune::common {

using kernels::bf16;

void row_to_bf16(const kernels::EltwiseKernel& ew, const void* src, DType dtype, int64_t n,
                 bf16* dst) {
  if (dtype == DType::kBf16) {
    std::memcpy(dst, src, n * sizeof(bf16));
  } else {
    ew.to_bf16(static_cast<const float*>(src), 1.0f, dst, n);
  }
}

void store_row(const kernels::EltwiseKernel& ew, const float* src, int64_t n, void* dst,
               DType dtype) {
  if (dtype == DType::kF32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    ew.to_bf16(src, 1.0f, static_cast<bf16*>(dst), n);
  }
}

void gather_token_rows(const kernels::EltwiseKernel& ew, const Routing& rt, int64_t r0, int64_t r1,
                       const void* src, DType dtype, int64_t H, bf16* dst, int64_t ld) {
  const size_t row_bytes = H * esize(dtype);
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t t = rt.slot_of[row] / rt.k;
    bf16* d = dst + row * ld;
    row_to_bf16(ew, static_cast<const char*>(src) + t * row_bytes, dtype, H, d);
    std::fill(d + H, d + ld, bf16(0));
  }
}

void reduce_to_rank(const kernels::KernelBundle& k, const kernels::EltwiseKernel& ew, const void* w,
                    DType w_dtype, bool kn, int64_t K, int64_t r, const bf16* a, int64_t lda,
                    int64_t n, float s, Arena& arena, bf16* out, int64_t ldr) {
  bf16* packed = arena.alloc<bf16>(kernels::packed_elems(K, r));
  kernels::pack_b(w, src_type(w_dtype), kn ? r : K, kn, K, 0, r, 1.0f, packed);
  kernels::Segment seg{a, lda, kernels::PackedB{packed, K, r}};
  float* c = arena.alloc<float>(n * r);
  k.gemm(n, 0, r, &seg, 1, c, r, false);
  for (int64_t m = 0; m < n; ++m) {
    bf16* row = out + m * ldr;
    ew.to_bf16(c + m * r, s, row, r);
    std::fill(row + r, row + ldr, bf16(0));
  }
}

}  // namespace moetune::common
