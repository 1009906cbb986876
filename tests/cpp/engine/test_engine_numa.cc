// NUMA partitions inside one engine (engine/partitions.h): the assignment
// functions, the partitioned thread pool (every task on a worker of its
// partition, pinned to that partition's CPUs), input validation, and the
// engine's results bit-identical with and without partitions. On a one-node
// CI machine the partitions are virtual: disjoint subsets of the allowed CPUs.
#include <gtest/gtest.h>
#include <sched.h>

#include <algorithm>
#include <climits>
#include <mutex>
#include <set>

#include "engine/partitions.h"
#include "engine/thread_pool.h"
#include "engine_test_support.h"

namespace moetune::engine_test {
namespace {

std::vector<int> allowed() {
  cpu_set_t s;
  CPU_ZERO(&s);
  EXPECT_EQ(sched_getaffinity(0, sizeof(s), &s), 0);
  std::vector<int> out;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &s)) out.push_back(c);
  return out;
}

// n disjoint contiguous virtual nodes of the allowed CPUs (empty if too few).
CpuSets virtual_nodes(int n) {
  const std::vector<int> cpus = allowed();
  if (static_cast<int>(cpus.size()) < n) return {};
  CpuSets out(n);
  for (size_t i = 0; i < cpus.size(); ++i) out[i * n / cpus.size()].push_back(cpus[i]);
  return out;
}

template <typename F>
std::string error_of(F f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "(no std::invalid_argument)";
}

TEST(NumaPartitions, ExpertRangesAreBalancedContiguousAndAgreeWithExpertPartition) {
  for (int E = 1; E <= 20; ++E) {
    for (int P = 1; P <= 6; ++P) {
      const std::vector<int> b = partition_experts(E, P);
      ASSERT_EQ(b.size(), size_t(P + 1));
      EXPECT_EQ(b.front(), 0);
      EXPECT_EQ(b.back(), E);
      for (int p = 0; p < P; ++p) {
        const int n = b[p + 1] - b[p];
        EXPECT_TRUE(n == E / P || n == E / P + 1) << "E=" << E << " P=" << P << " p=" << p;
        for (int e = b[p]; e < b[p + 1]; ++e)
          EXPECT_EQ(expert_partition(e, E, P), p) << "E=" << E << " P=" << P << " e=" << e;
      }
    }
  }
}

TEST(NumaPartitions, WorkerRangesAreBalancedAndStartWithTheDispatcher) {
  for (int n = 1; n <= 9; ++n) {
    for (int P = 1; P <= n; ++P) {
      const std::vector<int> b = partition_workers(n, P);
      EXPECT_EQ(b.front(), 0);
      EXPECT_EQ(b.back(), n);
      for (int p = 0; p < P; ++p) EXPECT_GE(b[p + 1] - b[p], n / P) << n << " " << P;
    }
  }
  EXPECT_EQ(cpulist({5, 0, 1, 2, 8, 9}), "0-2,5,8-9");
}

TEST(NumaPartitions, InvalidPartitionsAreClearErrors) {
  const std::vector<int> cpus = allowed();
  auto ctx = [](int threads, CpuSets parts, std::vector<int> pin = {}) {
    ContextOptions o;
    o.num_threads = threads;
    o.partitions = std::move(parts);
    o.cpus = std::move(pin);
    Context c(o);
  };
  EXPECT_NE(error_of([&] { ctx(2, {{cpus[0]}, {}}); }).find("partitions[1] is empty"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              ctx(2, {{cpus[0]}, {CPU_SETSIZE + 3}});
            }).find("partitions[1]: core " + std::to_string(CPU_SETSIZE + 3) + " is not one"),
            std::string::npos);
  EXPECT_NE(error_of([&] { ctx(2, {{cpus[0]}, {-1}}); }).find("core -1 is not one"),
            std::string::npos);
  EXPECT_NE(error_of([&] { ctx(2, {{cpus[0]}, {cpus[0]}}); }).find("also in an earlier partition"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              ctx(1, {{cpus[0]}, {cpus[0]}});
            }).find("2 NUMA partitions need at least as many threads, got num_threads=1"),
            std::string::npos);
  EXPECT_NE(error_of([&] { ctx(2, {{cpus[0]}}, {cpus[0]}); }).find("either cpus or NUMA"),
            std::string::npos);
  // One partition is plain pinning; no partitions is the default.
  ContextOptions one;
  one.num_threads = 2;
  one.partitions = {{cpus[0]}};
  EXPECT_EQ(Context(one).num_partitions(), 1);
}

