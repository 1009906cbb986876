// The published formats' value level and layouts: minifloat.h's codecs
// against the OCP definitions written out here (every code), rounding at
// every midpoint; pack_published (quant_published.h) keeps the published
// codes and scales bit for bit (the dequantized operand equals
// bf16(decode(code) * scale) computed here from the published arrays, and
// equals quantize_pack's bytes where both apply); bad published input gives
// clear errors. The per-ISA dequant of these formats is checked bit-identical
// to the scalar oracle in test_kernels_quant.cc (DequantPerIsa) and, here,
// exhaustively: every code of every format x representative scales (every
// e8m0 scale code) against bf16(decode(code) * scale) per ISA; the Python
// tests compare the decoded values with torch's float8_e4m3fn, transformers'
// MXFP4 and compressed-tensors' INT4 decoders.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernel_test_support.h"
#include "kernels/gemm.h"
#include "kernels/kernel_bundle.h"
#include "kernels/minifloat.h"
#include "kernels/quant.h"
#include "kernels/quant_published.h"

namespace moetune::kernels {
namespace {

// OCP FP8 E4M3 (fn): (-1)^s * 2^(e - 7) * (1 + m / 8), subnormal 2^-6 * m / 8.
double e4m3_def(int c) {
  const int s = c >> 7, e = (c >> 3) & 15, m = c & 7;
  const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return s ? -mag : mag;
}
// OCP MX FP4 E2M1: (-1)^s * 2^(e - 1) * (1 + m / 2), subnormal 0.5 * m.
double e2m1_def(int c) {
  const int s = c >> 3, e = (c >> 1) & 3, m = c & 1;
  const double mag = e == 0 ? 0.5 * m : std::ldexp(1.0 + m / 2.0, e - 1);
  return s ? -mag : mag;
}

TEST(Minifloat, DecodersMatchTheOcpDefinitionsForEveryCode) {
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) {
      EXPECT_TRUE(e4m3_is_nan(static_cast<uint8_t>(c))) << c;
      continue;
    }
    EXPECT_FALSE(e4m3_is_nan(static_cast<uint8_t>(c))) << c;
    EXPECT_EQ(double(e4m3_to_f32(static_cast<uint8_t>(c))), e4m3_def(c)) << "e4m3 code " << c;
  }
  EXPECT_EQ(e4m3_to_f32(0x7e), 448.0f);
  EXPECT_EQ(e4m3_to_f32(0x01), std::ldexp(1.0f, -9));
  for (int c = 0; c < 16; ++c)
    EXPECT_EQ(double(e2m1_to_f32(static_cast<uint8_t>(c))), e2m1_def(c)) << "e2m1 code " << c;
  EXPECT_EQ(e2m1_to_f32(7), 6.0f);
  for (int c = 0; c < 255; ++c)
    EXPECT_EQ(e8m0_to_f32(static_cast<uint8_t>(c)), std::ldexp(1.0f, c - 127)) << c;
  EXPECT_TRUE(e8m0_is_nan(255));
}

// Encoders: every code round-trips; a value between two neighbours goes to
// the nearer, a midpoint to the even code; beyond the max saturates.
template <typename Enc, typename Dec>
void check_encoder(const char* name, int max_code, uint8_t sign, Enc enc, Dec dec) {
  for (int c = 0; c <= max_code; ++c) {
    EXPECT_EQ(enc(dec(c)), c) << name << " code " << c;
    if (c) EXPECT_EQ(enc(-dec(c)), c | sign) << name << " code -" << c;
  }
  for (int c = 0; c < max_code; ++c) {
    const float lo = dec(c), hi = dec(c + 1), mid = 0.5f * (lo + hi);
    const int even = c % 2 == 0 ? c : c + 1;
    EXPECT_EQ(enc(mid), even) << name << " midpoint of " << c;
    EXPECT_EQ(enc(std::nextafter(mid, lo)), c) << name << " below the midpoint of " << c;
    EXPECT_EQ(enc(std::nextafter(mid, hi)), c + 1) << name << " above the midpoint of " << c;
  }
  EXPECT_EQ(enc(dec(max_code) * 4.0f), max_code) << name << " saturates";
  EXPECT_EQ(enc(-dec(max_code) * 4.0f), max_code | sign) << name << " saturates (negative)";
}

