// Engine object lifetimes and process-level failures (issue 13): Jobs,
// MoeExperts, Contexts and Saved handles dropped in any order; handles bound
// to the object that made them; experts never loaded refused; thread-creation
// failure and invalid pinning raise; a forked child gets an error, not a hang.
//
// A hang is the failure mode here, so each scenario that could hang runs on a
// helper thread (or in a child process) with a deadline: a test fails after
// seconds instead of stalling the suite.
#include <gtest/gtest.h>
#include <sched.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <future>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "engine/context.h"
#include "engine/moe_experts.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define MOETUNE_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define MOETUNE_SANITIZED 1
#endif
#endif

namespace moetune {
namespace {

using kernels::bf16;
using namespace std::chrono_literals;

// Runs fn on a helper thread; true if it returned within `limit`. On a
// timeout the thread is left behind (detached): the test fails, the suite
// goes on.
bool finishes_within(std::chrono::milliseconds limit, std::function<void()> fn) {
  auto done = std::make_shared<std::promise<void>>();
  std::future<void> f = done->get_future();
  std::thread([fn = std::move(fn), done] {
    fn();
    done->set_value();
  }).detach();
  return f.wait_for(limit) == std::future_status::ready;
}

std::shared_ptr<Context> make_ctx(int threads) {
  ContextOptions o;
  o.num_threads = threads;
  return std::make_shared<Context>(o);
}

// A tiny layer: E experts of H x I with bf16 weights 1/64 (exact), no LoRA.
struct Tiny {
  static constexpr int E = 3, H = 8, I = 4;
  int64_t T;
  std::vector<bf16> x, out, dout, dx;
  std::vector<int64_t> ids;
  std::vector<float> w;
  explicit Tiny(int64_t tokens) : T(tokens) {
    x.assign(T * H, kernels::f32_to_bf16(0.5f));
    out.assign(T * H, 0);
    dout.assign(T * H, kernels::f32_to_bf16(1.0f));
    dx.assign(T * H, 0);
    for (int64_t t = 0; t < T; ++t) ids.push_back(t % E);
    w.assign(T, 1.0f);
  }
  ForwardArgs fwd() {
    ForwardArgs a;
    a.T = T;
    a.k = 1;
    a.x = x.data();
    a.topk_ids = ids.data();
    a.topk_weights = w.data();
    a.out = out.data();
    return a;
  }
  BackwardArgs bwd() {
    BackwardArgs a;
    a.dout = dout.data();
    a.dx = dx.data();
    return a;
  }
  static std::unique_ptr<MoeExperts> experts(std::shared_ptr<Context> ctx, bool load = true) {
    auto m = std::make_unique<MoeExperts>(std::move(ctx), E, H, I, ExpertsOptions{});
    if (load) {
      std::vector<float> wt(size_t(E) * I * H, 1.0f / 64);
      m->load(wt.data(), wt.data(), wt.data(), DType::kF32);
    }
    return m;
  }
};

TEST(EngineLifetimes, ExpertsDroppedWhileItsFinishedJobIsAlive) {
  // The Job of a finished forward is kept (as a Python exception between
  // submit and wait keeps it): dropping the experts must not wait for it.
  for (int threads : {1, 2}) {
    auto ctx = make_ctx(threads);
    Tiny d(5);
    auto m = Tiny::experts(ctx);
    std::shared_ptr<Saved> s;
    Job j = m->forward_async(d.fwd(), &s);
    while (!j.ready()) std::this_thread::sleep_for(1ms);
    EXPECT_TRUE(finishes_within(10s, [&] { m.reset(); }))
        << "~MoeExperts hung, threads " << threads;
    if (m) continue;  // hung: leave the rest alone
    j.wait();         // the Job still reports its result
    EXPECT_EQ(s.use_count(), 1) << "a finished job still holds the saved handle";
  }
}

TEST(EngineLifetimes, AnyDropOrderOfContextExpertsJobAndHandle) {
  // Every order of dropping {ctx, experts, forward job, backward job, handle}
  // after submitting (not waiting): no hang, no crash (ASan checks the frees).
  const int n = 5;
  std::vector<int> order = {0, 1, 2, 3, 4};
  int cases = 0;
  do {
    auto ctx = make_ctx(2);
    Tiny d(7);
    auto m = Tiny::experts(ctx);
    std::shared_ptr<Saved> s;
    auto fj = std::make_unique<Job>(m->forward_async(d.fwd(), &s));
    auto bj = std::make_unique<Job>(m->backward_async(s, d.bwd()));
    const bool ok = finishes_within(10s, [&] {
      for (int i = 0; i < n; ++i) {
        switch (order[i]) {
          case 0:
            ctx.reset();
            break;
          case 1:
            m.reset();
            break;
          case 2:
            fj.reset();
            break;
          case 3:
            bj.reset();
            break;
          case 4:
            s.reset();
            break;
        }
      }
    });
    ASSERT_TRUE(ok) << "hung dropping in order " << order[0] << order[1] << order[2] << order[3]
                    << order[4];
    ++cases;
  } while (std::next_permutation(order.begin(), order.end()));
  EXPECT_EQ(cases, 120);
}

TEST(EngineLifetimes, BackwardRefusesAnotherObjectsHandle) {
  auto ctx = make_ctx(1);
  Tiny d(4);
  auto a = Tiny::experts(ctx);
  auto b = Tiny::experts(ctx);
  std::shared_ptr<Saved> s = a->forward(d.fwd());
  try {
    b->backward(s, d.bwd());
    ADD_FAILURE() << "another object's handle was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("another experts object"), std::string::npos) << e.what();
  }
  // Still refused after its maker is gone (no address reuse can make it match).
  a.reset();
  auto c = Tiny::experts(ctx);
  EXPECT_THROW(c->backward(s, d.bwd()), std::invalid_argument);
  EXPECT_THROW(b->backward(s, d.bwd()), std::invalid_argument);
  // Its own handle works.
  b->backward(b->forward(d.fwd()), d.bwd());
}

TEST(EngineLifetimes, ExpertsNeverLoadedAreRefused) {
  auto ctx = make_ctx(1);
  Tiny d(6);  // routes to experts 0, 1, 2
  auto m = Tiny::experts(ctx, /*load=*/false);
  std::vector<float> wt(size_t(Tiny::I) * Tiny::H, 1.0f / 64);
  m->load_expert(0, wt.data(), wt.data(), wt.data(), DType::kF32);
  m->load_expert(2, wt.data(), wt.data(), wt.data(), DType::kF32);
  EXPECT_TRUE(m->weights().loaded(0));
  EXPECT_FALSE(m->weights().loaded(1));
  try {
    m->forward(d.fwd());
    ADD_FAILURE() << "forward ran on an expert never loaded";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("expert 1 "), std::string::npos) << e.what();
  }
  // Masking the missing expert out is fine; loading it makes the full call work.
  std::vector<uint8_t> mask = {1, 0, 1};
  ForwardArgs a = d.fwd();
  a.expert_mask = mask.data();
  m->forward(a);
  m->load_expert(1, wt.data(), wt.data(), wt.data(), DType::kF32);
  m->forward(d.fwd());
  // A cache fill marks all.
  auto c = Tiny::experts(ctx, /*load=*/false);
  c->weights().mark_all_loaded();
  c->forward(d.fwd());
}

TEST(EngineLifetimes, InvalidCpusAreErrors) {
  for (int bad : {-1, CPU_SETSIZE, CPU_SETSIZE + 7}) {
    ContextOptions o;
    o.num_threads = 2;
    o.cpus = {bad};
    try {
      Context ctx(o);
      ADD_FAILURE() << "cpus={" << bad << "} accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("core " + std::to_string(bad)), std::string::npos)
          << e.what();
    }
  }
  cpu_set_t allowed;
  ASSERT_EQ(sched_getaffinity(0, sizeof(allowed), &allowed), 0);
  int outside = -1, inside = -1;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &allowed) && inside < 0) inside = c;
    if (!CPU_ISSET(c, &allowed) && outside < 0) outside = c;
  }
  ASSERT_GE(inside, 0);
  if (outside >= 0) {
    ContextOptions o;
    o.cpus = {inside, outside};
    EXPECT_THROW(Context ctx(o), std::invalid_argument) << "core " << outside;
  }
  ContextOptions ok;
  ok.num_threads = 2;
  ok.cpus = {inside};
  Context ctx(ok);
  ctx.run([] {});
}

