// Quantization at load (the scalar oracle for every format) and the scalar
// dequant kernel. See quant.h for the formats.
#include "quant.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "isa_unit.h"
#include "quant_impl.h"

MOETUNE_ISA_UNIT(scalar);

namespace moetune::kernels {

const char* weight_format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::kBf16:
      return "bf16";
    case WeightFormat::kInt8:
      return "int8";
    case WeightFormat::kInt4:
      return "int4";
  }
  return "?";
}

void check_quant_spec(const QuantSpec& spec) {
  if (spec.format == WeightFormat::kInt4) {
    if (spec.group_size != 32 && spec.group_size != 64 && spec.group_size != 128) {
      throw std::invalid_argument("moetune: int4 group_size must be 32, 64 or 128, got " +
                                  std::to_string(spec.group_size));
    }
    return;
  }
  if (spec.format != WeightFormat::kBf16 && spec.format != WeightFormat::kInt8) {
    throw std::invalid_argument("moetune: unknown weight format " +
                                std::to_string(static_cast<int>(spec.format)));
  }
  if (spec.group_size != 0) {
    throw std::invalid_argument(
        std::string("moetune: group_size applies to int4 only; weight format ") +
        weight_format_name(spec.format) + " got group_size " + std::to_string(spec.group_size));
  }
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

void quantize_pack(const void* src, SrcType type, int64_t ld, int64_t K, int64_t N,
                   const QuantSpec& spec, uint8_t* q, float* scales, const std::string& what) {
  check_quant_spec(spec);
  if (spec.format == WeightFormat::kBf16) {
    throw std::invalid_argument("moetune: quantize_pack needs an int8 or int4 format");
  }
  const WeightFormat f = spec.format;
  const int64_t G = f == WeightFormat::kInt4 ? spec.group_size : (K > 0 ? K : 1);
  const int64_t groups = quant_groups(spec, K);
  const int64_t kp = packed_kp(K);
  const int64_t rb = quant_row_bytes(f);
  std::memset(q, 0, quant_q_bytes(spec, K, N));
  std::memset(scales, 0, sizeof(float) * quant_scale_count(spec, K, N));
  std::vector<float> row(K > 0 ? K : 1);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      row[k] = type == SrcType::kBf16 ? bf16_to_f32(static_cast<const bf16*>(src)[n * ld + k])
                                      : static_cast<const float*>(src)[n * ld + k];
      if (!std::isfinite(row[k])) {
        throw std::invalid_argument("moetune: " + what + " has a non-finite value at row " +
                                    std::to_string(n) + ", column " + std::to_string(k) +
                                    " (cannot quantize)");
      }
    }
    const int64_t p = n / kPanelN, c = n % kPanelN;
    uint8_t* panel = q + p * (kp / 2) * rb;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k_lo = g * G, k_hi = std::min<int64_t>(K, k_lo + G);
      float amax = 0.0f;
      for (int64_t k = k_lo; k < k_hi; ++k) amax = std::max(amax, std::fabs(row[k]));
      const float s = quant_scale(amax, f);
      scales[(p * groups + g) * kPanelN + c] = s;
      for (int64_t k = k_lo; k < k_hi; ++k) {
        const int v = quantize_value(row[k], s, f);
        uint8_t* r = panel + (k / 2) * rb;
        if (f == WeightFormat::kInt8) {
          r[(k % 2) * kPanelN + c] = static_cast<uint8_t>(static_cast<int8_t>(v));
        } else {
          const uint8_t nib = static_cast<uint8_t>(v + 8);
          r[c] = static_cast<uint8_t>(k % 2 ? (r[c] & 0x0f) | (nib << 4) : (r[c] & 0xf0) | nib);
        }
      }
    }
    // Odd K: the pad element of the last pair is q = 0 (nibble 8 for int4).
    if (K % 2 && f == WeightFormat::kInt4) {
      uint8_t* r = panel + (K / 2) * rb;
      r[c] = static_cast<uint8_t>((r[c] & 0x0f) | (8 << 4));
    }
  }
  // Pad columns of the last panel: q = 0 (nibbles 8), scales already 0.
  if (f == WeightFormat::kInt4) {
    const int64_t panels = packed_panels(N);
    for (int64_t n = N; n < panels * kPanelN; ++n) {
      uint8_t* panel = q + (n / kPanelN) * (kp / 2) * rb;
      for (int64_t kk = 0; kk < kp / 2; ++kk) panel[kk * rb + n % kPanelN] = 0x88;
    }
  }
}

namespace scalar {

// The oracle: element by element from the quant.h layout formulas.
void dequant(const QuantB& src, int64_t n_begin, int64_t n_end, int64_t k0, int64_t k1, bf16* dst) {
  const int64_t Nd = n_end - n_begin, Kd = k1 - k0, kpd = packed_kp(Kd);
  const int64_t G = src.spec.format == WeightFormat::kInt4 ? src.spec.group_size : 0;
  const int64_t rb = quant_row_bytes(src.spec.format);
  for (int64_t qd = 0; qd < packed_panels(Nd); ++qd) {
    bf16* dp = dst + qd * kpd * kPanelN;
    for (int64_t kd = 0; kd < kpd; ++kd) {
      for (int64_t c = 0; c < kPanelN; ++c) {
        const int64_t n = n_begin + qd * kPanelN + c, k = k0 + kd;
        bf16 v = 0;
        if (kd < Kd && n < n_end && n < src.N && k < src.K) {
          const uint8_t* row = src.panel_q(n / kPanelN) + (k / 2) * rb;
          int qv;
          if (src.spec.format == WeightFormat::kInt8) {
            qv = static_cast<int8_t>(row[(k % 2) * kPanelN + n % kPanelN]);
          } else {
            const uint8_t b = row[n % kPanelN];
            qv = (k % 2 ? b >> 4 : b & 0x0f) - 8;
          }
          const int64_t g = G ? k / G : 0;
          v = dequant_value(qv, src.panel_scales(n / kPanelN)[g * kPanelN + n % kPanelN]);
        }
        dp[(kd / 2) * 2 * kPanelN + c * 2 + (kd % 2)] = v;
      }
    }
  }
}

}  // namespace scalar

}  // namespace moetune::kernels
