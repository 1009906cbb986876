// WeightStore (csrc/engine/weight_store.h): the size function is the
// allocation (every format x backward-weights policy x odd shapes), the
// buffers' per-expert strides hold exactly one expert each, and
// unpack_expert gives the values the GEMMs use: the loaded bf16 weights, or
// dq(q(W)) from the value-level oracle (engine_reference.h).
#include <gtest/gtest.h>

#include "engine_test_support.h"

namespace moetune::engine_test {
namespace {

struct Shape {
  int E, H, I;
};
const Shape kShapes[] = {{1, 1, 1}, {3, 33, 17}, {2, 256, 128}, {4, 40, 24}};

// Every weight format (int4 with each group size) x both backward policies.
std::vector<ExpertsOptions> all_weight_options() {
  std::vector<ExpertsOptions> v;
  for (BackwardWeights bw : kAllBackwardWeights) {
    for (WeightFormat f : kAllWeightFormats) {
      const std::vector<int> groups =
          f == WeightFormat::kInt4 ? std::vector<int>{32, 64, 128} : std::vector<int>{0};
      for (int g : groups) {
        ExpertsOptions o;
        o.backward_weights = bw;
        o.weight_format = f;
        o.group_size = g;
        v.push_back(o);
      }
    }
  }
  return v;
}

std::string tag(const ExpertsOptions& o, const Shape& s) {
  return std::string(option_name(o.weight_format)) + "/g" + std::to_string(o.group_size) + "/" +
         option_name(o.backward_weights) + " E=" + std::to_string(s.E) +
         " H=" + std::to_string(s.H) + " I=" + std::to_string(s.I);
}

TEST(WeightStore, HostBytesIsWhatTheEngineAllocates) {
  auto ctx = make_context(EngineCfg{});
  for (const ExpertsOptions& o : all_weight_options()) {
    for (const Shape& s : kShapes) {
      const size_t want = MoeExperts::host_bytes(s.E, s.H, s.I, o);
      MoeExperts m(ctx, s.E, s.H, s.I, o);
      EXPECT_EQ(m.packed_bytes(), want) << tag(o, s);
      EXPECT_EQ(m.weights().weight_bytes(), want) << tag(o, s);
      size_t sum = 0;
      for (const WeightStore::Buffer& b : m.weights().buffers()) {
        EXPECT_EQ(b.per_expert_bytes * s.E, b.bytes) << tag(o, s) << " " << b.name;
        sum += b.bytes;
      }
      EXPECT_EQ(sum, want) << tag(o, s) << ": buffers() do not cover the weights";
      // Biases are counted apart: packed_bytes = weights + the biases loaded.
      std::vector<float> bg(size_t(s.E) * s.I, 0.5f), bd(size_t(s.E) * s.H, 0.5f);
      m.load_biases(bg.data(), bg.data(), bd.data(), DType::kF32);
      EXPECT_EQ(m.packed_bytes(), want + WeightStore::bias_bytes_for(s.E, s.H, s.I)) << tag(o, s);
      m.load_biases(nullptr, nullptr, bd.data(), DType::kF32);
      EXPECT_EQ(m.packed_bytes(), want + size_t(s.E) * s.H * sizeof(float)) << tag(o, s);
    }
  }
}

TEST(WeightStore, HostBytesPerFormatRatios) {
  // Qwen3-30B-A3B's expert shapes: int8 about 1/2, int4 (group 128) about 1/4
  // of bf16; the transposed copy adds one bf16 copy in every format.
  const int E = 128, H = 2048, I = 768;
  ExpertsOptions o;
  const double bf16 = double(MoeExperts::host_bytes(E, H, I, o));
  EXPECT_EQ(bf16, 2.0 * 3 * E * H * I);  // H, I multiples of 16: no padding
  o.weight_format = WeightFormat::kInt8;
  EXPECT_NEAR(MoeExperts::host_bytes(E, H, I, o) / bf16, 0.5, 0.01);
  o.weight_format = WeightFormat::kInt4;
  o.group_size = 128;
  EXPECT_NEAR(MoeExperts::host_bytes(E, H, I, o) / bf16, 0.25 + 4.0 / 128 / 2, 1e-9);
  o.backward_weights = BackwardWeights::kTransposedCopy;
  EXPECT_NEAR(MoeExperts::host_bytes(E, H, I, o) / bf16, 1.25 + 4.0 / 128 / 2, 1e-9);
}

TEST(WeightStore, BadShapeIsAClearErrorForSizeAndConstructor) {
  auto ctx = make_context(EngineCfg{});
  for (const Shape& s : {Shape{0, 8, 8}, Shape{2, 0, 8}, Shape{2, 8, -1}}) {
    const std::string what =
        "E=" + std::to_string(s.E) + " H=" + std::to_string(s.H) + " I=" + std::to_string(s.I);
    expect_invalid_argument("host_bytes " + what,
                            [&] { MoeExperts::host_bytes(s.E, s.H, s.I, ExpertsOptions{}); },
                            {"E, H, I >= 1", what});
    expect_invalid_argument("MoeExperts " + what,
                            [&] { MoeExperts m(ctx, s.E, s.H, s.I, ExpertsOptions{}); },
                            {"E, H, I >= 1", what});
  }
}

TEST(WeightStore, BuffersAreNamedAndShapedPerProjection) {
  auto ctx = make_context(EngineCfg{});
  ExpertsOptions o;
  o.weight_format = WeightFormat::kInt4;
  o.group_size = 32;
  o.backward_weights = BackwardWeights::kTransposedCopy;
  MoeExperts m(ctx, 2, 40, 24, o);
  std::vector<std::string> names;
  for (const WeightStore::Buffer& b : m.weights().buffers()) {
    names.push_back(b.name);
    const bool down = b.proj == Proj::kDown;
    const int64_t in = down ? 24 : 40, out = down ? 40 : 24;
    const bool t = b.kind == WeightStore::Kind::kTransposedBf16;
    EXPECT_EQ(b.K, t ? out : in) << b.name;
    EXPECT_EQ(b.N, t ? in : out) << b.name;
  }
  EXPECT_EQ(names, (std::vector<std::string>{"gate.q", "gate.scales", "gate.transposed_bf16",
                                             "up.q", "up.scales", "up.transposed_bf16", "down.q",
                                             "down.scales", "down.transposed_bf16"}));
}

// Reloading expert e with other weights changes bytes [e * stride, (e + 1) *
// stride) of every buffer and nothing else, and those bytes are what a store
// holding only that expert's weights has there (what a GPU path streaming
// one expert relies on).
TEST(WeightStore, ExpertSlicesHoldExactlyOneExpert) {
  const Layer L = make_layer(3, 33, 17, all_lora(0), 811);
  Layer L2 = make_layer(3, 33, 17, all_lora(0), 812);
  // Other magnitudes too: a block scale (fp8_block: amax / 448 of a whole
  // small matrix; mxfp4: the power of two of a group's amax) of two draws of
  // the same distribution is often the same value, which would make the
  // "reloading changed the bytes" check below vacuous for the scales.
  for (int p = 0; p < 3; ++p) {
    for (float& w : L2.W[p]) w *= 0.37f;
    L2.Wb[p] = bits(L2.W[p]);
  }
  auto ctx = make_context(EngineCfg{});
  for (const ExpertsOptions& o : all_weight_options()) {
    const std::string t = tag(o, Shape{L.E, L.H, L.I});
    MoeExperts a(ctx, L.E, L.H, L.I, o), b(ctx, L.E, L.H, L.I, o);
    a.load(L.Wb[0].data(), L.Wb[1].data(), L.Wb[2].data(), DType::kBf16);
    b.load(L2.Wb[0].data(), L2.Wb[1].data(), L2.Wb[2].data(), DType::kBf16);
    auto snapshot = [](MoeExperts& m) {
      std::vector<std::vector<uint8_t>> v;
      for (const auto& buf : m.weights().buffers()) {
        const uint8_t* p = static_cast<const uint8_t*>(buf.data);
        v.emplace_back(p, p + buf.bytes);
      }
      return v;
    };
    const auto before = snapshot(a), other = snapshot(b);
    const int e = 1;
    const size_t per = size_t(L.I) * L.H;
    a.load_expert(e, L2.Wb[0].data() + e * per, L2.Wb[1].data() + e * per,
                  L2.Wb[2].data() + e * per, DType::kBf16);
    const auto after = snapshot(a);
    const auto bufs = a.weights().buffers();
    for (size_t i = 0; i < bufs.size(); ++i) {
      const size_t s = bufs[i].per_expert_bytes, lo = e * s, hi = (e + 1) * s;
      EXPECT_TRUE(std::equal(after[i].begin(), after[i].begin() + lo, before[i].begin()))
          << t << " " << bufs[i].name;
      EXPECT_TRUE(std::equal(after[i].begin() + hi, after[i].end(), before[i].begin() + hi))
          << t << " " << bufs[i].name;
      EXPECT_TRUE(std::equal(after[i].begin() + lo, after[i].begin() + hi, other[i].begin() + lo))
          << t << " " << bufs[i].name << ": expert " << e
          << "'s bytes differ from the other store's";
      EXPECT_FALSE(std::equal(after[i].begin() + lo, after[i].begin() + hi, before[i].begin() + lo))
          << t << " " << bufs[i].name << ": reloading expert " << e << " changed nothing (vacuous)";
    }
  }
}

TEST(WeightStore, UnpackExpertGivesTheValuesTheGemmsUse) {
  const Layer L = make_layer(3, 33, 17, all_lora(0), 821);
  auto ctx = make_context(EngineCfg{});
  for (const ExpertsOptions& o : all_weight_options()) {
    const std::string t = tag(o, Shape{L.E, L.H, L.I});
    // bf16: the loaded weights bit for bit; int8 / int4: dq(q(W)) from the oracle.
    const Layer want =
        o.weight_format == WeightFormat::kBf16 ? L : dequantized_layer(L, o.quant_spec());
    MoeExperts m(ctx, L.E, L.H, L.I, o);
    m.load(L.W[0].data(), L.W[1].data(), L.W[2].data(), DType::kF32);
    for (int e = 0; e < L.E; ++e) {
      std::vector<bf16> got[3] = {std::vector<bf16>(size_t(L.I) * L.H),
                                  std::vector<bf16>(size_t(L.I) * L.H),
                                  std::vector<bf16>(size_t(L.H) * L.I)};
      m.weights().unpack_expert(e, got[0].data(), got[1].data(), got[2].data());
      for (int p = 0; p < 3; ++p) {
        const size_t n = got[p].size();
        const std::vector<bf16> exp(want.Wb[p].begin() + e * n, want.Wb[p].begin() + (e + 1) * n);
        EXPECT_EQ(got[p], exp) << t << " expert " << e << " " << kProjName[p];
      }
    }
  }
  MoeExperts m(ctx, L.E, L.H, L.I, ExpertsOptions{});
  std::vector<bf16> buf(size_t(L.I) * L.H);
  expect_invalid_argument(
      "unpack expert E",
      [&] { m.weights().unpack_expert(L.E, buf.data(), buf.data(), buf.data()); }, {"expert id 3"});
}

}  // namespace
}  // namespace moetune::engine_test