// Every task runs exactly once, on a worker of its partition, pinned to one
// of that partition's CPUs; the per-partition counters add up. The caller is
// worker 0 (a Context's dispatcher): a thread of its own, pinned as such
// (pinning the test's main thread would leak into later tests).
void check_partitioned_pool(int threads, const CpuSets& parts) {
  ThreadPool pool(threads, {}, parts);
  pool.pin_caller();
  {
    ASSERT_EQ(pool.partitions(), 2);
    for (const std::vector<int64_t>& begin :
         {std::vector<int64_t>{0, 37, 100}, {0, 0, 11}, {0, 9, 9}, {0, 1, 2}}) {
      const int64_t n = begin.back();
      std::vector<int> ran(n, 0), worker_of(n, -1), cpu_of(n, -1);
      const std::vector<int64_t> before = pool.partition_task_counts();
      pool.parallel_for_partitioned(begin, [&](int64_t t, int w) {
        ++ran[t];  // each task once: no two workers write the same element
        worker_of[t] = w;
        cpu_of[t] = sched_getcpu();
      });
      for (int64_t t = 0; t < n; ++t) {
        const int p = t < begin[1] ? 0 : 1;
        ASSERT_EQ(ran[t], 1) << "task " << t;
        EXPECT_EQ(pool.partition_of(worker_of[t]), p) << "task " << t << " threads " << threads;
        EXPECT_NE(std::find(parts[p].begin(), parts[p].end(), cpu_of[t]), parts[p].end())
            << "task " << t << " ran on cpu " << cpu_of[t] << ", not in partition " << p;
      }
      const std::vector<int64_t> after = pool.partition_task_counts();
      EXPECT_EQ(after[0] - before[0], begin[1]);
      EXPECT_EQ(after[1] - before[1], begin[2] - begin[1]);
    }
    // Plain loops still use every worker's claims, and errors surface.
    std::vector<int> ran(1000, 0);
    pool.parallel_for(1000, [&](int64_t t, int) { ++ran[t]; });
    EXPECT_EQ(std::count(ran.begin(), ran.end(), 1), 1000);
    EXPECT_THROW(pool.parallel_for_partitioned({0, 5, 50},
                                               [&](int64_t t, int) {
                                                 if (t == 30) throw std::runtime_error("task 30");
                                               }),
                 std::runtime_error);
    EXPECT_THROW(pool.parallel_for_partitioned({0, 5}, [](int64_t, int) {}), std::logic_error);
  }
}

TEST(NumaThreadPool, PartitionedTasksRunOnlyOnTheirPartitionsWorkersAndCpus) {
  const CpuSets parts = virtual_nodes(2);
  if (parts.empty()) GTEST_SKIP() << "needs 2 allowed CPUs for 2 virtual nodes";
  for (int threads : {2, 3, 5}) std::thread([&] { check_partitioned_pool(threads, parts); }).join();
}

// Forward + backward (LoRA on every projection) bit-identical with and
// without partitions, bf16 and int4, saved and recomputed activations; both
// partitions really ran expert tasks.
TEST(NumaEngine, BitIdenticalWithAndWithoutPartitions) {
  const CpuSets two = virtual_nodes(2);
  if (two.empty()) GTEST_SKIP() << "needs 2 allowed CPUs for 2 virtual nodes";
  const Layer L = make_layer(7, 72, 300, all_lora(4), 4242);
  BatchCfg bc;
  bc.T = 90;
  bc.k = 3;
  bc.masked = {2};
  const Batch b = make_batch(L, bc, 4243);
  struct Fmt {
    const char* name;
    WeightFormat f;
    int group;
  };
  for (const Fmt fmt :
       {Fmt{"bf16", WeightFormat::kBf16, 0}, Fmt{"int4", WeightFormat::kInt4, 32}}) {
    for (ActivationPolicy act : {ActivationPolicy::kSave, ActivationPolicy::kRecompute}) {
      EngineCfg base;
      base.opts.weight_format = fmt.f;
      base.opts.group_size = fmt.group;
      base.opts.activations = act;
      const Outputs ref = run_engine(L, b, IoCfg{}, base);
      for (int threads : {2, 3, 4}) {
        for (const CpuSets& parts : {two, virtual_nodes(std::min<int>(3, allowed().size()))}) {
          if (static_cast<int>(parts.size()) > threads) continue;
          EngineCfg ec = base;
          ec.threads = threads;
          ec.partitions = parts;
          auto ctx = make_context(ec);
          auto m = make_experts(L, ec, ctx);
          const std::string tag =
              std::string(fmt.name) + (act == ActivationPolicy::kSave ? " save" : " recompute") +
              " threads=" + std::to_string(threads) + " partitions=" + std::to_string(parts.size());
          expect_bitwise(tag, run_engine(*m, L, b, IoCfg{}), ref);
          if (parts.size() >= 2) {
            const std::vector<int64_t> counts = ctx->partition_task_counts();
            for (size_t p = 0; p < counts.size(); ++p)
              EXPECT_GT(counts[p], 0) << tag << ": partition " << p << " ran no task";
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace moetune::engine_test
