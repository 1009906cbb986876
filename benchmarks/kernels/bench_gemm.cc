// GEMM micro-kernel throughput at the engine's task shapes, the GEMM of every
// ISA bundle this CPU runs, side by side (one case = one table row per
// kernel): on AMX CPUs amx_bf16 and avx512_bf16; elsewhere every runnable
// ISA's but the scalar one.
//   bench_gemm [threads...]      (default: 1)
// (The register blocks and cache blockings compared in BENCHMARKS.md were
// bench-only variants, removed once measured; git history has them.)
// Each thread owns its A, C and a set of packed B operands:
//   hot : the same B every call (it stays in L2) — the kernel's own ceiling;
//   (all 64-byte aligned, as the engine's buffers are)
//   cold: B cycles through 24 operands (24+ MiB per thread), so it streams
//         from DRAM once per call as the engine's expert weights do.
// Shapes are the engine's tasks: row blocks of <= 192 tokens of one expert x
// 256-column chunks, K = H (gate/up) or I (down) of Qwen3-30B-A3B / DeepSeek-V3.
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "kernels/cpu.h"
#include "kernels/gemm.h"
#include "kernels/kernel_bundle.h"

namespace mk = moetune::kernels;

namespace {

struct Shape {
  const char* name;
  int64_t M, N, K;
};

struct Variant {
  std::string name;
  mk::GemmFn fn;
};

// 64-byte aligned (huge-page advised when large) storage, as the engine's
// packed weights and activations are: a B tile row that straddled two cache
// lines would cost AMX two line accesses and make the kernel look slower.
template <typename T>
struct Aligned {
  explicit Aligned(size_t n) : n(n) {
    const size_t align = n * sizeof(T) >= (size_t(4) << 20) ? (size_t(2) << 20) : 64;
    const size_t bytes = (n * sizeof(T) + align - 1) / align * align;
    p = static_cast<T*>(std::aligned_alloc(align, bytes));
    if (align > 64) madvise(p, bytes, MADV_HUGEPAGE);
  }
  ~Aligned() { std::free(p); }
  Aligned(const Aligned&) = delete;
  T* p;
  size_t n;
};

// One thread's operands for one shape: A, C and nb packed B operands.
struct Operands {
  Operands(const Shape& s, int nb, int seed) : A(s.M * s.K), C(s.M * s.N) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> d(-8, 8);
    for (size_t i = 0; i < A.n; ++i) A.p[i] = mk::f32_to_bf16(d(rng) / 8.0f);
    std::vector<mk::bf16> src(s.K * s.N);
    for (auto& b : src) b = mk::f32_to_bf16(d(rng) / 8.0f);
    for (int i = 0; i < nb; ++i) {
      B.emplace_back(std::make_unique<Aligned<mk::bf16>>(mk::packed_elems(s.K, s.N)));
      mk::pack_b(src.data(), mk::SrcType::kBf16, s.N, true, s.K, 0, s.N, 1.0f, B.back()->p);
    }
  }
  Aligned<mk::bf16> A;
  Aligned<float> C;
  std::vector<std::unique_ptr<Aligned<mk::bf16>>> B;
};

// TFLOPS of every variant on one shape (median of `rounds` timings; the
// variants are interleaved within each round so that machine noise hits all
// alike). Each timing runs all threads through >= ~0.2 TFLOP in total.
std::vector<double> run(const std::vector<Variant>& vs, const Shape& s, int threads, bool cold,
                        int rounds = 5) {
  const int nb = cold ? 24 : 1;
  std::vector<std::unique_ptr<Operands>> ops(threads);
  {
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] { ops[t] = std::make_unique<Operands>(s, nb, t); });
    for (auto& th : pool) th.join();
  }
  const int64_t reps =
      std::max<int64_t>(nb, (int64_t)(2e11 / (2.0 * s.M * s.N * s.K)) / threads + 1);
  std::vector<std::vector<double>> tf(vs.size());
  for (int round = 0; round < rounds; ++round) {
    for (size_t vi = 0; vi < vs.size(); ++vi) {
      std::vector<double> secs(threads);
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          Operands& o = *ops[t];
          auto call = [&](int64_t i) {
            mk::Segment seg{o.A.p, s.K, mk::PackedB{o.B[i % nb]->p, s.K, s.N}};
            vs[vi].fn(s.M, 0, s.N, &seg, 1, o.C.p, s.N, false);
          };
          for (int64_t i = 0; i < nb; ++i) call(i);  // warm up
          const auto t0 = std::chrono::steady_clock::now();
          for (int64_t i = 0; i < reps; ++i) call(i);
          secs[t] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        });
      }
      for (auto& th : pool) th.join();
      double worst = 0;
      for (double x : secs) worst = std::max(worst, x);
      tf[vi].push_back(2.0 * s.M * s.N * s.K * reps * threads / worst / 1e12);
    }
  }
  std::vector<double> med;
  for (auto& v : tf) {
    std::sort(v.begin(), v.end());
    med.push_back(v[v.size() / 2]);
  }
  return med;
}

