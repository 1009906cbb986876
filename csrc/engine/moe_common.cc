#include "engine/moe_common.h"

#include <algorithm>
#include <cstring>

namespace moetune::common {

using kernels::bf16;

void gather_token_rows(const Routing& rt, int64_t r0, int64_t r1, const void* src, DType dtype,
                       int64_t H, bf16* dst, int64_t ld) {
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t t = rt.slot_of[row] / rt.k;
    bf16* d = dst + row * ld;
    if (dtype == DType::kBf16) {
      std::memcpy(d, static_cast<const bf16*>(src) + t * H, H * sizeof(bf16));
    } else {
      const float* s = static_cast<const float*>(src) + t * H;
      for (int64_t h = 0; h < H; ++h) d[h] = kernels::f32_to_bf16(s[h]);
    }
    std::fill(d + H, d + ld, bf16(0));
  }
}

void reduce_to_rank(const kernels::GemmKernel& k, const kernels::EltwiseKernel& ew,
                    const void* w, DType w_dtype, bool kn, int64_t K, int64_t r, const bf16* a,
                    int64_t lda, int64_t n, float s, Arena& arena, bf16* out, int64_t ldr) {
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