// Runs body in a forked child; returns its exit status (-1: killed after the
// deadline, i.e. hung). The child exits with body's return value.
int in_child(std::chrono::seconds limit, const std::function<int()>& body) {
  fflush(nullptr);
  const pid_t pid = fork();
  if (pid == 0) _exit(body());
  const auto until = std::chrono::steady_clock::now() + limit;
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > until) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(5ms);
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 100 + WTERMSIG(status);
}

TEST(EngineLifetimes, ThreadCreationFailureThrowsAndStartsNothing) {
#ifdef MOETUNE_SANITIZED
  GTEST_SKIP() << "address-space limits do not mix with sanitizer shadow memory";
#else
  // In a child: cap the address space just above what is mapped now, so
  // thread stacks (8 MiB each) soon cannot be mapped.
  const int rc = in_child(30s, [] {
    rlimit lim{};
    long pages = 0, dummy = 0;
    if (FILE* f = fopen("/proc/self/statm", "r")) {
      if (fscanf(f, "%ld %ld", &pages, &dummy) != 2) pages = 0;
      fclose(f);
    }
    if (pages == 0) return 3;
    lim.rlim_cur = lim.rlim_max = rlim_t(pages) * sysconf(_SC_PAGESIZE) + (64 << 20);
    if (setrlimit(RLIMIT_AS, &lim) != 0) return 3;
    ContextOptions o;
    o.num_threads = 64;
    try {
      Context ctx(o);
      return 4;  // all started: the limit did not bite
    } catch (const std::runtime_error& e) {
      if (std::string(e.what()).find("could not start") == std::string::npos) return 5;
    } catch (...) {
      return 6;
    }
    // Nothing half-started: a modest Context still works in this process.
    o.num_threads = 2;
    Context ok(o);
    ok.run([] {});
    return 0;
  });
  EXPECT_EQ(rc, 0) << "child status (3 setup, 4 limit did not bite, 5/6 wrong error, -1 hung, "
                      ">100 signal)";
#endif
}

