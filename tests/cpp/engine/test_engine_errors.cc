// Engine error handling, build_routing, Context jobs and edge cases.

#include <gtest/gtest.h>

#include "engine_test_support.h"

namespace moetune::engine_test {
namespace {

class EngineErrors : public EngineFixture {};
class EngineEdge : public EngineFixture {};
class ContextJobs : public EngineFixture {};

// ---------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------

TEST(RoutingErrors, OutOfRangeIdsThrowNamingTopkIdsAndValue) {
  const int E = 5;
  const int64_t T = 3;
  const int k = 2;
  struct Bad {
    int64_t value;
    int64_t pos;
  };
  const Bad bads[] = {{E, 3}, {-1, 0}, {E + 100, 5}, {-7, 2}};
  for (const Bad& bad : bads) {
    std::vector<int64_t> ids64 = {0, 1, 2, 3, 4, 0};
    ids64[bad.pos] = bad.value;
    std::vector<int32_t> ids32(ids64.begin(), ids64.end());
    const std::string v = std::to_string(bad.value);
    expect_invalid_argument("int64 id " + v,
                            [&] { build_routing(ids64.data(), DType::kI64, T, k, E, nullptr); },
                            {"topk_ids", v});
    expect_invalid_argument("int32 id " + v,
                            [&] { build_routing(ids32.data(), DType::kI32, T, k, E, nullptr); },
                            {"topk_ids", v});
  }
  // int64 ids that would alias a valid id if truncated to 32 bits.
  for (int64_t v :
       {(int64_t(1) << 32) + 1, -(int64_t(1) << 32), std::numeric_limits<int64_t>::min()}) {
    std::vector<int64_t> ids64 = {0, 1, 2, v, 4, 0};
    expect_invalid_argument("int64 id " + std::to_string(v),
                            [&] { build_routing(ids64.data(), DType::kI64, T, k, E, nullptr); },
                            {"topk_ids", std::to_string(v)});
  }
  // A masked expert id is still an id: out-of-range is an error even when masked would not matter.
  std::vector<uint8_t> mask(E, 0);
  std::vector<int64_t> ids64 = {0, 1, 2, 3, 4, E};
  expect_invalid_argument("id = E with mask",
                          [&] { build_routing(ids64.data(), DType::kI64, T, k, E, mask.data()); },
                          {"topk_ids", std::to_string(E)});
  // ids dtype must be integer.
  expect_invalid_argument("float ids",
                          [&] { build_routing(ids64.data(), DType::kF32, T, k, E, nullptr); },
                          {"topk_ids"});
}

TEST(RoutingTest, CountingSortIsStableAndMaskedExpertsGetNoRows) {
  const int E = 4;
  const int64_t T = 5;
  const int k = 2;
  const std::vector<int32_t> ids = {2, 0, 2, 3, 0, 2, 1, 3, 2, 0};
  const std::vector<uint8_t> mask = {1, 0, 1, 1};
  const Routing r = build_routing(ids.data(), DType::kI32, T, k, E, mask.data());
  EXPECT_EQ(r.T, T);
  EXPECT_EQ(r.k, k);
  EXPECT_EQ(r.E, E);
  // counts: e0 = 3, e1 = masked (1 slot), e2 = 4, e3 = 2
  EXPECT_EQ(r.offsets, (std::vector<int64_t>{0, 3, 3, 7, 9}));
  EXPECT_EQ(r.rows(), 9);
  EXPECT_EQ(r.slot_of, (std::vector<int32_t>{1, 4, 9, 0, 2, 5, 8, 3, 7}));
  std::vector<int32_t> row_of(T * k, -1);
  for (size_t row = 0; row < r.slot_of.size(); ++row) row_of[r.slot_of[row]] = int32_t(row);
  EXPECT_EQ(r.row_of, row_of);
  EXPECT_EQ(r.row_of[6], -1);                            // the masked slot
  EXPECT_EQ(r.active, (std::vector<int32_t>{2, 0, 3}));  // most rows first, stable
  // int64 ids, no mask.
  const std::vector<int64_t> ids64(ids.begin(), ids.end());
  const Routing r2 = build_routing(ids64.data(), DType::kI64, T, k, E, nullptr);
  EXPECT_EQ(r2.offsets, (std::vector<int64_t>{0, 3, 4, 8, 10}));
  EXPECT_EQ(r2.row_of[6], 3);
  EXPECT_EQ(r2.active, (std::vector<int32_t>{2, 0, 3, 1}));
}

TEST(RoutingTest, RowBlocksCoverEveryActiveExpertsRows) {
  const int E = 5;
  const int64_t T = 500;
  const int k = 2;
  // Slot 0: expert 3 always (500 rows -> several blocks); slot 1: round robin
  // over the others; expert 2 masked.
  std::vector<int64_t> ids(T * k);
  for (int64_t t = 0; t < T; ++t) {
    ids[t * k] = 3;
    const int others[4] = {0, 1, 2, 4};
    ids[t * k + 1] = others[t % 4];
  }
  std::vector<uint8_t> mask = {1, 1, 0, 1, 1};
  const Routing r = build_routing(ids.data(), DType::kI64, T, k, E, mask.data());
  std::vector<std::vector<std::pair<int64_t, int64_t>>> per(E);
  int64_t prev_size = std::numeric_limits<int64_t>::max();
  for (const RowBlock& b : r.blocks) {
    ASSERT_GE(b.e, 0);
    ASSERT_LT(b.e, E);
    EXPECT_LT(b.r0, b.r1) << "empty block";
    EXPECT_LE(b.r1 - b.r0, kRowBlock);
    EXPECT_LE(b.r1 - b.r0, prev_size) << "blocks not largest first";
    prev_size = b.r1 - b.r0;
    per[b.e].push_back({b.r0, b.r1});
  }
  for (int e = 0; e < E; ++e) {
    std::sort(per[e].begin(), per[e].end());
    int64_t at = r.offsets[e];
    for (auto& [r0, r1] : per[e]) {
      EXPECT_EQ(r0, at) << "expert " << e << " blocks not contiguous";
      at = r1;
    }
    EXPECT_EQ(at, r.offsets[e + 1]) << "expert " << e << " rows not covered";
  }
  EXPECT_TRUE(per[2].empty()) << "masked expert got blocks";
  EXPECT_GE(per[3].size(), size_t((T + kRowBlock - 1) / kRowBlock));
}

TEST_F(EngineErrors, ForwardAsyncRejectsBadIdsAndEngineStillWorks) {
  build(541, tokens(6), threads(2));
  for (DType idt : {DType::kI64, DType::kI32}) {
    for (int64_t badv : {int64_t(L.E), int64_t(-1)}) {
      Batch bad = b;
      bad.ids[7] = badv;  // token 3, slot 1
      IoCfg bio = io;
      bio.ids = idt;
      Call c(L, bad, bio);
      std::shared_ptr<Saved> s;
      expect_invalid_argument(
          std::string("forward_async ") + dtype_name(idt) + " id " + std::to_string(badv),
          [&] { m->forward_async(c.fwd(), &s); }, {"topk_ids", std::to_string(badv)});
      EXPECT_EQ(s, nullptr) << "no handle for a rejected forward";
      expect_invalid_argument("forward (sync) id " + std::to_string(badv),
                              [&] { m->forward(c.fwd()); }, {"topk_ids", std::to_string(badv)});
    }
  }
  // The same MoeExperts still works, sync and async.
  const Batch good = make_batch(L, tokens(6), 543);
  expect_matches_reference("after error", L, good, io, run_engine(*m, L, good, io),
                           reference(L, good));
  Call c(L, good, io);
  std::shared_ptr<Saved> s;
  Job f = m->forward_async(c.fwd(), &s);
  m->backward_async(s, c.bwd()).wait();
  f.wait();
  expect_matches_reference("after error (async)", L, good, io, c.collect(), reference(L, good));
}

TEST_F(EngineErrors, BackwardWithDifferentLoraConfigThrows) {
  build(551, tokens(8));
  LoraCfg gate_only;
  gate_only.r[1] = gate_only.r[2] = 0;
  const Layer Lg = make_layer(4, 40, 24, gate_only, 551);
  LoraCfg rank2 = all_lora(2);
  const Layer L2 = make_layer(4, 40, 24, rank2, 551);
  const Layer L0 = make_layer(4, 40, 24, all_lora(0), 551);
  Call c(L, b, io);
  auto saved = m->forward(c.fwd());
  // Backward args whose LoRA differs from the forward's.
  struct Mismatch {
    const char* name;
    const Layer* layer;
  };
  for (const Mismatch& mm : {Mismatch{"up/down disabled", &Lg}, Mismatch{"rank 2 vs 4", &L2},
                             Mismatch{"no LoRA", &L0}}) {
    Call cb(*mm.layer, b, io);
    BackwardArgs a = cb.bwd();
    expect_invalid_argument(std::string("backward with ") + mm.name, [&] { m->backward(saved, a); },
                            {"LoRA"});
    expect_invalid_argument(std::string("backward_async with ") + mm.name,
                            [&] { m->backward_async(saved, a); }, {"LoRA"});
  }
  // Forward without LoRA, backward with it.
  {
    auto m0 = make_experts(L0, ec);
    Call c0(L0, b, io);
    auto s0 = m0->forward(c0.fwd());
    Call cb(L, b, io);
    expect_invalid_argument("backward adds LoRA", [&] { m0->backward(s0, cb.bwd()); }, {"LoRA"});
  }
  // Only the down rank differs.
  {
    LoraCfg d1 = all_lora(4);
    d1.r[2] = 1;
    const Layer Ld = make_layer(4, 40, 24, d1, 551);
    Call cb(Ld, b, io);
    expect_invalid_argument("down rank differs", [&] { m->backward(saved, cb.bwd()); }, {"down"});
  }
  // The handle is still usable with the right config.
  m->backward(saved, c.bwd());
  expect_matches_reference("after mismatch", L, b, io, c.collect(), reference(L, b));
  // A null handle is an error too.
  expect_invalid_argument("null Saved", [&] { m->backward(nullptr, c.bwd()); }, {});
}

// DISABLED: documents a gap found while writing this suite (reported, not
// fixed here). check_same_lora (moe_experts.cc) compares only enabled/rank, so
// a backward whose LoraSet::scaling differs from the forward's is accepted and
// silently mixes the two: dB uses the saved bf16(s_fwd * A x) while
// p = s_bwd * B^T dg and q = s_bwd * Bd^T dout use the new one.
TEST_F(EngineErrors, BackwardWithDifferentScalingThrows) {
  build(556);
  Call c(L, b, io);
  auto saved = m->forward(c.fwd());
  BackwardArgs a = c.bwd();
  a.lora.scaling = 2.0f * L.lora.s;
  expect_invalid_argument("backward with a different scaling", [&] { m->backward(saved, a); },
                          {"LoRA"});
}

TEST(ContextTest, ExceptionInJobSurfacesAtWait) {
  for (int threads : {1, 3}) {
    ContextOptions o;
    o.num_threads = threads;
    Context ctx(o);
    Job j = ctx.submit([] { throw std::runtime_error("boom"); });
    try {
      j.wait();
      ADD_FAILURE() << "wait() did not rethrow";
    } catch (const std::runtime_error& e) {
      EXPECT_STREQ(e.what(), "boom");
    }
    // Waiting again rethrows again (shared state keeps the exception).
    EXPECT_THROW(j.wait(), std::runtime_error);
    // An exception thrown by one task of a parallel_for inside a job.
    Job p = ctx.submit([&] {
      ctx.parallel_for("test.throw", 50, [](int64_t task, Arena&) {
        if (task == 17) throw std::runtime_error("task 17 failed");
      });
    });
    try {
      p.wait();
      ADD_FAILURE() << "wait() did not rethrow the parallel_for error";
    } catch (const std::runtime_error& e) {
      EXPECT_STREQ(e.what(), "task 17 failed");
    }
    // The context keeps working afterwards, and runs every task exactly once.
    std::vector<std::atomic<int>> hits(1000);
    ctx.run([&] {
      ctx.parallel_for("test.count", 1000, [&](int64_t task, Arena& a) {
        int* scratch = a.alloc<int>(100);
        scratch[99] = 1;
        hits[task].fetch_add(scratch[99]);
      });
    });
    for (int i = 0; i < 1000; ++i) ASSERT_EQ(hits[i].load(), 1) << "task " << i;
    EXPECT_EQ(ctx.num_threads(), threads);
  }
}

TEST(ContextTest, JobsRunInSubmissionOrder) {
  ContextOptions o;
  o.num_threads = 2;
  Context ctx(o);
  std::vector<int> order;
  std::vector<Job> jobs;
  for (int i = 0; i < 20; ++i) jobs.push_back(ctx.submit([&order, i] { order.push_back(i); }));
  jobs.back().wait();
  for (const Job& j : jobs) EXPECT_TRUE(j.ready());
  std::vector<int> expect(20);
  for (int i = 0; i < 20; ++i) expect[i] = i;
  EXPECT_EQ(order, expect);
  EXPECT_THROW(Job().wait(), std::logic_error);
  EXPECT_FALSE(Job().valid());
}

TEST_F(ContextJobs, FailingJobBetweenForwardAndBackwardDisturbsNeither) {
  // A job that throws, queued on the engine's own context between a forward
  // and its backward, fails alone: both engine jobs complete correctly.
  build(561, tokens(6), threads(2));
  Call c(L, b, io);
  std::shared_ptr<Saved> s;
  Job f = m->forward_async(c.fwd(), &s);
  Job boom = m->context().submit([] { throw std::runtime_error("boom"); });
  Job bw = m->backward_async(s, c.bwd());
  f.wait();
  bw.wait();
  try {
    boom.wait();
    ADD_FAILURE() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "boom");
  }
  expect_reference("around a failing job", c.collect());
}

TEST(ContextTest, DestructorDrainsQueuedJobs) {
  std::atomic<int> ran{0};
  {
    ContextOptions o;
    o.num_threads = 2;
    Context ctx(o);
    for (int i = 0; i < 10; ++i) {
      ctx.submit([&ran] {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        ran.fetch_add(1);
      });
    }
  }
  EXPECT_EQ(ran.load(), 10);
}

TEST_F(ContextJobs, PhaseProfileNamesEnginePhases) {
  build(591, BatchCfg{}, threads(2), {3, 40, 24});
  m->context().reset_phase_profile();
  run();
  bool fwd = false, bwd = false;
  for (const auto& [name, seconds, calls] : m->context().phase_profile()) {
    EXPECT_GE(seconds, 0.0) << name;
    EXPECT_GE(calls, 1) << name;
    fwd |= name.rfind("fwd.", 0) == 0;
    bwd |= name.rfind("bwd.", 0) == 0;
  }
  EXPECT_TRUE(fwd && bwd);
  m->context().reset_phase_profile();
  EXPECT_TRUE(m->context().phase_profile().empty());
}

TEST(ContextTest, ForcedIsaIsUsedOrRejected) {
  for (const mk::IsaInfo& info : mk::kIsas) {
    const mk::Isa isa = info.id;
    ContextOptions o;
    o.isa = isa;
    if (mk::cpu_supports(isa) && isa != mk::Isa::kAmxBf16) {
      Context ctx(o);
      EXPECT_EQ(ctx.kernels().isa, isa);
    } else if (!mk::cpu_supports(isa)) {
      EXPECT_ANY_THROW(Context ctx(o)) << mk::isa_name(isa);
    }
  }
  ContextOptions bad;
  bad.num_threads = 0;
  EXPECT_THROW(Context ctx(bad), std::invalid_argument);
}

TEST_F(EngineEdge, ZeroTokens) {
  build(571, tokens(0), threads(2), {3, 40, 24});
  const Outputs o = run();
  for (int p = 0; p < 3; ++p) {
    for (float v : o.dA[p]) ASSERT_EQ(v, 0.0f) << "dA_" << kProjName[p];
    for (float v : o.dB[p]) ASSERT_EQ(v, 0.0f) << "dB_" << kProjName[p];
  }
  // And a normal call afterwards.
  BatchCfg bc2;
  const Batch b2 = make_batch(L, bc2, 573);
  expect_matches_reference("after T=0", L, b2, io, run_engine(*m, L, b2, io), reference(L, b2));
}

TEST_F(EngineEdge, LoadExpertOneByOneEqualsLoad) {
  build(581, tokens(9), EngineCfg{}, {3, 33, 17});
  for (BackwardWeights bw : {BackwardWeights::kRepack, BackwardWeights::kTransposedCopy}) {
    ec.opts.backward_weights = bw;
    const Outputs whole = run_engine(L, b, io, ec);
    MoeExperts one(make_context(ec), L.E, L.H, L.I, ec.opts);
    const size_t per = size_t(L.I) * L.H;
    for (int e = L.E - 1; e >= 0; --e)
      one.load_expert(e, L.W[0].data() + e * per, L.W[1].data() + e * per, L.W[2].data() + e * per,
                      DType::kF32);
    expect_bitwise("load_expert(f32) vs load(bf16)", run_engine(one, L, b, io), whole);
  }
  EXPECT_THROW(m->load_expert(L.E, L.Wb[0].data(), L.Wb[1].data(), L.Wb[2].data(), DType::kBf16),
               std::invalid_argument);
  EXPECT_THROW(m->load_expert(-1, L.Wb[0].data(), L.Wb[1].data(), L.Wb[2].data(), DType::kBf16),
               std::invalid_argument);
}

}  // namespace
}  // namespace moetune::engine_test