TEST(Minifloat, EncodersRoundToNearestEvenAndSaturate) {
  check_encoder(
      "e4m3", 0x7e, 0x80, [](float x) { return int(f32_to_e4m3(x)); },
      [](int c) { return float(e4m3_def(c)); });
  check_encoder(
      "e2m1", 7, 8, [](float x) { return int(f32_to_e2m1(x)); },
      [](int c) { return float(e2m1_def(c)); });
}

TEST(Minifloat, MxScaleIsFloorLog2AmaxMinusTwo) {
  EXPECT_EQ(mx_scale_e8m0(6.0f), 127);  // 2^2 -> scale 2^0: 6 maps to 6
  EXPECT_EQ(mx_scale_e8m0(7.9f), 127);  // still floor(log2) = 2
  EXPECT_EQ(mx_scale_e8m0(8.0f), 128);
  EXPECT_EQ(mx_scale_e8m0(1.0f), 125);
  EXPECT_EQ(mx_scale_e8m0(0.0f), 0);
  EXPECT_EQ(mx_scale_e8m0(std::ldexp(1.0f, 126)), 251);
}

// ---- published layouts ----

struct Published {
  int64_t K, N;
  QuantSpec spec;
  std::vector<uint8_t> codes;   // [N, code_row_bytes]
  std::vector<uint8_t> scales;  // raw bytes of [rows, cols] f32 / bf16 / e8m0
  ScaleSrc src;
  PublishedScaleShape ss;
  // The published value of element (n, k), computed from the arrays alone.
  bf16 value(int64_t n, int64_t k) const {
    const int64_t row = published_code_row_bytes(spec, K);
    float code, scale;
    if (spec.format == WeightFormat::kFp8Block) {
      code = float(e4m3_def(codes[n * row + k]));
    } else {
      const uint8_t b = codes[n * row + k / 2];
      const int nib = k % 2 ? b >> 4 : b & 15;
      code = spec.format == WeightFormat::kMxfp4 ? float(e2m1_def(nib)) : float(nib - 8);
    }
    const int64_t sr = spec.format == WeightFormat::kFp8Block ? n / 128 : n;
    const int64_t sc = k / quant_group_k(spec, K), i = sr * ss.cols + sc;
    if (src == ScaleSrc::kE8m0) {
      scale = std::ldexp(1.0f, int(scales[i]) - 127);
    } else if (src == ScaleSrc::kF32) {
      std::memcpy(&scale, &scales[i * 4], 4);
    } else {
      uint16_t h;
      std::memcpy(&h, &scales[i * 2], 2);
      scale = bf16_to_f32(h);
    }
    return f32_to_bf16(code * scale);
  }
};

Published make_published(const QuantSpec& spec, int64_t K, int64_t N, ScaleSrc src, uint64_t seed) {
  std::mt19937_64 g(seed);
  Published p{K, N, spec, {}, {}, src, published_scale_shape(spec, K, N)};
  p.codes.resize(size_t(N * published_code_row_bytes(spec, K)));
  for (uint8_t& c : p.codes) {
    c = static_cast<uint8_t>(g());
    if (spec.format == WeightFormat::kFp8Block && e4m3_is_nan(c)) c = 0x7e;
  }
  const int64_t count = p.ss.rows * p.ss.cols;
  if (src == ScaleSrc::kE8m0) {
    p.scales.resize(size_t(count));
    for (uint8_t& s : p.scales) s = static_cast<uint8_t>(110 + g() % 30);
  } else {
    std::uniform_real_distribution<float> d(1e-4f, 1e-2f);
    const size_t w = src == ScaleSrc::kF32 ? 4 : 2;
    p.scales.resize(size_t(count) * w);
    for (int64_t i = 0; i < count; ++i) {
      const float v = d(g);
      if (w == 4) {
        std::memcpy(&p.scales[i * 4], &v, 4);
      } else {
        const bf16 h = f32_to_bf16(v);
        std::memcpy(&p.scales[i * 2], &h, 2);
      }
    }
  }
  return p;
}

