// moetune kernels: the small float codes of the published quantized formats
// (weight_format.h), decoded and encoded element by element. Scalar, the
// oracle of every SIMD decoder (dequant_*.cc); always inlined (gemm.h's
// MOETUNE_INLINE: per-ISA units include this).
//   e4m3fn (OCP FP8 E4M3): sign, 4 exponent bits (bias 7), 3 mantissa bits;
//          subnormals 2^-6 * m/8; max 448; 0x7f / 0xff are NaN, no infinity.
//   e2m1   (OCP MX FP4): sign (bit 3), 2 exponent bits (bias 1), 1 mantissa
//          bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6.
//   e8m0   (OCP MX scale): 2^(s - 127); 0xff is NaN.
// Every finite code decodes exactly to fp32. Encoding rounds to nearest,
// ties to the even code (the code whose last bit is 0), saturating at the
// largest finite value: what torch's float8_e4m3fn cast and the OCP MX
// reference quantizer do for in-range values.
#pragma once

#include <cmath>
#include <cstdint>

#include "gemm.h"

namespace moetune::kernels {

inline constexpr float kE4m3Max = 448.0f;
inline constexpr float kE2m1Max = 6.0f;
inline constexpr int kE2m1MaxExp = 2;  // 6 = 1.5 * 2^2 (OCP MX emax of FP4)

MOETUNE_INLINE bool e4m3_is_nan(uint8_t c) { return (c & 0x7f) == 0x7f; }
MOETUNE_INLINE bool e8m0_is_nan(uint8_t c) { return c == 0xff; }

MOETUNE_INLINE float e4m3_to_f32(uint8_t c) {
  const int e = (c >> 3) & 0xf, m = c & 7;
  const float mag = e == 0 ? std::ldexp(static_cast<float>(m), -9)
                           : std::ldexp(static_cast<float>(8 + m), e - 10);
  return c & 0x80 ? -mag : mag;
}

MOETUNE_INLINE float e2m1_to_f32(uint8_t c) {
  const int e = (c >> 1) & 3, m = c & 1;
  const float mag = e == 0 ? 0.5f * static_cast<float>(m) : std::ldexp(1.0f + 0.5f * m, e - 1);
  return c & 8 ? -mag : mag;
}

MOETUNE_INLINE float e8m0_to_f32(uint8_t c) { return std::ldexp(1.0f, static_cast<int>(c) - 127); }

// Nearest code among the non-negative codes 0..max_code of a monotone
// decoder, ties to the even code, saturating; the sign bit `sign` added for x < 0.
template <typename Decode>
MOETUNE_INLINE uint8_t encode_nearest(float x, int max_code, uint8_t sign, Decode decode) {
  const float a = std::fabs(x);
  // Binary search: lo = the largest code with decode(lo) <= a (decode(0) = 0).
  int lo = 0, hi = max_code;
  if (decode(static_cast<uint8_t>(hi)) <= a) {
    lo = hi;
  } else {
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      (decode(static_cast<uint8_t>(mid)) <= a ? lo : hi) = mid;
    }
  }
  int c = lo;
  if (lo < max_code) {
    const float dl = a - decode(static_cast<uint8_t>(lo)),
                dh = decode(static_cast<uint8_t>(lo + 1)) - a;
    if (dh < dl || (dh == dl && (lo & 1))) c = lo + 1;
  }
  return static_cast<uint8_t>(c | (std::signbit(x) && c != 0 ? sign : 0));
}

MOETUNE_INLINE uint8_t f32_to_e4m3(float x) {
  return encode_nearest(x, 0x7e, 0x80, [](uint8_t c) { return e4m3_to_f32(c); });
}
MOETUNE_INLINE uint8_t f32_to_e2m1(float x) {
  return encode_nearest(x, 7, 8, [](uint8_t c) { return e2m1_to_f32(c); });
}

// The OCP MX shared scale of a group with this amax: 2^(floor(log2 amax) - 2),
// as an e8m0 code clamped to [0, 254]; amax 0 (or below 2^-127) gives code 0.
MOETUNE_INLINE uint8_t mx_scale_e8m0(float amax) {
  if (!(amax > 0.0f)) return 0;
  const int e = std::ilogb(amax) - kE2m1MaxExp + 127;
  return static_cast<uint8_t>(e < 0 ? 0 : (e > 254 ? 254 : e));
}

}  // namespace moetune::kernels