// Max |C_v - C_ref| / max |C_ref| of a variant against the scalar oracle on
// one shape (a broken variant must not be timed as if it were fine).
double check(const Variant& v, const Shape& s) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> d(-1, 1);
  std::vector<mk::bf16> A(s.M * s.K), src(s.K * s.N), B(mk::packed_elems(s.K, s.N));
  for (auto& a : A) a = mk::f32_to_bf16(d(rng));
  for (auto& b : src) b = mk::f32_to_bf16(d(rng));
  mk::pack_b(src.data(), mk::SrcType::kBf16, s.N, true, s.K, 0, s.N, 1.0f, B.data());
  std::vector<float> C(s.M * s.N, 1.0f), R(s.M * s.N, 1.0f);
  mk::Segment seg{A.data(), s.K, mk::PackedB{B.data(), s.K, s.N}};
  mk::kernels_for(mk::Isa::kScalar).gemm(s.M, 0, s.N, &seg, 1, R.data(), s.N, true);
  v.fn(s.M, 0, s.N, &seg, 1, C.data(), s.N, true);
  double err = 0, mx = 0;
  for (size_t i = 0; i < C.size(); ++i) {
    err = std::max(err, (double)std::abs(C[i] - R[i]));
    mx = std::max(mx, (double)std::abs(R[i]));
  }
  return err / mx;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> thread_counts;
  for (int i = 1; i < argc; ++i) thread_counts.push_back(std::atoi(argv[i]));
  if (thread_counts.empty()) thread_counts.push_back(1);
  std::printf("cpu: %s\n", mk::cpu_summary().c_str());
  std::vector<Variant> vs;
  const bool amx = mk::cpu_supports(mk::Isa::kAmxBf16);
  for (const mk::IsaInfo& i : mk::kIsas) {
    const bool skip = i.id == mk::Isa::kScalar ||
                      (amx && i.id != mk::Isa::kAmxBf16 && i.id != mk::Isa::kAvx512Bf16);
    if (!skip && mk::cpu_supports(i.id)) vs.push_back({i.gemm_name, mk::kernels_for(i.id).gemm});
  }
  const Shape shapes[] = {
      {"qwen3 gate/up M192 N256 K2048", 192, 256, 2048},
      {"qwen3 down    M192 N256 K768", 192, 256, 768},
      {"qwen3 gate/up M32  N256 K2048", 32, 256, 2048},
      {"qwen3 gate/up M16  N256 K2048", 16, 256, 2048},
      {"dsv3 gate/up  M192 N256 K7168", 192, 256, 7168},
      {"dsv3 down     M192 N256 K2048", 192, 256, 2048},
      // LoRA products of a 192-token row block (Qwen3 H=2048): the reduce
      // x A^T (N = r) and the expand z B^T (K = r; K < 32 is AVX512-BF16
      // inside the AMX kernel), r = 8 / 16 / 64.
      {"lora reduce   M192 N8   K2048", 192, 8, 2048},
      {"lora reduce   M192 N16  K2048", 192, 16, 2048},
      {"lora reduce   M192 N64  K2048", 192, 64, 2048},
      {"lora expand   M192 N256 K16", 192, 256, 16},
      {"lora expand   M192 N256 K64", 192, 256, 64},
  };
  for (const Shape& c : {Shape{"check", 45, 300, 800}, Shape{"check", 213, 290, 1100}}) {
    std::printf("max rel. error vs the scalar oracle (M=%lld, N=%lld, K=%lld, accumulate):",
                (long long)c.M, (long long)c.N, (long long)c.K);
    for (const auto& v : vs) std::printf(" %s %.1e", v.name.c_str(), check(v, c));
    std::printf("\n");
  }
  for (int t : thread_counts) {
    for (bool cold : {false, true}) {
      std::printf("\n== %d thread(s), B %s (TFLOPS, median of 5 interleaved rounds)\n%-32s", t,
                  cold ? "cold (DRAM)" : "hot (cache)", "shape");
      for (const auto& v : vs) std::printf(" %16s", v.name.c_str());
      std::printf("\n");
      for (const Shape& s : shapes) {
        std::printf("%-32s", s.name);
        for (double x : run(vs, s, t, cold)) std::printf(" %16.3f", x);
        std::printf("\n");
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