struct Packed {
  std::vector<uint8_t> q, s;
};
Packed pack(const Published& p) {
  Packed out{std::vector<uint8_t>(quant_q_bytes(p.spec, p.K, p.N), 0xA5),
             std::vector<uint8_t>(quant_scale_bytes(p.spec, p.K, p.N), 0xA5)};
  pack_published(p.spec, p.K, p.N, p.codes.data(), published_code_row_bytes(p.spec, p.K),
                 p.scales.data(), p.src, p.ss.cols, out.q.data(), out.s.data(), "w");
  return out;
}

struct PubCase {
  const char* name;
  QuantSpec spec;
  ScaleSrc src;
};
const PubCase kPubCases[] = {
    {"fp8_block f32 scales", {WeightFormat::kFp8Block, 0}, ScaleSrc::kF32},
    {"fp8_block bf16 scales", {WeightFormat::kFp8Block, 0}, ScaleSrc::kBf16},
    {"mxfp4", {WeightFormat::kMxfp4, 0}, ScaleSrc::kE8m0},
    {"int4 g32 bf16 scales (compressed-tensors)", {WeightFormat::kInt4, 32}, ScaleSrc::kBf16},
    {"int4 g128 f32 scales", {WeightFormat::kInt4, 128}, ScaleSrc::kF32}};
// (K, N): aligned; N not a multiple of 16 or 128; K not a multiple of 128.
const int64_t kPubShapes[][2] = {{256, 272}, {64, 40}, {384, 17}, {160, 130}};

TEST(PublishedFormats, DequantizedOperandIsThePublishedValuesBitForBit) {
  for (const PubCase& pc : kPubCases) {
    for (const auto& sh : kPubShapes) {
      const int64_t K = sh[0], N = sh[1];
      if (pc.spec.format == WeightFormat::kInt4 && K % pc.spec.group_size) continue;
      const Published p = make_published(pc.spec, K, N, pc.src, 7 + K * N);
      const Packed pk = pack(p);
      const QuantB qb{pc.spec, pk.q.data(), pk.s.data(), K, N};
      std::vector<bf16> d(packed_elems(K, N));
      kernels_for(Isa::kScalar).dequant(qb, 0, N, 0, K, d.data());
      int64_t nonzero = 0;
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t k = 0; k < K; ++k) {
          const bf16 got = d[(n / kPanelN) * packed_kp(K) * kPanelN + (k / 2) * 2 * kPanelN +
                             (n % kPanelN) * 2 + k % 2];
          ASSERT_EQ(got, p.value(n, k))
              << pc.name << " K=" << K << " N=" << N << " element [" << n << ", " << k << "]";
          nonzero += (got & 0x7fff) != 0;
        }
      }
      EXPECT_GT(nonzero, K * N / 2) << pc.name;  // not vacuous
    }
  }
}

