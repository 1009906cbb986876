// GEMM micro-kernel throughput at the engine's task shapes, every kernel this
// CPU runs, side by side (one case = one table row per kernel).
//   bench_gemm [threads]
// The avx512 (F only) kernel's register block is 8 rows x 3 panels; its
// other blocks (avx512_12x2, avx512_6x4, avx512_8x2) are timed next to it.
// Each thread owns its A, C and a set of packed B operands:
//   hot : the same B every call (it stays in L2) — the kernel's own ceiling;
//   cold: B cycles through 24 operands (24+ MiB per thread), so it streams
//         from DRAM once per call as the engine's expert weights do.
// Shapes are the engine's tasks: row blocks of <= 192 tokens of one expert x
// 256-column chunks, K = H (gate/up) or I (down) of Qwen3-30B-A3B / DeepSeek-V3.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "kernels/cpu.h"
#include "kernels/gemm.h"
#include "kernels/gemm_impl.h"

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

double run(const Variant& v, const Shape& s, int threads, bool cold) {
  const int nb = cold ? 24 : 1;
  const int64_t reps = std::max<int64_t>(4, (int64_t)(4e10 / (2.0 * s.M * s.N * s.K)) / threads + 1);
  std::vector<std::thread> pool;
  std::vector<double> secs(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      std::mt19937 rng(t);
      std::uniform_int_distribution<int> d(-8, 8);
      const int64_t lda = s.K;
      std::vector<mk::bf16> A(s.M * lda);
      for (auto& a : A) a = mk::f32_to_bf16(d(rng) / 8.0f);
      std::vector<mk::bf16> src(s.K * s.N);
      for (auto& b : src) b = mk::f32_to_bf16(d(rng) / 8.0f);
      std::vector<std::vector<mk::bf16>> B(nb, std::vector<mk::bf16>(mk::packed_elems(s.K, s.N)));
      for (auto& b : B) mk::pack_b(src.data(), mk::SrcType::kBf16, s.N, true, s.K, 0, s.N, 1.0f, b.data());
      std::vector<float> C(s.M * s.N);
      auto call = [&](int64_t i) {
        mk::Segment seg{A.data(), lda, mk::PackedB{B[i % nb].data(), s.K, s.N}};
        v.fn(s.M, 0, s.N, &seg, 1, C.data(), s.N, false);
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
  return 2.0 * s.M * s.N * s.K * reps * threads / worst / 1e12;
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
  mk::all_gemm_kernels().front().gemm(s.M, 0, s.N, &seg, 1, R.data(), s.N, true);
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
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  std::printf("cpu: %s\n", mk::cpu_summary().c_str());
  std::vector<Variant> vs;
  for (const auto& k : mk::all_gemm_kernels())
    if (k.isa != mk::Isa::kScalar && mk::cpu_supports(k.isa)) vs.push_back({k.name, k.gemm});
  if (mk::cpu_supports(mk::Isa::kAvx512)) {
    for (auto [mr, nb] : {std::pair{12, 2}, std::pair{6, 4}, std::pair{8, 2}})
      vs.push_back({"avx512_" + std::to_string(mr) + "x" + std::to_string(nb),
                    mk::avx512::gemm_variant(mr, nb)});
  }
  const Shape shapes[] = {
      {"qwen3 gate/up M192 N256 K2048", 192, 256, 2048},
      {"qwen3 down    M192 N256 K768", 192, 256, 768},
      {"qwen3 gate/up M32  N256 K2048", 32, 256, 2048},
      {"dsv3 gate/up  M192 N256 K7168", 192, 256, 7168},
      {"dsv3 down     M192 N256 K2048", 192, 256, 2048},
  };
  std::printf("max rel. error vs the scalar oracle (M=45, N=300, K=800, accumulate):");
  for (const auto& v : vs) std::printf(" %s %.1e", v.name.c_str(), check(v, Shape{"check", 45, 300, 800}));
  std::printf("\n");
  for (int t : {1, threads}) {
    for (bool cold : {false, true}) {
      std::printf("\n== %d thread(s), B %s (TFLOPS)\n%-32s", t, cold ? "cold (DRAM)" : "hot (cache)", "shape");
      for (const auto& v : vs) std::printf(" %16s", v.name.c_str());
      std::printf("\n");
      for (const Shape& s : shapes) {
        std::printf("%-32s", s.name);
        for (const auto& v : vs) std::printf(" %16.3f", run(v, s, t, cold));
        std::printf("\n");
        std::fflush(stdout);
      }
    }
    if (threads == 1) break;
  }
  return 0;
}
