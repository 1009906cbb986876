// Quantized frozen weights in the engine (ExpertsOptions::weight_format).
// The exactness test of the quantized path: an engine holding int8 / int4
// weights must give *bit-identical* forward and backward results to the bf16
// engine loaded with the dequantized weights dq(q(W)) (same ISA, same
// options): every GEMM sees the same bf16 panel values, only where they come
// from differs (dequantized per task vs packed at load). dq(q(W)) is computed
// here from the value-level oracle (quant_scale / quantize_value /
// dequant_value, checked against plain loops in test_kernels_quant.cc), not
// from the engine's packed layout. Both runs are also checked against the
// double-precision reference on dq(q(W)) with the usual tolerances
// (engine_test_support.h). Covered: every runnable ISA, repack and
// transposed_copy, save and recompute, thread counts, H / I not multiples of
// 16 / 32, K not a multiple of the group size, odd K.
#include <gtest/gtest.h>

#include "engine_test_support.h"

namespace moetune::engine_test {
namespace {

using mk::QuantSpec;
using mk::WeightFormat;

struct QCase {
  std::string name;
  QuantSpec spec;
  int E = 4, H = 40, I = 24;
  std::optional<mk::Isa> isa;
  int threads = 1;
  BackwardWeights bw = BackwardWeights::kRepack;
  ActivationPolicy act = ActivationPolicy::kSave;
  int64_t T = 13;
  int k = 2;
  int r = 4;
};

std::ostream& operator<<(std::ostream& os, const QCase& c) { return os << c.name; }

std::vector<QCase> cases() {
  std::vector<QCase> v;
  const std::pair<const char*, QuantSpec> specs[] = {
      {"int8", {WeightFormat::kInt8, 0}},          {"int4g32", {WeightFormat::kInt4, 32}},
      {"int4g64", {WeightFormat::kInt4, 64}},      {"int4g128", {WeightFormat::kInt4, 128}},
      {"fp8_block", {WeightFormat::kFp8Block, 0}}, {"mxfp4", {WeightFormat::kMxfp4, 0}}};
  std::vector<std::pair<std::string, std::optional<mk::Isa>>> isas;
  for (const mk::IsaInfo& info : mk::kIsas) isas.emplace_back(info.name, info.id);
  isas.emplace_back("best", std::nullopt);
  for (const auto& sp : specs) {
    for (const auto& is : isas) {
      // H=40 (K of gate/up: one full group of 32 + a short one), I=24.
      QCase c;
      c.spec = sp.second;
      c.isa = is.second;
      c.name = std::string(sp.first) + "_" + is.first + "_H40_I24";
      v.push_back(c);
      // Odd K both ways, transposed copy + recompute, 2 threads.
      c.name = std::string(sp.first) + "_" + is.first + "_H33_I17_TransposedCopy_Recompute";
      c.H = 33;
      c.I = 17;
      c.bw = BackwardWeights::kTransposedCopy;
      c.act = ActivationPolicy::kRecompute;
      c.threads = 2;
      v.push_back(c);
    }
    // Several chunks along N and K (kChunk = 256), groups past a chunk edge.
    QCase c;
    c.spec = sp.second;
    c.name = std::string(sp.first) + "_best_H301_I270_T40_threads2";
    c.E = 3;
    c.H = 301;
    c.I = 270;
    c.T = 40;
    c.threads = 2;
    c.r = 16;
    v.push_back(c);
    c.name = std::string(sp.first) + "_best_H290_I260_TransposedCopy_NoLora";
    c.H = 290;
    c.I = 260;
    c.r = 0;
    c.bw = BackwardWeights::kTransposedCopy;
    v.push_back(c);
  }
  return v;
}

class EngineQuant : public ::testing::TestWithParam<QCase> {};

TEST_P(EngineQuant, BitIdenticalToBf16EngineOnDequantizedWeights) {
  const QCase& c = GetParam();
  if (!isa_runnable(c.isa)) GTEST_SKIP() << "ISA not supported on this CPU";
  const Layer L = make_layer(c.E, c.H, c.I, all_lora(c.r), 4242 + c.H);
  const Layer D = dequantized_layer(L, c.spec);
  BatchCfg bc;
  bc.T = c.T;
  bc.k = c.k;
  const Batch b = make_batch(L, bc, 77);
  IoCfg io;

  EngineCfg ec;
  ec.isa = c.isa;
  ec.threads = c.threads;
  ec.opts.backward_weights = c.bw;
  ec.opts.activations = c.act;
  const Outputs ref_engine = run_engine(D, b, io, ec);  // bf16 weights = dq(q(W))

  ec.opts.weight_format = c.spec.format;
  ec.opts.group_size = c.spec.group_size;
  const Outputs qo = run_engine(L, b, io, ec);  // quantized from the original W
  expect_bitwise(c.name + " quantized vs bf16(dq(q(W)))", qo, ref_engine);
  expect_matches_reference(c.name, D, b, io, qo, reference(D, b));

  // The quantized weights really differ from W (the test would be vacuous otherwise).
  double diff = 0.0;
  for (size_t i = 0; i < L.W[0].size(); ++i)
    diff = std::max(diff, double(std::fabs(L.W[0][i] - D.W[0][i])));
  EXPECT_GT(diff, 0.0);
}

INSTANTIATE_TEST_SUITE_P(Cases, EngineQuant, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<QCase>& i) { return i.param.name; });

TEST(EngineQuantOptions, RepackAndTransposedCopyAndThreadsBitIdentical) {
  const Layer L = make_layer(5, 72, 40, all_lora(4), 99);
  BatchCfg bc;
  bc.T = 30;
  bc.k = 3;
  const Batch b = make_batch(L, bc, 5);
  for (const QuantSpec spec :
       {QuantSpec{WeightFormat::kInt8, 0}, QuantSpec{WeightFormat::kInt4, 32}}) {
    EngineCfg ec;
    ec.opts.weight_format = spec.format;
    ec.opts.group_size = spec.group_size;
    const Outputs base = run_engine(L, b, IoCfg{}, ec);
    EngineCfg ec2 = ec;
    ec2.threads = 3;
    ec2.opts.backward_weights = BackwardWeights::kTransposedCopy;
    ec2.opts.activations = ActivationPolicy::kRecompute;
    expect_bitwise(
        std::string(mk::weight_format_name(spec.format)) + " threads=3 transposed_copy recompute",
        run_engine(L, b, IoCfg{}, ec2), base);
  }
}

TEST(EngineQuantOptions, HotExpertRowGroupsBitIdenticalToBf16) {
  // 1700 rows on one expert: the bf16 engine works in 9 row blocks of <= 192,
  // the quantized one in 3 row groups of <= 768 (MoeExperts::work_blocks).
  const Layer L = make_layer(3, 40, 24, all_lora(4), 5150);
  BatchCfg bc;
  bc.T = 1700;
  bc.k = 1;
  bc.pattern = Pattern::kAllOne;
  bc.one = 2;
  const Batch b = make_batch(L, bc, 6);
  for (const QuantSpec spec :
       {QuantSpec{WeightFormat::kInt8, 0}, QuantSpec{WeightFormat::kInt4, 64}}) {
    const Layer D = dequantized_layer(L, spec);
    EngineCfg ec;
    ec.threads = 2;
    const Outputs ref = run_engine(D, b, IoCfg{}, ec);
    ec.opts.weight_format = spec.format;
    ec.opts.group_size = spec.group_size;
    expect_bitwise(std::string(mk::weight_format_name(spec.format)) + " hot expert",
                   run_engine(L, b, IoCfg{}, ec), ref);
  }
}

// The dequantization knobs are speed knobs only: for every slice width of
// the panels path (dequant_cols: 16, 48, 64, 256, 0 = the bundle's) and the
// tiles path (the fused kernel where the ISA has one: AMX), forward and
// backward outputs and every gradient equal the bf16 engine on dq(q(W)) bit
// for bit. H = 300 (gate/up K: a 12-row K tail past the AMX tiles), I = 270
// (the task's 256-column chunk and a ragged second one), odd widths relative
// to both; repack (the backward's W^T slices are dequantized too).
class EngineDequantPaths : public ::testing::TestWithParam<mk::Isa> {};

TEST_P(EngineDequantPaths, EveryWidthAndPathBitIdenticalToBf16OnDequantizedWeights) {
  const mk::Isa isa = GetParam();
  if (!isa_runnable(isa)) GTEST_SKIP() << "ISA " << mk::isa_name(isa) << " not supported here";
  const Layer L = make_layer(3, 300, 270, all_lora(16), 6061);
  BatchCfg bc;
  bc.T = 40;
  bc.k = 2;
  const Batch b = make_batch(L, bc, 8);
  for (const QuantSpec spec :
       {QuantSpec{WeightFormat::kInt8, 0}, QuantSpec{WeightFormat::kInt4, 32},
        QuantSpec{WeightFormat::kFp8Block, 0}, QuantSpec{WeightFormat::kMxfp4, 0}}) {
    const Layer D = dequantized_layer(L, spec);
    {
      // repack: the backward dequantizes W^T slices too (transposed_copy
      // reads its bf16 copy; its forward is the same as here).
      const BackwardWeights bw = BackwardWeights::kRepack;
      EngineCfg ec;
      ec.isa = isa;
      ec.threads = 2;
      ec.opts.backward_weights = bw;
      const Outputs ref = run_engine(D, b, IoCfg{}, ec);
      ec.opts.weight_format = spec.format;
      ec.opts.group_size = spec.group_size;
      const std::string tag = std::string(mk::isa_name(isa)) + " " +
                              mk::weight_format_name(spec.format) + " " + option_name(bw);
      for (const int cols : {16, 48, 64, 256, 0}) {
        ec.opts.dequant_cols = cols;
        ec.opts.dequant_path = DequantPath::kPanels;
        expect_bitwise(tag + " panels dequant_cols=" + std::to_string(cols),
                       run_engine(L, b, IoCfg{}, ec), ref);
      }
      ec.opts.dequant_cols = 0;
      ec.opts.dequant_path = DequantPath::kTiles;
      expect_bitwise(tag + " tiles", run_engine(L, b, IoCfg{}, ec), ref);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Isas, EngineDequantPaths,
                         ::testing::Values(mk::Isa::kScalar, mk::Isa::kAvx2, mk::Isa::kAvx512,
                                           mk::Isa::kAvx512Bf16, mk::Isa::kAmxBf16),
                         [](const ::testing::TestParamInfo<mk::Isa>& i) {
                           return std::string(mk::isa_name(i.param));
                         });

TEST(EngineQuantOptions, PackedBytesPerFormat) {
  // H = 256, I = 128 (multiples of every group size): bytes per expert.
  const int E = 2, H = 256, I = 128;
  const int64_t weights = 3LL * H * I;
  auto bytes = [&](WeightFormat f, int g, BackwardWeights bw) {
    ExpertsOptions o;
    o.weight_format = f;
    o.group_size = g;
    o.backward_weights = bw;
    MoeExperts m(make_context(EngineCfg{}), E, H, I, o);
    return int64_t(m.packed_bytes()) / E;
  };
  EXPECT_EQ(bytes(WeightFormat::kBf16, 0, BackwardWeights::kRepack), 2 * weights);
  // int8: 1 byte per weight + one fp32 scale per output channel (I, I, H).
  EXPECT_EQ(bytes(WeightFormat::kInt8, 0, BackwardWeights::kRepack), weights + 4 * (I + I + H));
  // int4: half a byte per weight + one fp32 scale per group of G along K.
  for (int g : {32, 64, 128})
    EXPECT_EQ(bytes(WeightFormat::kInt4, g, BackwardWeights::kRepack),
              weights / 2 + 4 * weights / g);
  // transposed_copy adds a bf16 copy of dq(q(W))^T.
  EXPECT_EQ(bytes(WeightFormat::kInt4, 64, BackwardWeights::kTransposedCopy),
            weights / 2 + 4 * weights / 64 + 2 * weights);
  // fp8_block: 1 byte per weight + one fp32 scale per 16-column panel and 128
  // inputs (a published 128 x 128 block's scale, held once per panel).
  EXPECT_EQ(bytes(WeightFormat::kFp8Block, 0, BackwardWeights::kRepack),
            weights + 4 * weights / (16 * 128));
  // mxfp4: half a byte per weight + one e8m0 byte per 32 inputs: the
  // checkpoint's own bytes exactly.
  EXPECT_EQ(bytes(WeightFormat::kMxfp4, 0, BackwardWeights::kRepack), weights / 2 + weights / 32);
}

TEST(EngineQuantOptions, BadGroupSizeAndNonFiniteWeightsAreClearErrors) {
  auto ctx = make_context(EngineCfg{});
  ExpertsOptions o;
  o.weight_format = WeightFormat::kInt4;
  o.group_size = 100;
  expect_invalid_argument("int4 group 100", [&] { MoeExperts m(ctx, 2, 64, 32, o); },
                          {"int4 group_size must be 32, 64 or 128, got 100"});
  o.group_size = 0;
  expect_invalid_argument("int4 group 0", [&] { MoeExperts m(ctx, 2, 64, 32, o); },
                          {"group_size must be 32, 64 or 128, got 0"});
  o.weight_format = WeightFormat::kInt8;
  o.group_size = 32;
  expect_invalid_argument("int8 with group", [&] { MoeExperts m(ctx, 2, 64, 32, o); },
                          {"group_size applies to int4 only", "int8"});
  o.group_size = 0;
  MoeExperts m(ctx, 2, 64, 32, o);
  std::vector<float> gate(2 * 32 * 64, 0.01f), up(gate), down(2 * 64 * 32, 0.01f);
  up[32 * 64 + 5 * 64 + 7] = INFINITY;  // expert 1, row 5, column 7
  expect_invalid_argument("inf weight",
                          [&] { m.load(gate.data(), up.data(), down.data(), DType::kF32); },
                          {"up_proj of expert 1", "non-finite", "row 5, column 7"});
}

}  // namespace
}  // namespace moetune::engine_test
