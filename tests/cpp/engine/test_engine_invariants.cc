// Engine exactness invariants (bitwise across thread counts, activation
// policies and backward-weight modes), re-entrancy and async use.

#include <gtest/gtest.h>

#include "engine_test_support.h"

namespace moetune::engine_test {
namespace {

// ---------------------------------------------------------------------------
// Exactness invariants: threads, activation policy, backward weights.
// ---------------------------------------------------------------------------

struct InvCase {
  std::string name;
  int E, H, I;
  int r[3];
  BatchCfg batch;
  std::optional<mk::Isa> isa;
};

std::ostream& operator<<(std::ostream& os, const InvCase& c) { return os << c.name; }

std::vector<InvCase> invariant_cases() {
  std::vector<InvCase> v;
  {
    InvCase c{"Small_H33_I17_LoraAll", 4, 33, 17, {4, 4, 4}, {}, std::nullopt};
    c.batch.T = 9;
    c.batch.k = 2;
    v.push_back(c);
  }
  {
    InvCase c{"Chunks_H300_I273_T70_MixedRanks", 5, 300, 273, {16, 1, 4}, {}, std::nullopt};
    c.batch.T = 70;
    c.batch.k = 2;
    c.batch.masked = {2};
    v.push_back(c);
  }
  {
    InvCase c{"Scalar_H40_I24_GateDown", 6, 40, 24, {4, 0, 1}, {}, mk::Isa::kScalar};
    c.batch.T = 30;
    c.batch.k = 3;
    c.batch.allowed = {0, 2, 3, 5};
    v.push_back(c);
  }
  {
    InvCase c{"HotExpertRowBlocks_T450_H33_I17", 4, 33, 17, {4, 1, 4}, {}, std::nullopt};
    c.batch.T = 450;
    c.batch.k = 2;
    c.batch.pattern = Pattern::kHot;
    c.batch.one = 2;
    v.push_back(c);
  }
  {
    InvCase c{"Avx2_H40_I24_NoLora", 4, 40, 24, {0, 0, 0}, {}, mk::Isa::kAvx2};
    c.batch.T = 25;
    c.batch.k = 2;
    v.push_back(c);
  }
  {
    InvCase c{"Avx512_H530_I40_LoraAll", 3, 530, 40, {4, 2, 8}, {}, mk::Isa::kAvx512};
    c.batch.T = 30;
    c.batch.k = 2;
    v.push_back(c);
  }
  return v;
}

class EngineInvariants : public ::testing::TestWithParam<InvCase> {};

TEST_P(EngineInvariants, BitwiseIdenticalAcrossThreadsPoliciesAndWeights) {
  const InvCase& c = GetParam();
  if (!isa_runnable(c.isa)) GTEST_SKIP() << "ISA not supported on this CPU";
  LoraCfg lc;
  for (int p = 0; p < 3; ++p) lc.r[p] = c.r[p];
  const Layer L = make_layer(c.E, c.H, c.I, lc, 77);
  const Batch b = make_batch(L, c.batch, 78);
  IoCfg io;
  EngineCfg base;
  base.isa = c.isa;
  const Outputs ref = run_engine(L, b, io, base);
  expect_matches_reference(c.name + " base", L, b, io, ref, reference(L, b));

  struct Variant {
    const char* name;
    int threads;
    ActivationPolicy act;
    BackwardWeights bw;
    std::vector<int> cpus = {};
  };
  const Variant variants[] = {
      {"threads=2", 2, ActivationPolicy::kSave, BackwardWeights::kRepack},
      {"threads=3", 3, ActivationPolicy::kSave, BackwardWeights::kRepack},
      {"kRecompute", 1, ActivationPolicy::kRecompute, BackwardWeights::kRepack},
      {"kTransposedCopy", 1, ActivationPolicy::kSave, BackwardWeights::kTransposedCopy},
      {"threads=3+kRecompute+kTransposedCopy", 3, ActivationPolicy::kRecompute,
       BackwardWeights::kTransposedCopy},
      {"threads=2+kRecompute", 2, ActivationPolicy::kRecompute, BackwardWeights::kRepack},
      {"threads=3 pinned to cpu 0", 3, ActivationPolicy::kSave, BackwardWeights::kRepack, {0}},
  };
  for (const Variant& var : variants) {
    EngineCfg ec = base;
    ec.threads = var.threads;
    ec.opts.activations = var.act;
    ec.opts.backward_weights = var.bw;
    ec.cpus = var.cpus;
    expect_bitwise(c.name + " " + var.name + " vs threads=1+kSave+kRepack",
                   run_engine(L, b, io, ec), ref);
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, EngineInvariants, ::testing::ValuesIn(invariant_cases()),
                         [](const ::testing::TestParamInfo<InvCase>& i) { return i.param.name; });

// ---------------------------------------------------------------------------
// Re-entrancy and async.
// ---------------------------------------------------------------------------

class EngineReentrancy : public EngineFixture {};

TEST(EngineInterleaved, ThreeForwardsThenBackwardsInOrder231) {
  const Layer L = make_layer(5, 33, 40, all_lora(4), 501);
  BatchCfg bc[3];
  bc[0].T = 5;
  bc[1].T = 37;  // largest in the middle: workspaces grow between calls
  bc[2].T = 12;
  bc[2].k = 3;
  bc[1].masked = {4};
  std::vector<Batch> batches;
  for (int i = 0; i < 3; ++i) batches.push_back(make_batch(L, bc[i], 600 + i));
  IoCfg io;
  for (ActivationPolicy act : {ActivationPolicy::kSave, ActivationPolicy::kRecompute}) {
    EngineCfg ec;
    ec.threads = 2;
    ec.opts.activations = act;
    const std::string tag = act == ActivationPolicy::kSave ? "kSave" : "kRecompute";
    auto m = make_experts(L, ec);
    // Isolated forward+backward per batch, for a bitwise comparison.
    std::vector<Outputs> isolated;
    for (int i = 0; i < 3; ++i) isolated.push_back(run_engine(*m, L, batches[i], io));

    std::vector<std::unique_ptr<Call>> calls;
    std::vector<std::shared_ptr<Saved>> saved;
    for (int i = 0; i < 3; ++i) {
      calls.push_back(std::make_unique<Call>(L, batches[i], io));
      saved.push_back(m->forward(calls[i]->fwd()));
    }
    for (int i : {1, 2, 0}) m->backward(saved[i], calls[i]->bwd());
    for (int i = 0; i < 3; ++i) {
      const std::string name = tag + " batch " + std::to_string(i + 1);
      const Outputs o = calls[i]->collect();
      expect_matches_reference(name, L, batches[i], io, o, reference(L, batches[i]));
      expect_bitwise(name + " interleaved vs isolated", o, isolated[i]);
    }
  }
}

TEST_F(EngineReentrancy, BackwardTwiceOnSameSavedIsIdentical) {
  build(511, tokens(10), threads(2));
  const Batch other = make_batch(L, tokens(10), 513);
  Call c(L, b, io);
  auto saved = m->forward(c.fwd());
  m->backward(saved, c.bwd());
  const Outputs first = c.collect();
  expect_reference("first backward", first);
  // Something else in between, reusing the context's workspaces.
  run_engine(*m, L, other, io);
  c.poison_grads();
  m->backward(saved, c.bwd());
  expect_bitwise("second backward on the same Saved", c.collect(), first);
}

TEST_F(EngineReentrancy, AsyncForwardBackwardChainedWithoutWaiting) {
  build(521, tokens(9), threads(3), {4, 33, 17});
  io.out = DType::kBf16;
  const Batch& b1 = b;
  const Batch b2 = make_batch(L, tokens(21, 3), 523);
  Call c1(L, b1, io), c2(L, b2, io);
  std::shared_ptr<Saved> s1, s2;
  Job f1 = m->forward_async(c1.fwd(), &s1);
  ASSERT_TRUE(s1 != nullptr) << "forward_async must hand out the Saved handle at once";
  Job bw1 = m->backward_async(s1, c1.bwd());
  Job f2 = m->forward_async(c2.fwd(), &s2);
  Job bw2 = m->backward_async(s2, c2.bwd());
  bw2.wait();  // jobs run in order: everything before has completed
  EXPECT_TRUE(f1.ready());
  EXPECT_TRUE(bw1.ready());
  EXPECT_TRUE(f2.ready());
  f1.wait();
  bw1.wait();
  f2.wait();
  expect_matches_reference("async 1", L, b1, io, c1.collect(), reference(L, b1));
  expect_matches_reference("async 2", L, b2, io, c2.collect(), reference(L, b2));
  // And the same bits as the synchronous calls.
  expect_bitwise("async 1 vs sync", c1.collect(), run_engine(*m, L, b1, io));
  expect_bitwise("async 2 vs sync", c2.collect(), run_engine(*m, L, b2, io));
}

TEST(EngineInterleaved, ConcurrentCallersOnOneEngine) {
  // forward/backward may be called from any thread: four caller threads share
  // one MoeExperts; each result equals its isolated run bit for bit.
  const Layer L = make_layer(5, 33, 40, all_lora(4), 541);
  IoCfg io;
  EngineCfg ec;
  ec.threads = 2;
  auto m = make_experts(L, ec);
  std::vector<Batch> batches;
  std::vector<Outputs> isolated;
  for (int i = 0; i < 4; ++i) {
    BatchCfg bc;
    bc.T = 3 + 7 * i;
    bc.k = 1 + i % 3;
    batches.push_back(make_batch(L, bc, 700 + i));
  }
  for (int i = 0; i < 4; ++i) isolated.push_back(run_engine(*m, L, batches[i], io));
  std::vector<std::unique_ptr<Call>> calls;
  for (int i = 0; i < 4; ++i) calls.push_back(std::make_unique<Call>(L, batches[i], io));
  std::vector<std::string> errors(4);
  std::vector<std::thread> callers;
  for (int i = 0; i < 4; ++i) {
    callers.emplace_back([&, i] {
      try {
        for (int rep = 0; rep < 3; ++rep) {
          std::shared_ptr<Saved> s;
          Job f = m->forward_async(calls[i]->fwd(), &s);
          Job b = m->backward_async(s, calls[i]->bwd());
          b.wait();
          f.wait();
        }
      } catch (const std::exception& e) {
        errors[i] = e.what();
      }
    });
  }
  for (std::thread& t : callers) t.join();
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(errors[i], "") << "caller " << i;
    expect_bitwise("caller " + std::to_string(i), calls[i]->collect(), isolated[i]);
  }
}

TEST_F(EngineReentrancy, TwoContextsSideBySide) {
  // Two engines with different ISAs/threads in flight at once are independent.
  build(531, tokens(17), threads(2));
  EngineCfg e2;
  e2.isa = mk::Isa::kScalar;
  MoeExperts* m1 = m.get();
  auto m2 = make_experts(L, e2);
  Call c1(L, b, io), c2(L, b, io);
  std::shared_ptr<Saved> s1, s2;
  Job f1 = m1->forward_async(c1.fwd(), &s1);
  Job f2 = m2->forward_async(c2.fwd(), &s2);
  Job g1 = m1->backward_async(s1, c1.bwd());
  Job g2 = m2->backward_async(s2, c2.bwd());
  g1.wait();
  g2.wait();
  const Ref R = reference(L, b);
  expect_matches_reference("context 1", L, b, io, c1.collect(), R);
  expect_matches_reference("context 2 (scalar)", L, b, io, c2.collect(), R);
}

}  // namespace
}  // namespace moetune::engine_test
