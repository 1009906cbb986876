// Engine accuracy: moetune::MoeExperts forward + backward against the plain
// double-precision reference (engine_test_support.h), over hand-picked and
// seeded random configurations. Tolerances are derived in engine_test_support.h.

#include <gtest/gtest.h>

#include "engine_test_support.h"

namespace moetune::engine_test {
namespace {

std::vector<Case> accuracy_cases() {
  std::vector<Case> v;
  auto add = [&](const std::string& name, auto&& edit) {
    Case c;
    c.name = name;
    c.seed = 1000 + v.size();
    edit(c);
    v.push_back(c);
  };
  auto no_lora = [](Case& c) { c.lora.r[0] = c.lora.r[1] = c.lora.r[2] = 0; };

  // Shapes (H, I not multiples of 16, odd ones) x LoRA placement and rank.
  add("H40_I24_NoLora", [&](Case& c) { no_lora(c); });
  add("H40_I24_LoraAll_r4", [](Case&) {});
  add("H33_I17_LoraAll_r1", [](Case& c) {
    c.H = 33;
    c.I = 17;
    c.lora.r[0] = c.lora.r[1] = c.lora.r[2] = 1;
  });
  add("H33_I17_LoraAll_r16", [](Case& c) {
    c.H = 33;
    c.I = 17;
    c.lora.r[0] = c.lora.r[1] = c.lora.r[2] = 16;
  });
  add("H33_I17_NoLora", [&](Case& c) {
    c.H = 33;
    c.I = 17;
    no_lora(c);
  });
  add("H40_I24_GateOnly_r4", [](Case& c) { c.lora.r[1] = c.lora.r[2] = 0; });
  add("H40_I24_UpOnly_r16", [](Case& c) {
    c.lora.r[0] = c.lora.r[2] = 0;
    c.lora.r[1] = 16;
  });
  add("H40_I24_DownOnly_r4", [](Case& c) { c.lora.r[0] = c.lora.r[1] = 0; });
  add("H33_I17_DownOnly_r1", [](Case& c) {
    c.H = 33;
    c.I = 17;
    c.lora.r[0] = c.lora.r[1] = 0;
    c.lora.r[2] = 1;
  });
  add("H40_I24_MixedRanks_g1_u16_d4", [](Case& c) {
    c.lora.r[0] = 1;
    c.lora.r[1] = 16;
    c.lora.r[2] = 4;
    c.lora.s = 0.3f;
  });
  add("H40_I24_LoraAll_r40", [](Case& c) { c.lora.r[0] = c.lora.r[1] = c.lora.r[2] = 40; });
  add("H17_I9_LoraAll_r16_RankAboveDims", [](Case& c) {
    c.H = 17;
    c.I = 9;
    c.lora.r[0] = c.lora.r[1] = c.lora.r[2] = 16;
  });
  // Routing shapes.
  add("T1_k1", [](Case& c) {
    c.batch.T = 1;
    c.batch.k = 1;
  });
  add("T1_kE", [](Case& c) {
    c.batch.T = 1;
    c.batch.k = c.E;
  });
  add("T7_kE", [](Case& c) {
    c.H = 33;
    c.I = 17;
    c.batch.T = 7;
    c.batch.k = c.E;
  });
  add("AllTokensOneExpert_k1", [](Case& c) {
    c.E = 5;
    c.batch.T = 20;
    c.batch.k = 1;
    c.batch.pattern = Pattern::kAllOne;
    c.batch.one = 3;
  });
  add("AllTokensOneExpert_k3_SameExpertThrice", [](Case& c) {
    c.batch.T = 6;
    c.batch.k = 3;
    c.batch.pattern = Pattern::kAllOne;
    c.batch.one = 0;
  });
  add("ExpertsWithoutTokens", [](Case& c) {
    c.E = 8;
    c.batch.T = 15;
    c.batch.k = 2;
    c.batch.allowed = {1, 4, 6};
  });
  add("ExpertsWithoutTokens_r1_ids32", [](Case& c) {
    c.E = 7;
    c.H = 33;
    c.I = 17;
    c.lora.r[0] = c.lora.r[1] = c.lora.r[2] = 1;
    c.batch.T = 11;
    c.batch.k = 2;
    c.batch.allowed = {0, 5};
    c.io.ids = DType::kI32;
  });
  add("DuplicateIdsInToken", [](Case& c) {
    c.E = 3;
    c.batch.T = 12;
    c.batch.k = 3;
    c.batch.pattern = Pattern::kDuplicates;
  });
  add("SingleExpertLayer_E1", [](Case& c) {
    c.E = 1;
    c.batch.k = 1;
    c.batch.T = 5;
  });
  // Input / output dtypes.
  add("X_f32", [](Case& c) { c.io.x = DType::kF32; });
  add("X_f32_Lora_bf16", [](Case& c) {
    c.io.x = DType::kF32;
    c.lora.a_dtype = c.lora.b_dtype = DType::kBf16;
  });
  add("Lora_bf16", [](Case& c) { c.lora.a_dtype = c.lora.b_dtype = DType::kBf16; });
  add("LoraA_bf16_B_f32", [](Case& c) { c.lora.a_dtype = DType::kBf16; });
  add("LoraA_f32_B_bf16_H33", [](Case& c) {
    c.H = 33;
    c.I = 17;
    c.lora.b_dtype = DType::kBf16;
  });
  add("Ids_i32", [](Case& c) { c.io.ids = DType::kI32; });
  add("Ids_i64_T65_TwoTokenBlocks", [](Case& c) {
    c.batch.T = 65;
    c.io.ids = DType::kI64;
  });
  add("Weights_loaded_f32", [](Case& c) { c.eng.load_dtype = DType::kF32; });
  add("AllBf16_io",
      [](Case& c) { c.io.w = c.io.out = c.io.dout = c.io.dx = c.io.dw = DType::kBf16; });
  add("AllF32_io",
      [](Case& c) { c.io.x = c.io.w = c.io.out = c.io.dout = c.io.dx = c.io.dw = DType::kF32; });
  add("OnlyLoraGrads_NoDxNoDw", [](Case& c) { c.io.want_dx = c.io.want_dw = false; });
  add("Only_dA_and_dx", [](Case& c) {
    c.io.want_dB = false;
    c.io.want_dw = false;
  });
  add("Only_dB_and_dw", [](Case& c) {
    c.io.want_dA = false;
    c.io.want_dx = false;
  });
  // expert_mask.
  add("ExpertMask", [](Case& c) {
    c.E = 6;
    c.batch.T = 16;
    c.batch.k = 2;
    c.batch.masked = {1, 3};
  });
  add("ExpertMask_NoLora_ids32", [&](Case& c) {
    no_lora(c);
    c.E = 6;
    c.batch.T = 16;
    c.batch.k = 3;
    c.batch.masked = {0, 4, 5};
    c.io.ids = DType::kI32;
  });
  add("ExpertMask_AllMasked", [](Case& c) {
    c.E = 3;
    c.batch.T = 4;
    c.batch.k = 2;
    c.batch.masked = {0, 1, 2};
  });
  // Multi-chunk shapes (kChunk = 256), several threads.
  add("H301_I270_Chunks_T70_threads2", [](Case& c) {
    c.E = 5;
    c.H = 301;
    c.I = 270;
    c.batch.T = 70;
    c.batch.k = 2;
    c.eng.threads = 2;
    c.lora.r[0] = 4;
    c.lora.r[1] = 1;
    c.lora.r[2] = 16;
  });
  // Hot experts with more rows than one row block (routing.h kRowBlock = 192).
  add("HotExpert_T400_AllOnOne_threads2", [](Case& c) {
    c.E = 3;
    c.H = 33;
    c.I = 17;
    c.batch.T = 400;
    c.batch.k = 1;
    c.batch.pattern = Pattern::kAllOne;
    c.batch.one = 1;
    c.eng.threads = 2;
  });
  add("HotExpert_T300_k3_Skewed_threads3", [](Case& c) {
    c.E = 6;
    c.batch.T = 300;
    c.batch.k = 3;
    c.batch.pattern = Pattern::kHot;
    c.batch.one = 4;
    c.eng.threads = 3;
    c.lora.r[1] = 1;
    c.lora.r[2] = 16;
  });
  add("HotExpert_T193_Recompute_TransposedCopy", [](Case& c) {
    c.E = 2;
    c.batch.T = 193;
    c.batch.k = 1;
    c.batch.pattern = Pattern::kAllOne;
    c.batch.one = 0;
    c.eng.threads = 2;
    c.eng.opts.activations = ActivationPolicy::kRecompute;
    c.eng.opts.backward_weights = BackwardWeights::kTransposedCopy;
  });
  // Forced ISAs.
  add("IsaScalar_H33_I17_LoraAll", [](Case& c) {
    c.H = 33;
    c.I = 17;
    c.eng.isa = mk::Isa::kScalar;
  });
  add("IsaScalar_ExpertMask_Lora_bf16", [](Case& c) {
    c.E = 6;
    c.batch.T = 16;
    c.batch.masked = {2};
    c.eng.isa = mk::Isa::kScalar;
    c.lora.a_dtype = c.lora.b_dtype = DType::kBf16;
  });
  add("IsaAvx2_H33_I17_LoraAll", [](Case& c) {
    c.H = 33;
    c.I = 17;
    c.eng.isa = mk::Isa::kAvx2;
  });
  add("IsaAvx2_MixedRanks_threads3_Recompute_TransposedCopy", [](Case& c) {
    c.E = 5;
    c.batch.T = 13;
    c.lora.r[0] = 16;
    c.lora.r[1] = 0;
    c.lora.r[2] = 1;
    c.eng.isa = mk::Isa::kAvx2;
    c.eng.threads = 3;
    c.eng.opts.activations = ActivationPolicy::kRecompute;
    c.eng.opts.backward_weights = BackwardWeights::kTransposedCopy;
  });
  add("IsaAvx2_H290_I260_Chunks", [](Case& c) {
    c.E = 3;
    c.H = 290;
    c.I = 260;
    c.batch.T = 20;
    c.eng.isa = mk::Isa::kAvx2;
  });
  // avx512 (F/BW/VL/DQ, no BF16): K beyond one of its K chunks (256 pairs, H = 601),
  // row blocks with tails (T*k/E rows per expert), odd K, mixed ranks.
  add("IsaAvx512_H33_I17_LoraAll", [](Case& c) {
    c.H = 33;
    c.I = 17;
    c.eng.isa = mk::Isa::kAvx512;
  });
  add("IsaAvx512_MixedRanks_threads3_Recompute_TransposedCopy", [](Case& c) {
    c.E = 5;
    c.batch.T = 13;
    c.lora.r[0] = 16;
    c.lora.r[1] = 0;
    c.lora.r[2] = 1;
    c.eng.isa = mk::Isa::kAvx512;
    c.eng.threads = 3;
    c.eng.opts.activations = ActivationPolicy::kRecompute;
    c.eng.opts.backward_weights = BackwardWeights::kTransposedCopy;
  });
  add("IsaAvx512_H601_I260_T40_KChunks", [](Case& c) {
    c.E = 3;
    c.H = 601;
    c.I = 260;
    c.batch.T = 40;
    c.eng.isa = mk::Isa::kAvx512;
  });
  return v;
}

class EngineAccuracy : public ::testing::TestWithParam<Case> {};

TEST_P(EngineAccuracy, MatchesDoubleReference) {
  const Case& c = GetParam();
  if (!isa_runnable(c.eng.isa)) GTEST_SKIP() << "ISA not supported on this CPU";
  const Layer L = make_layer(c.E, c.H, c.I, c.lora, c.seed);
  Batch b = make_batch(L, c.batch, c.seed * 7 + 1);
  if (!c.batch.masked.empty() && c.batch.k >= 2 && c.batch.masked.size() >= 2 &&
      c.batch.pattern == Pattern::kDistinct) {
    // Token 0 routed only to masked experts: its out and dx rows must be 0.
    for (int j = 0; j < c.batch.k; ++j) b.ids[j] = c.batch.masked[j % c.batch.masked.size()];
  }
  const Ref R = reference(L, b);
  const Outputs o = run_engine(L, b, c.io, c.eng);
  expect_matches_reference(c.name, L, b, c.io, o, R);

  // Explicit structural checks on top of the generic ones.
  std::vector<int64_t> count(c.E, 0);
  for (size_t s = 0; s < b.ids.size(); ++s)
    if (routed(b, int64_t(s))) ++count[b.ids[s]];
  for (int p = 0; p < 3; ++p) {
    if (!L.on(p)) continue;
    const size_t na = L.A[p].size() / c.E, nb = L.B[p].size() / c.E;
    for (int e = 0; e < c.E; ++e) {
      if (count[e] != 0) continue;
      for (size_t i = 0; c.io.want_dA && i < na; ++i) {
        ASSERT_EQ(o.dA[p][e * na + i], 0.0f)
            << "dA_" << kProjName[p] << " of expert " << e << " without tokens";
      }
      for (size_t i = 0; c.io.want_dB && i < nb; ++i) {
        ASSERT_EQ(o.dB[p][e * nb + i], 0.0f)
            << "dB_" << kProjName[p] << " of expert " << e << " without tokens";
      }
    }
  }
  for (size_t s = 0; c.io.want_dw && s < b.ids.size(); ++s) {
    if (!routed(b, int64_t(s))) {
      EXPECT_EQ(o.dw[s], 0.0f) << "dw of masked slot " << s;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, EngineAccuracy, ::testing::ValuesIn(accuracy_cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

// Seeded random configurations, including degenerate sizes (H = 1, I = 1,
// r > H, E = 1, T = 0): each is checked against the reference and, bit for
// bit, against a run with 3 threads + kRecompute + kTransposedCopy.
std::vector<Case> random_cases() {
  std::vector<Case> v;
  Rng rng(20261123);
  const std::optional<mk::Isa> isas[] = {std::nullopt, std::nullopt, mk::Isa::kScalar,
                                         mk::Isa::kAvx2, mk::Isa::kAvx512};
  const int ranks[] = {0, 1, 2, 4, 16};
  for (int i = 0; i < 40; ++i) {
    Case c;
    c.seed = 5000 + i;
    c.E = 1 + rng.below(8);
    c.H = i < 4 ? 1 + rng.below(3) : 1 + rng.below(70);
    c.I = i >= 2 && i < 6 ? 1 + rng.below(2) : 1 + rng.below(50);
    for (int p = 0; p < 3; ++p) c.lora.r[p] = ranks[rng.below(5)];
    c.lora.s = round_bf(rng.uni(0.1f, 4.0f));
    c.lora.a_dtype = rng.below(2) ? DType::kBf16 : DType::kF32;
    c.lora.b_dtype = rng.below(2) ? DType::kBf16 : DType::kF32;
    c.batch.T = rng.below(10) == 0 ? 0 : 1 + rng.below(80);
    c.batch.k = 1 + rng.below(std::min(c.E, 4));
    c.batch.pattern = rng.below(4) == 0 ? Pattern::kDuplicates : Pattern::kDistinct;
    if (c.E > 2 && rng.below(3) == 0) c.batch.masked = {rng.below(c.E)};
    c.io.x = rng.below(2) ? DType::kBf16 : DType::kF32;
    c.io.ids = rng.below(2) ? DType::kI32 : DType::kI64;
    c.io.w = rng.below(2) ? DType::kBf16 : DType::kF32;
    c.io.out = rng.below(2) ? DType::kBf16 : DType::kF32;
    c.io.dout = rng.below(2) ? DType::kBf16 : DType::kF32;
    c.io.dx = rng.below(2) ? DType::kBf16 : DType::kF32;
    c.io.dw = rng.below(2) ? DType::kBf16 : DType::kF32;
    c.eng.isa = isas[rng.below(5)];
    c.eng.threads = 1 + rng.below(2);
    c.eng.load_dtype = rng.below(2) ? DType::kBf16 : DType::kF32;
    char name[160];
    std::snprintf(name, sizeof name, "R%02d_E%d_H%d_I%d_T%lld_k%d_r%d_%d_%d_%s", i, c.E, c.H, c.I,
                  static_cast<long long>(c.batch.T), c.batch.k, c.lora.r[0], c.lora.r[1],
                  c.lora.r[2], c.eng.isa ? mk::isa_name(*c.eng.isa) : "best");
    c.name = name;
    v.push_back(c);
  }
  return v;
}

class EngineRandom : public ::testing::TestWithParam<Case> {};

TEST_P(EngineRandom, MatchesReferenceAndVariantsBitwise) {
  const Case& c = GetParam();
  if (!isa_runnable(c.eng.isa)) GTEST_SKIP() << "ISA not supported on this CPU";
  const Layer L = make_layer(c.E, c.H, c.I, c.lora, c.seed);
  const Batch b = make_batch(L, c.batch, c.seed * 7 + 1);
  const Outputs o = run_engine(L, b, c.io, c.eng);
  expect_matches_reference(c.name, L, b, c.io, o, reference(L, b));
  EngineCfg ec = c.eng;
  ec.threads = 3;
  ec.opts.activations = ActivationPolicy::kRecompute;
  ec.opts.backward_weights = BackwardWeights::kTransposedCopy;
  expect_bitwise(c.name + " threads=3+kRecompute+kTransposedCopy", run_engine(L, b, c.io, ec), o);
}

INSTANTIATE_TEST_SUITE_P(Cases, EngineRandom, ::testing::ValuesIn(random_cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

}  // namespace
}  // namespace moetune::engine_test
