// Quantization at load (the scalar oracle for every format) and the scalar
// dequant kernel. See quant.h for the formats, weight_format.h for the table.
#include "quant.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "isa_unit.h"
#include "minifloat.h"
#include "quant_impl.h"

MOETUNE_ISA_UNIT(scalar);

namespace moetune::kernels {

const char* weight_format_name(WeightFormat f) {
  const WeightFormatInfo* w = find_weight_format(f);
  return w ? w->name : "?";
}

void check_quant_spec(const QuantSpec& spec) {
  const WeightFormatInfo* w = find_weight_format(spec.format);
  if (!w) {
    throw std::invalid_argument("moetune: unknown weight format " +
                                std::to_string(static_cast<int>(spec.format)));
  }
  if (w->group_k == kGroupOption) {
    if (spec.group_size != 32 && spec.group_size != 64 && spec.group_size != 128) {
      throw std::invalid_argument(std::string("moetune: ") + w->name +
                                  " group_size must be 32, 64 or 128, got " +
                                  std::to_string(spec.group_size));
    }
    return;
  }
  if (spec.group_size != 0) {
    throw std::invalid_argument(
        std::string("moetune: group_size applies to int4 only; weight format ") + w->name +
        " got group_size " + std::to_string(spec.group_size));
  }
}

float quant_code_value(uint8_t code, WeightFormat f) {
  switch (f) {
    case WeightFormat::kInt8:
      return static_cast<float>(static_cast<int8_t>(code));
    case WeightFormat::kInt4:
      return static_cast<float>((code & 0x0f) - 8);
    case WeightFormat::kFp8Block:
      return e4m3_to_f32(code);
    case WeightFormat::kMxfp4:
      return e2m1_to_f32(code & 0x0f);
    case WeightFormat::kBf16:
      break;
  }
  return 0.0f;
}

float quant_scale_value(const uint8_t* scale, WeightFormat f) {
  if (weight_format_info(f).scale_type == ScaleType::kE8m0) return e8m0_to_f32(*scale);
  float v;
  std::memcpy(&v, scale, sizeof v);
  return v;
}

float quant_scale(float amax, WeightFormat f) {
  const float s = amax / static_cast<float>(quant_qmax(f));
  // Scales below FLT_MIN would make q * s denormal, which SIMD bf16
  // conversions flush; such groups are zero for any practical purpose.
  return s >= FLT_MIN ? s : 0.0f;
}

int quantize_value(float w, float s, WeightFormat f) {
  if (s == 0.0f) return 0;
  const int qmax = quant_qmax(f);
  const float r = std::nearbyint(w / s);
  if (r > qmax) return qmax;
  if (r < -qmax) return -qmax;
  return static_cast<int>(r);
}

namespace {

// Stores the code of element (k, n) into its panel (quant.h layouts).
void put_code(uint8_t* q, WeightFormat f, int64_t kp, int64_t k, int64_t n, uint8_t code) {
  const int64_t rb = quant_row_bytes(f);
  uint8_t* r = q + (n / kPanelN) * (kp / 2) * rb + (k / 2) * rb;
  const int64_t c = n % kPanelN;
  if (rb == 32) {
    r[(k % 2) * kPanelN + c] = code;
  } else {
    r[c] =
        static_cast<uint8_t>(k % 2 ? (r[c] & 0x0f) | (code << 4) : (r[c] & 0xf0) | (code & 0x0f));
  }
}

}  // namespace

void quantize_pack(const void* src, SrcType type, int64_t ld, int64_t K, int64_t N,
                   const QuantSpec& spec, uint8_t* q, void* scales_out, const std::string& what) {
  check_quant_spec(spec);
  if (spec.format == WeightFormat::kBf16) {
    throw std::invalid_argument("moetune: quantize_pack needs a quantized weight format");
  }
  const WeightFormat f = spec.format;
  const int64_t G = quant_group_k(spec, K);
  const int64_t groups = quant_groups(spec, K);
  const int64_t kp = packed_kp(K);
  const int64_t panels = packed_panels(N);
  // The code of q = 0 (int4's nibble is q + 8; the float codes' 0 is 0).
  const uint8_t zero = f == WeightFormat::kInt4 ? 8 : 0;
  const uint8_t zero_byte =
      quant_row_bytes(f) == 16 ? static_cast<uint8_t>(zero | (zero << 4)) : zero;
  std::memset(q, zero_byte, quant_q_bytes(spec, K, N));
  std::memset(scales_out, 0, quant_scale_bytes(spec, K, N));
  float* scales = static_cast<float*>(scales_out);
  uint8_t* e8m0 = static_cast<uint8_t*>(scales_out);
  auto value = [&](int64_t n, int64_t k) {
    const float v = type == SrcType::kBf16 ? bf16_to_f32(static_cast<const bf16*>(src)[n * ld + k])
                                           : static_cast<const float*>(src)[n * ld + k];
    if (!std::isfinite(v)) {
      throw std::invalid_argument("moetune: " + what + " has a non-finite value at row " +
                                  std::to_string(n) + ", column " + std::to_string(k) +
                                  " (cannot quantize)");
    }
    return v;
  };
  if (f == WeightFormat::kFp8Block) {
    // One scale per 128 x 128 block of the [N, K] rows, copied to each panel.
    const int64_t B = weight_format_info(f).group_n;
    for (int64_t n0 = 0; n0 < N; n0 += B) {
      const int64_t n1 = std::min(N, n0 + B);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k_lo = g * G, k_hi = std::min(K, k_lo + G);
        float amax = 0.0f;
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t k = k_lo; k < k_hi; ++k) amax = std::max(amax, std::fabs(value(n, k)));
        float s = amax / kE4m3Max;
        if (!(s >= FLT_MIN)) s = 0.0f;  // as quant_scale: no denormal scales
        for (int64_t p = n0 / kPanelN; p < std::min(panels, (n1 + kPanelN - 1) / kPanelN); ++p)
          scales[p * groups + g] = s;
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t k = k_lo; k < k_hi; ++k)
            put_code(q, f, kp, k, n, s == 0.0f ? 0 : f32_to_e4m3(value(n, k) / s));
      }
    }
    return;
  }
  std::vector<float> row(K > 0 ? K : 1);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) row[k] = value(n, k);
    const int64_t p = n / kPanelN, c = n % kPanelN;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k_lo = g * G, k_hi = std::min<int64_t>(K, k_lo + G);
      float amax = 0.0f;
      for (int64_t k = k_lo; k < k_hi; ++k) amax = std::max(amax, std::fabs(row[k]));
      const int64_t at = (p * groups + g) * kPanelN + c;
      if (f == WeightFormat::kMxfp4) {
        const uint8_t se = mx_scale_e8m0(amax);
        e8m0[at] = se;
        for (int64_t k = k_lo; k < k_hi; ++k)
          put_code(q, f, kp, k, n, f32_to_e2m1(row[k] / e8m0_to_f32(se)));
        continue;
      }
      const float s = quant_scale(amax, f);
      scales[at] = s;
      for (int64_t k = k_lo; k < k_hi; ++k)
        put_code(q, f, kp, k, n, static_cast<uint8_t>(quantize_value(row[k], s, f) + zero));
    }
  }
}

