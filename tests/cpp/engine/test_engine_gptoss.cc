// Engine accuracy of the gpt-oss expert variant: the clamped SwiGLU
// activation (alpha, limit) and the optional frozen expert biases, for every
// ISA of the table (those this CPU cannot run are skipped), each
// against the plain double reference of engine_test_support.h with its
// dtype-derived tolerances. Clamping is made to happen (limit ~ the size of
// the pre-activations, or biases pushing past limit 7) and the tests assert
// that it did, in both directions for u.

#include <gtest/gtest.h>

#include "engine_test_support.h"

namespace moetune::engine_test {
namespace {

ActCfg clamped(float alpha, float limit) {
  ActCfg a;
  a.act = Activation::kClampedSwiGLU;
  a.alpha = alpha;
  a.limit = limit;
  return a;
}

ActCfg with_bias(ActCfg a, bool g, bool u, bool d, DType dt = DType::kF32) {
  a.bias[kGate] = g;
  a.bias[kUp] = u;
  a.bias[kDown] = d;
  a.bias_dtype = dt;
  return a;
}

std::vector<Case> gptoss_cases() {
  std::vector<Case> v;
  for (const mk::IsaInfo& info : mk::kIsas) {
    const std::string isa = info.name;
    auto add = [&](const std::string& name, auto&& edit) {
      Case c;
      c.name = isa + "_" + name;
      c.seed = 7000 + v.size();
      c.eng.isa = info.id;
      // Pre-activations are O(1): limit 1 clamps a good share of g (above)
      // and of u (both sides).
      c.act = clamped(1.702f, 1.0f);
      edit(c);
      v.push_back(c);
    };
    auto lora = [](Case& c, int g, int u, int d) {
      c.lora.r[0] = g;
      c.lora.r[1] = u;
      c.lora.r[2] = d;
    };
    // Activation x bias on/off x LoRA subsets x tails (H, I not multiples of 16).
    add("Clamped_NoBias_LoraAll", [](Case&) {});
    add("Clamped_NoBias_NoLora", [&](Case& c) { lora(c, 0, 0, 0); });
    add("Clamped_Bias_LoraAll", [](Case& c) { c.act = with_bias(c.act, true, true, true); });
    add("Clamped_Bias_NoLora_H33_I17", [&](Case& c) {
      c.H = 33;
      c.I = 17;
      lora(c, 0, 0, 0);
      c.act = with_bias(c.act, true, true, true);
    });
    add("Clamped_Bias_bf16_GateOnly_r1_H33_I17", [&](Case& c) {
      c.H = 33;
      c.I = 17;
      lora(c, 1, 0, 0);
      c.act = with_bias(c.act, true, true, true, DType::kBf16);
    });
    add("Clamped_Bias_UpDown_r16_alpha08", [&](Case& c) {
      lora(c, 0, 16, 16);
      c.act = with_bias(clamped(0.8f, 1.25f), true, true, true);
    });
    add("Clamped_DownBiasOnly_DownLora", [&](Case& c) {
      lora(c, 0, 0, 4);
      c.act = with_bias(c.act, false, false, true);
    });
    add("Clamped_GateUpBiasOnly_LoraAll_bf16", [](Case& c) {
      c.act = with_bias(c.act, true, true, false, DType::kBf16);
      c.lora.a_dtype = c.lora.b_dtype = DType::kBf16;
    });
    // gpt-oss's own constants: biases large enough to push past limit 7.
    add("GptOssConstants_BiasPastLimit7", [](Case& c) {
      c.act = with_bias(clamped(1.702f, 7.0f), true, true, true);
      c.act.bias_amp = 9.0f;
    });
    add("SwiGLU_Bias_LoraAll", [](Case& c) { c.act = with_bias(ActCfg{}, true, true, true); });
    add("SwiGLU_Bias_NoLora_H33_I17_bf16", [&](Case& c) {
      c.H = 33;
      c.I = 17;
      lora(c, 0, 0, 0);
      c.act = with_bias(ActCfg{}, true, true, true, DType::kBf16);
    });
    // Routing shapes, masks, dtypes, chunked sizes, threads.
    add("Clamped_Bias_T1_kE", [](Case& c) {
      c.batch.T = 1;
      c.batch.k = c.E;
      c.act = with_bias(c.act, true, true, true);
    });
    add("Clamped_Bias_ExpertsWithoutTokens_Mask", [](Case& c) {
      c.E = 8;
      c.batch.T = 15;
      c.batch.k = 2;
      c.batch.allowed = {1, 4, 6, 7};
      c.batch.masked = {7};
      c.act = with_bias(c.act, true, true, true);
    });
    add("Clamped_Bias_AllBf16_io", [](Case& c) {
      c.io.w = c.io.out = c.io.dout = c.io.dx = c.io.dw = DType::kBf16;
      c.io.x = DType::kF32;
      c.eng.load_dtype = DType::kF32;
      c.act = with_bias(c.act, true, true, true);
    });
    add("Clamped_Bias_H290_I270_Chunks_threads2", [&](Case& c) {
      c.E = 3;
      c.H = 290;
      c.I = 270;
      c.batch.T = 24;
      c.eng.threads = 2;
      lora(c, 4, 1, 16);
      c.act = with_bias(c.act, true, true, true);
    });
  }
  return v;
}

class EngineGptOss : public ::testing::TestWithParam<Case> {};

TEST_P(EngineGptOss, MatchesDoubleReference) {
  const Case& c = GetParam();
  if (!isa_runnable(c.eng.isa)) GTEST_SKIP() << "ISA not supported on this CPU";
  const Layer L = make_layer(c.E, c.H, c.I, c.lora, c.seed, c.act);
  const Batch b = make_batch(L, c.batch, c.seed * 7 + 1);
  const Ref R = reference(L, b);
  if (c.act.act == Activation::kClampedSwiGLU) {
    // The clamps must really act (and not everywhere), or this tests nothing new.
    EXPECT_GT(R.clamped_g, 0) << "no g above the limit";
    EXPECT_GT(R.clamped_u, 0) << "no u outside [-limit, limit]";
    EXPECT_LT(R.clamped_g + R.clamped_u, 2 * R.elements);
  }
  const Outputs o = run_engine(L, b, c.io, c.eng);
  expect_matches_reference(c.name, L, b, c.io, o, R);
  // Saving vs recomputing g/u, 3 threads and the transposed copy: bitwise equal.
  EngineCfg ec = c.eng;
  ec.threads = 3;
  ec.opts.activations = ActivationPolicy::kRecompute;
  ec.opts.backward_weights = BackwardWeights::kTransposedCopy;
  expect_bitwise(c.name + " threads=3+kRecompute+kTransposedCopy", run_engine(L, b, c.io, ec), o);
}

INSTANTIATE_TEST_SUITE_P(Cases, EngineGptOss, ::testing::ValuesIn(gptoss_cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

// The biases and the activation really enter: dropping either changes every
// output beyond the tolerance (so a path that ignored them could not pass).
TEST(EngineGptOss, BiasAndActivationMatter) {
  Case c;
  const ActCfg full = with_bias(clamped(1.702f, 1.0f), true, true, true);
  const Layer L = make_layer(c.E, c.H, c.I, c.lora, 91, full);
  const Batch b = make_batch(L, c.batch, 92);
  const Outputs o = run_engine(L, b, c.io, c.eng);
  const Ref R = reference(L, b);
  ActCfg variants[3] = {with_bias(clamped(1.702f, 1.0f), false, false, false),
                        with_bias(clamped(1.702f, 1.0f), true, true, false), full};
  variants[2].act = Activation::kSwiGLU;
  for (const ActCfg& a : variants) {
    Layer Lv = L;
    Lv.act = a;
    for (int p = 0; p < 3; ++p)
      if (!a.bias[p]) Lv.bias[p].clear(), Lv.bias_b[p].clear();
    const Ref Rv = reference(Lv, b);
    double scale = 0.0, diff = 0.0;
    for (size_t i = 0; i < R.out.size(); ++i) {
      scale = std::max(scale, std::fabs(R.out[i]));
      diff = std::max(diff, std::fabs(R.out[i] - Rv.out[i]));
    }
    EXPECT_GT(diff, 5 * kCOut * kU * scale)
        << "variant too close to the full layer (diff " << diff << ", scale " << scale << ")";
  }
  expect_close("out", o.out, R.out, kCOut);
}

TEST(EngineGptOss, BadOptionsAndBiasDtype) {
  auto ctx = make_context(EngineCfg{});
  for (float limit : {0.0f, -1.0f, std::numeric_limits<float>::infinity(),
                      std::numeric_limits<float>::quiet_NaN()}) {
    ExpertsOptions o;
    o.activation = Activation::kClampedSwiGLU;
    o.swiglu_limit = limit;
    expect_invalid_argument("limit " + std::to_string(limit),
                            [&] { MoeExperts m(ctx, 2, 8, 8, o); }, {"limit"});
  }
  ExpertsOptions o;
  o.activation = Activation::kClampedSwiGLU;
  o.swiglu_alpha = std::numeric_limits<float>::quiet_NaN();
  expect_invalid_argument("alpha NaN", [&] { MoeExperts m(ctx, 2, 8, 8, o); }, {"alpha"});
  MoeExperts m(ctx, 2, 8, 8, ExpertsOptions{});
  std::vector<int32_t> b(16, 0);
  expect_invalid_argument("int bias",
                          [&] { m.load_biases(b.data(), nullptr, nullptr, DType::kI32); },
                          {"biases", "int32"});
  EXPECT_FALSE(m.has_bias(Proj::kGate) || m.has_bias(Proj::kUp) || m.has_bias(Proj::kDown));
}

}  // namespace
}  // namespace moetune::engine_test
