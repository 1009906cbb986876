// Dequantization throughput: what a quantized expert layer pays per weight
// on top of the bf16 GEMM, per format and per ISA bundle, side by side.
//   bench_dequant [threads...]      (default: 1)
// Rows, for each format (int8, int4 g32, fp8_block, mxfp4):
//   fwd   : the forward's slice, dequant(K = 2048 rows x 256 columns) into a
//           bf16 panel (the bundle's DequantFn);
//   bwd   : the backward's W^T slice: 256 K rows of an operand with N = 768
//           columns, the bundle's dequant + transpose_packed (two passes),
//           and where the bundle has one its fused dequant_t.
// Each thread streams its own 96 operands (tens of MB per thread, so codes
// come from memory as the engine's experts do) into its own L2-sized output. Figures: G weights/s
// over all threads (median of 5 rounds, variants interleaved), and the ms the
// dequantization of one Qwen3-30B-A3B layer's fwd+bwd at T = 256 would take
// at that rate (every expert's 3 projections once forward, once backward:
// 604 M weights each way), against which BENCHMARKS.md reads the layer's time.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cpu.h"
#include "kernels/gemm.h"
#include "kernels/kernel_bundle.h"
#include "kernels/quant.h"

namespace mk = moetune::kernels;

namespace {

struct Buf {
  explicit Buf(size_t bytes) : n(bytes) {
    const size_t b = (bytes + 4095) / 4096 * 4096;
    p = static_cast<uint8_t*>(std::aligned_alloc(4096, b));
    std::memset(p, 0, b);
  }
  ~Buf() { std::free(p); }
  Buf(const Buf&) = delete;
  uint8_t* p;
  size_t n;
};

// One operand in a format: random codes, normal scales (the fast path).
struct Operand {
  Operand(const mk::QuantSpec& spec, int64_t K, int64_t N, int seed)
      : q(mk::quant_q_bytes(spec, K, N)),
        s(mk::quant_scale_bytes(spec, K, N)),
        spec(spec),
        K(K),
        N(N) {
    std::mt19937 rng(seed);
    for (size_t i = 0; i + 4 <= q.n; i += 4) {
      const uint32_t r = rng();
      std::memcpy(q.p + i, &r, 4);
    }
    const int64_t count = mk::quant_scale_count(spec, K, N);
    for (int64_t i = 0; i < count; ++i) {
      if (spec.format == mk::WeightFormat::kMxfp4) {
        s.p[i] = uint8_t(110 + rng() % 20);
      } else {
        const float v = 1e-3f * float(1 + rng() % 100);
        std::memcpy(s.p + 4 * i, &v, 4);
      }
    }
  }
  mk::QuantB view() const { return mk::QuantB{spec, q.p, s.p, K, N}; }
  Buf q, s;
  mk::QuantSpec spec;
  int64_t K, N;
};

// One timed variant: a call on operand i into the thread's scratch.
using Call = std::function<void(const mk::QuantB&, mk::bf16* out, mk::bf16* tmp)>;
struct Variant {
  std::string name;
  Call call;
};

// G weights/s of each variant (median of 5 interleaved rounds).
std::vector<double> run(const std::vector<Variant>& vs, const mk::QuantSpec& spec, int64_t K,
                        int64_t N, int64_t weights_per_call, int threads) {
  const int nb = 96;
  std::vector<std::vector<std::unique_ptr<Operand>>> ops(threads);
  {
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        for (int i = 0; i < nb; ++i)
          ops[t].push_back(std::make_unique<Operand>(spec, K, N, t * nb + i));
      });
    for (auto& th : pool) th.join();
  }
  const int64_t reps = std::max<int64_t>(nb, int64_t(1e9 / double(weights_per_call) / threads));
  std::vector<std::vector<double>> rate(vs.size());
  for (int round = 0; round < 5; ++round) {
    for (size_t vi = 0; vi < vs.size(); ++vi) {
      std::vector<double> secs(threads);
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          const size_t elems = size_t(weights_per_call) + 4096;
          std::vector<mk::bf16> out(elems), tmp(elems);
          for (int i = 0; i < nb; ++i) vs[vi].call(ops[t][i]->view(), out.data(), tmp.data());
          const auto t0 = std::chrono::steady_clock::now();
          for (int64_t i = 0; i < reps; ++i)
            vs[vi].call(ops[t][i % nb]->view(), out.data(), tmp.data());
          secs[t] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        });
      }
      for (auto& th : pool) th.join();
      double worst = 0;
      for (double x : secs) worst = std::max(worst, x);
      rate[vi].push_back(double(weights_per_call) * reps * threads / worst / 1e9);
    }
  }
  std::vector<double> med;
  for (auto& v : rate) {
    std::sort(v.begin(), v.end());
    med.push_back(v[v.size() / 2]);
  }
  return med;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> thread_counts;
  for (int i = 1; i < argc; ++i) thread_counts.push_back(std::atoi(argv[i]));
  if (thread_counts.empty()) thread_counts.push_back(1);
  std::printf("cpu: %s\n", mk::cpu_summary().c_str());
  std::vector<mk::Isa> isas;
  for (const mk::IsaInfo& i : mk::kIsas) {
    // The amx bundle's dequant is the avx512_bf16 one: one column for both.
    if (i.id != mk::Isa::kScalar && i.id != mk::Isa::kAmxBf16 && mk::cpu_supports(i.id))
      isas.push_back(i.id);
  }
  const struct {
    const char* name;
    mk::QuantSpec spec;
  } formats[] = {{"int8", {mk::WeightFormat::kInt8, 0}},
                 {"int4 g32", {mk::WeightFormat::kInt4, 32}},
                 {"fp8_block", {mk::WeightFormat::kFp8Block, 0}},
                 {"mxfp4", {mk::WeightFormat::kMxfp4, 0}}};
  const int64_t K = 2048, cols = 256, Nb = 768;
  const double layer_weights = 604e6;  // Qwen3-30B-A3B: 128 experts x 3 x 2048 x 768, one way
  for (int t : thread_counts) {
    std::printf(
        "\n== %d thread(s): G weights/s (ms of one Qwen3 layer's dequant at T=256, one way)\n", t);
    for (const auto& f : formats) {
      std::vector<Variant> fwd, bwd;
      for (mk::Isa isa : isas) {
        const mk::KernelBundle& kb = mk::kernels_for(isa);
        const std::string n = mk::isa_name(isa);
        fwd.push_back({n + " dequant", [&kb](const mk::QuantB& q, mk::bf16* out, mk::bf16*) {
                         kb.dequant(q, 0, q.N, 0, q.K, out);
                       }});
        bwd.push_back({n + " dequant+transpose",
                       [&kb, cols](const mk::QuantB& q, mk::bf16* out, mk::bf16* tmp) {
                         kb.dequant(q, 0, q.N, 0, cols, tmp);
                         kb.transpose_packed(mk::PackedB{tmp, cols, q.N}, 0, cols, out);
                       }});
        if (kb.dequant_t)
          bwd.push_back(
              {n + " dequant_t", [&kb, cols](const mk::QuantB& q, mk::bf16* out, mk::bf16*) {
                 kb.dequant_t(q, 0, cols, out);
               }});
      }
      const std::vector<double> rf = run(fwd, f.spec, K, cols, K * cols, t);
      const std::vector<double> rb = run(bwd, f.spec, cols, Nb, cols * Nb, t);
      for (size_t i = 0; i < fwd.size(); ++i)
        std::printf("%-10s fwd %-36s %8.2f  (%7.1f ms)\n", f.name, fwd[i].name.c_str(), rf[i],
                    layer_weights / (rf[i] * 1e9) * 1e3);
      for (size_t i = 0; i < bwd.size(); ++i)
        std::printf("%-10s bwd %-36s %8.2f  (%7.1f ms)\n", f.name, bwd[i].name.c_str(), rb[i],
                    layer_weights / (rb[i] * 1e9) * 1e3);
      std::fflush(stdout);
    }
  }
  return 0;
}