namespace scalar {

// The oracle: element by element from the quant.h layout formulas.
namespace {

// The code of element (k, n) of a quantized operand (k < K, n < N).
uint8_t code_at(const QuantB& src, int64_t k, int64_t n) {
  const int64_t rb = quant_row_bytes(src.spec.format);
  const uint8_t* row = src.panel_q(n / kPanelN) + (k / 2) * rb;
  if (rb == 32) return row[(k % 2) * kPanelN + n % kPanelN];
  const uint8_t b = row[n % kPanelN];
  return k % 2 ? b >> 4 : b & 0x0f;
}
// Its dequantized value (the oracle).
bf16 value_at(const QuantB& src, int64_t k, int64_t n) {
  const WeightFormat f = src.spec.format;
  const int64_t scols = quant_scale_cols(f);
  const int64_t si = (k / quant_group_k(src.spec, src.K)) * scols + (scols == 1 ? 0 : n % kPanelN);
  return dequant_code(code_at(src, k, n),
                      src.panel_scale_bytes(n / kPanelN) + si * quant_scale_bytes_each(f), f);
}

}  // namespace

void dequant(const QuantB& src, int64_t n_begin, int64_t n_end, int64_t k0, int64_t k1, bf16* dst) {
  const int64_t Nd = n_end - n_begin, Kd = k1 - k0, kpd = packed_kp(Kd);
  for (int64_t qd = 0; qd < packed_panels(Nd); ++qd) {
    bf16* dp = dst + qd * kpd * kPanelN;
    for (int64_t kd = 0; kd < kpd; ++kd) {
      for (int64_t c = 0; c < kPanelN; ++c) {
        const int64_t n = n_begin + qd * kPanelN + c, k = k0 + kd;
        const bool in = kd < Kd && n < n_end && n < src.N && k < src.K;
        dp[(kd / 2) * 2 * kPanelN + c * 2 + (kd % 2)] = in ? value_at(src, k, n) : bf16(0);
      }
    }
  }
}

void dequant_t_block(const QuantB& src, int64_t kb, int64_t k_end, int64_t n0, int64_t n1,
                     bf16* dpanel) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t j = 0; j < kPanelN; ++j) {
      const int64_t k = kb + j;
      dpanel[(n / 2) * 2 * kPanelN + j * 2 + n % 2] =
          (n < src.N && k < k_end) ? value_at(src, k, n) : bf16(0);
    }
  }
}

}  // namespace scalar

}  // namespace moetune::kernels