// The same weights quantized by quantize_pack (from bf16) and given as the
// published arrays of those codes give the same packed bytes: one layout.
TEST(PublishedFormats, SameBytesAsQuantizePackForTheSameCodes) {
  std::mt19937_64 g(5);
  std::normal_distribution<float> dist(0.0f, 0.02f);
  for (const QuantSpec spec :
       {QuantSpec{WeightFormat::kFp8Block, 0}, QuantSpec{WeightFormat::kMxfp4, 0}}) {
    const int64_t K = 288, N = 150;
    std::vector<float> w(size_t(K * N));
    for (float& v : w) v = bf16_to_f32(f32_to_bf16(dist(g)));
    Packed direct{std::vector<uint8_t>(quant_q_bytes(spec, K, N)),
                  std::vector<uint8_t>(quant_scale_bytes(spec, K, N))};
    quantize_pack(w.data(), SrcType::kF32, K, K, N, spec, direct.q.data(), direct.s.data(), "w");
    // The published arrays, written with plain loops over [N, K].
    Published p{K, N, spec, {}, {}, ScaleSrc::kF32, published_scale_shape(spec, K, N)};
    p.codes.assign(size_t(N * published_code_row_bytes(spec, K)), 0);
    if (spec.format == WeightFormat::kFp8Block) {
      std::vector<float> s(size_t(p.ss.rows * p.ss.cols));
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) {
          float& a = s[(n / 128) * p.ss.cols + k / 128];
          a = std::max(a, std::fabs(w[n * K + k]));
        }
      for (float& a : s) a = a / 448.0f;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k)
          p.codes[n * K + k] = f32_to_e4m3(w[n * K + k] / s[(n / 128) * p.ss.cols + k / 128]);
      p.scales.resize(s.size() * 4);
      std::memcpy(p.scales.data(), s.data(), p.scales.size());
    } else {
      p.src = ScaleSrc::kE8m0;
      p.scales.assign(size_t(p.ss.rows * p.ss.cols), 0);
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t g0 = 0; g0 < K; g0 += 32) {
          float amax = 0.0f;
          for (int64_t k = g0; k < g0 + 32; ++k) amax = std::max(amax, std::fabs(w[n * K + k]));
          const uint8_t se = mx_scale_e8m0(amax);
          p.scales[n * p.ss.cols + g0 / 32] = se;
          for (int64_t k = g0; k < g0 + 32; ++k) {
            const uint8_t c = f32_to_e2m1(w[n * K + k] / std::ldexp(1.0f, int(se) - 127));
            p.codes[n * (K / 2) + k / 2] |= static_cast<uint8_t>(k % 2 ? c << 4 : c);
          }
        }
      }
    }
    const Packed pk = pack(p);
    EXPECT_EQ(pk.q, direct.q) << weight_format_name(spec.format);
    EXPECT_EQ(pk.s, direct.s) << weight_format_name(spec.format);
  }
}

void expect_error(const std::string& what, const std::function<void()>& fn,
                  const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << what << ": accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << what << ": " << e.what();
  }
}

TEST(PublishedFormats, BadInputGivesClearErrors) {
  const QuantSpec fp8{WeightFormat::kFp8Block, 0}, mx{WeightFormat::kMxfp4, 0};
  Published p = make_published(fp8, 64, 40, ScaleSrc::kF32, 1);
  p.codes[3 * 64 + 5] = 0xff;
  expect_error("fp8 NaN code", [&] { pack(p); }, "w has a NaN e4m3 code at [3, 5]");
  p = make_published(fp8, 64, 40, ScaleSrc::kF32, 1);
  const float inf = INFINITY;
  std::memcpy(&p.scales[0], &inf, 4);
  expect_error("fp8 inf scale", [&] { pack(p); }, "w scale [0, 0] is not finite");
  p = make_published(mx, 64, 40, ScaleSrc::kE8m0, 2);
  p.scales[7 * 2 + 1] = 255;
  expect_error("e8m0 NaN", [&] { pack(p); }, "w scale [7, 1] is the e8m0 NaN code 255");
  p = make_published(mx, 64, 40, ScaleSrc::kE8m0, 2);
  p.src = ScaleSrc::kF32;
  expect_error("mxfp4 with f32 scales", [&] { pack(p); }, "mxfp4 scales cannot be float32");
  p = make_published({WeightFormat::kInt4, 32}, 64, 40, ScaleSrc::kBf16, 3);
  p.K = 63;
  expect_error("odd K", [&] { pack(p); }, "need an even input size, got 63");
  p = make_published(fp8, 64, 40, ScaleSrc::kF32, 1);
  p.spec = {WeightFormat::kInt8, 0};
  expect_error("int8", [&] { pack(p); }, "weight format int8 has no published layout");
}