TEST(EngineLifetimes, ForkedChildGetsAnErrorNotAHang) {
#if defined(__SANITIZE_THREAD__)
  // TSan's runtime keeps the parent's threads registered in the child, and a thread the child
  // starts may reuse one's id ("dup thread with used id": its own bookkeeping, not a race), so
  // this runs in the plain and ASan builds only.
  GTEST_SKIP() << "ThreadSanitizer does not support threads in the child of a multi-threaded fork";
#endif
  auto ctx = make_ctx(2);
  Tiny d(5);
  auto m = Tiny::experts(ctx);
  m->forward(d.fwd());  // the pool has run
  // A job in flight at the fork: its Job can never complete in the child.
  std::atomic<bool> release{false};
  Job slow = ctx->submit([&] {
    while (!release.load()) std::this_thread::sleep_for(1ms);
  });
  const int rc = in_child(30s, [&] {
    try {
      m->forward(d.fwd());
      return 2;
    } catch (const std::runtime_error& e) {
      if (std::string(e.what()).find("fork") == std::string::npos) return 3;
    }
    try {
      slow.wait();
      return 4;
    } catch (const std::runtime_error&) {
    }
    // Dropping everything in the child returns (no join of absent threads).
    m.reset();
    ctx.reset();
    // A fresh Context works in the child.
    ContextOptions o;
    o.num_threads = 2;
    Context fresh(o);
    fresh.run([] {});
    return 0;
  });
  release = true;
  slow.wait();
  EXPECT_EQ(rc, 0) << "child status (2/3/4: no or wrong error, -1 hung, >100 signal)";
  m->forward(d.fwd());  // the parent is unaffected
}

}  // namespace
}  // namespace moetune
