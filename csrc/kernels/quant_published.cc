// Published codes and scales into the packed layouts (quant_published.h).
#include "quant_published.h"

#include <cmath>
#include <cstring>
#include <stdexcept>

#include "minifloat.h"

namespace moetune::kernels {

namespace {

std::string at(int64_t r, int64_t c) {
  return "[" + std::to_string(r) + ", " + std::to_string(c) + "]";
}

float scale_at(const void* scales, ScaleSrc src, int64_t i) {
  return src == ScaleSrc::kF32 ? static_cast<const float*>(scales)[i]
                               : bf16_to_f32(static_cast<const bf16*>(scales)[i]);
}

}  // namespace

const char* scale_src_name(ScaleSrc s) {
  switch (s) {
    case ScaleSrc::kF32:
      return "float32";
    case ScaleSrc::kBf16:
      return "bfloat16";
    case ScaleSrc::kE8m0:
      return "uint8 (e8m0)";
  }
  return "?";
}

PublishedScaleShape published_scale_shape(const QuantSpec& spec, int64_t K, int64_t N) {
  const WeightFormatInfo& w = weight_format_info(spec.format);
  const int64_t gk = quant_group_k(spec, K);
  return {w.group_n == 1 ? N : (N + w.group_n - 1) / w.group_n, (K + gk - 1) / gk};
}

int64_t published_code_row_bytes(const QuantSpec& spec, int64_t K) {
  return weight_format_info(spec.format).code_bits == 8 ? K : K / 2;
}

bool scale_src_ok(const QuantSpec& spec, ScaleSrc s) {
  return weight_format_info(spec.format).scale_type == ScaleType::kE8m0 ? s == ScaleSrc::kE8m0
                                                                        : s != ScaleSrc::kE8m0;
}

void pack_published(const QuantSpec& spec, int64_t K, int64_t N, const uint8_t* codes,
                    int64_t code_ld, const void* scales, ScaleSrc scale_src, int64_t scale_ld,
                    uint8_t* q, void* q_scales, const std::string& what) {
  check_quant_spec(spec);
  const WeightFormat f = spec.format;
  if (f != WeightFormat::kFp8Block && f != WeightFormat::kMxfp4 && f != WeightFormat::kInt4) {
    throw std::invalid_argument(std::string("moetune: ") + what + ": weight format " +
                                weight_format_name(f) +
                                " has no published layout (fp8_block, mxfp4 or int4)");
  }
  if (!scale_src_ok(spec, scale_src)) {
    throw std::invalid_argument(std::string("moetune: ") + what + ": " + weight_format_name(f) +
                                " scales cannot be " + scale_src_name(scale_src));
  }
  const bool four_bit = weight_format_info(f).code_bits == 4;
  if (four_bit && K % 2) {
    throw std::invalid_argument("moetune: " + what +
                                ": packed 4-bit weights need an even input "
                                "size, got " +
                                std::to_string(K));
  }
  const int64_t kp = packed_kp(K), rb = quant_row_bytes(f), groups = quant_groups(spec, K);
  const int64_t panels = packed_panels(N);
  // Pads: code 0 (int4: nibbles 8 = q 0) and scale 0, as quantize_pack.
  std::memset(q, f == WeightFormat::kInt4 ? 0x88 : 0, quant_q_bytes(spec, K, N));
  std::memset(q_scales, 0, quant_scale_bytes(spec, K, N));
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* src = codes + n * code_ld;
    uint8_t* panel = q + (n / kPanelN) * (kp / 2) * rb;
    const int64_t c = n % kPanelN;
    if (four_bit) {
      for (int64_t kk = 0; kk < K / 2; ++kk) panel[kk * rb + c] = src[kk];
    } else {
      for (int64_t k = 0; k < K; ++k) {
        if (e4m3_is_nan(src[k])) {
          throw std::invalid_argument("moetune: " + what + " has a NaN e4m3 code at " + at(n, k));
        }
        panel[(k / 2) * rb + (k % 2) * kPanelN + c] = src[k];
      }
    }
  }
  if (f == WeightFormat::kFp8Block) {
    float* out = static_cast<float*>(q_scales);
    const int64_t B = weight_format_info(f).group_n;
    for (int64_t p = 0; p < panels; ++p) {
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t i = (p * kPanelN / B) * scale_ld + g;
        const float s = scale_at(scales, scale_src, i);
        if (!std::isfinite(s)) {
          throw std::invalid_argument("moetune: " + what + " scale " + at(p * kPanelN / B, g) +
                                      " is not finite (" + std::to_string(s) + ")");
        }
        out[p * groups + g] = s;
      }
    }
    return;
  }
  for (int64_t n = 0; n < N; ++n) {
    const int64_t p = n / kPanelN, c = n % kPanelN;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t o = (p * groups + g) * kPanelN + c;
      if (f == WeightFormat::kMxfp4) {
        const uint8_t s = static_cast<const uint8_t*>(scales)[n * scale_ld + g];
        if (e8m0_is_nan(s)) {
          throw std::invalid_argument("moetune: " + what + " scale " + at(n, g) +
                                      " is the e8m0 NaN code 255");
        }
        static_cast<uint8_t*>(q_scales)[o] = s;
      } else {
        const float s = scale_at(scales, scale_src, n * scale_ld + g);
        if (!std::isfinite(s)) {
          throw std::invalid_argument("moetune: " + what + " scale " + at(n, g) +
                                      " is not finite (" + std::to_string(s) + ")");
        }
        static_cast<float*>(q_scales)[o] = s;
      }
    }
  }
}

}  // namespace moetune::kernels
