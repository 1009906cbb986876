// Shared helpers of the quantized-format kernel tests (test_kernels_quant.cc,
// test_kernels_avx512bf16_emulated.cc): operands written directly as codes
// and scales, and the obvious reference of the fused dequantize-and-transpose.
#pragma once

#include <cfloat>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/kernel_bundle.h"
#include "kernels/quant.h"

namespace moetune::kernel_test {

namespace mk = moetune::kernels;

// Codes and scales written directly (not quantized): random codes (every
// byte value); scales normal, or at the edges of each SIMD conversion (zero,
// FLT_MIN, around 2^-117 where products of the smallest codes turn denormal,
// around 2^100, products that overflow to inf; e8m0 codes below 10).
// variant 0: normal scales only; 1: about one in five an edge; 2: edges only.
struct Crafted {
  std::vector<uint8_t> q;
  std::vector<uint8_t> s;  // scale bytes (fp32 or e8m0)
  mk::QuantB view(const mk::QuantSpec& spec, int64_t K, int64_t N) const {
    return mk::QuantB{spec, q.data(), s.data(), K, N};
  }
};
inline Crafted craft(const mk::QuantSpec& spec, int64_t K, int64_t N, int variant, uint64_t seed) {
  std::mt19937_64 g(seed);
  Crafted c;
  c.q.resize(mk::quant_q_bytes(spec, K, N));
  for (uint8_t& b : c.q) b = uint8_t(g());
  const int64_t count = mk::quant_scale_count(spec, K, N);
  c.s.resize(count * mk::quant_scale_bytes_each(spec.format));
  const float normal[] = {1e-3f, 0.5f, 3.0f, 0x1p-117f, 0x1p100f, -0.25f, 0x1p-40f, 7.0f};
  const float edge[] = {0.0f, FLT_MIN, 0x1p-118f, 0x1p-125f, 0x1p101f, 0x1p120f, FLT_MAX};
  const uint8_t e8_normal[] = {10, 11, 50, 120, 127, 130, 200, 254};
  const uint8_t e8_edge[] = {0, 1, 2, 5, 9};
  for (int64_t j = 0; j < count; ++j) {
    const bool take_edge = variant == 2 || (variant == 1 && g() % 5 == 0);
    if (spec.format == mk::WeightFormat::kMxfp4) {
      c.s[j] = take_edge ? e8_edge[g() % 5] : e8_normal[g() % 8];
    } else {
      const float v = take_edge ? edge[g() % 7] : normal[g() % 8];
      std::memcpy(&c.s[4 * j], &v, 4);
    }
  }
  return c;
}

// Rows [k0, k1) of dq(B), transposed: the scalar dequant, then the scalar W^T repack.
inline std::vector<mk::bf16> dequant_t_reference(const mk::QuantB& qb, int64_t k0, int64_t k1) {
  const mk::KernelBundle& s = mk::kernels_for(mk::Isa::kScalar);
  std::vector<mk::bf16> rows(mk::packed_elems(k1 - k0, qb.N)),
      out(mk::packed_elems(qb.N, k1 - k0), 0xFFFF);
  s.dequant(qb, 0, qb.N, k0, k1, rows.data());
  s.transpose_packed(mk::PackedB{rows.data(), k1 - k0, qb.N}, 0, k1 - k0, out.data());
  return out;
}

}  // namespace moetune::kernel_test