// Every code of each format at every position of a [K = 32, N = 16] operand
// (code (k, n) = (16 k + n) mod 2^bits, so each column holds every 4-bit code
// twice and the 512 cells every 8-bit code twice), times representative
// scales: for the fp32-scale formats 1, 0.5, a weight-like 7.1e-3, FLT_MIN
// and 2^-140 (subnormal products), 1e35 (products overflow to inf), a
// negative -2.5 and 448; for mxfp4 every finite e8m0 code 0..254 (the whole
// domain: 254 would overflow 6 * 2^127). Each ISA's dequant must give
// exactly bf16(decode(code) * decode(scale)) (dequant_code, the oracle's
// formula) for every element, e4m3 0x7f / 0xff (the NaN codes a published
// load refuses) included as the oracle decodes them.
class MinifloatDequantPerIsa : public kernel_test::PerIsa {};

TEST_P(MinifloatDequantPerIsa, EveryCodeTimesRepresentativeScalesMatchesTheOracle) {
  const int64_t K = 32, N = 16;
  const float f32_scales[] = {1.0f,  0.5f,  7.1e-3f, FLT_MIN, std::ldexp(1.0f, -140),
                              1e35f, -2.5f, 448.0f};
  for (const WeightFormat f :
       {WeightFormat::kInt8, WeightFormat::kInt4, WeightFormat::kFp8Block, WeightFormat::kMxfp4}) {
    const QuantSpec spec{f, f == WeightFormat::kInt4 ? 32 : 0};
    const bool byte_codes = quant_row_bytes(f) == 32;
    const int ncodes = byte_codes ? 256 : 16;
    std::vector<uint8_t> q(quant_q_bytes(spec, K, N), 0);
    auto code = [&](int64_t k, int64_t n) { return uint8_t((16 * k + n) % ncodes); };
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t n = 0; n < N; ++n) {
        uint8_t* row = q.data() + (k / 2) * quant_row_bytes(f);
        if (byte_codes) {
          row[(k % 2) * kPanelN + n] = code(k, n);
        } else {
          row[n] =
              uint8_t(k % 2 ? (row[n] & 0x0f) | (code(k, n) << 4) : (row[n] & 0xf0) | code(k, n));
        }
      }
    }
    // The scale arrays to try (bytes of quant_scale_bytes each).
    std::vector<std::vector<uint8_t>> scale_sets;
    const int64_t nscales = quant_scale_count(spec, K, N);
    if (f == WeightFormat::kMxfp4) {
      for (int base = 0; base < 255; base += int(nscales)) {
        std::vector<uint8_t> sb(static_cast<size_t>(nscales));
        for (int64_t i = 0; i < nscales; ++i) sb[i] = uint8_t(std::min<int64_t>(254, base + i));
        scale_sets.push_back(sb);
      }
    } else {
      for (float sv : f32_scales) {
        std::vector<float> sc(static_cast<size_t>(nscales), sv);
        if (nscales > 1) sc[1] = sv * 0.75f;  // per-column formats: columns differ
        std::vector<uint8_t> sb(static_cast<size_t>(nscales) * 4);
        std::memcpy(sb.data(), sc.data(), sb.size());
        scale_sets.push_back(sb);
      }
    }
    int64_t checked = 0;
    for (const std::vector<uint8_t>& sb : scale_sets) {
      const QuantB qb{spec, q.data(), sb.data(), K, N};
      std::vector<bf16> got(packed_elems(K, N), 0xbeef);
      kernels().dequant(qb, 0, N, 0, K, got.data());
      const int64_t G = quant_group_k(spec, K), scols = quant_scale_cols(f);
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t n = 0; n < N; ++n) {
          const uint8_t* s =
              sb.data() + ((k / G) * scols + (scols == 1 ? 0 : n)) * quant_scale_bytes_each(f);
          const bf16 want = dequant_code(code(k, n), s, f);
          const bf16 have = got[(k / 2) * 2 * kPanelN + n * 2 + k % 2];
          ASSERT_EQ(have, want) << isa_name(isa()) << " " << weight_format_name(f) << " code "
                                << int(code(k, n)) << " scale value " << quant_scale_value(s, f)
                                << " at (" << k << "," << n << ")";
          ++checked;
        }
      }
    }
    EXPECT_EQ(checked, int64_t(scale_sets.size()) * K * N);
  }
}

MOETUNE_INSTANTIATE_PER_ISA(MinifloatDequantPerIsa);

}  // namespace
}  // namespace moetune::kernels
