// Engine tests: random layers and batches (bf16-representable values), the
// tolerance constants, shared by the reference (engine_reference.h) and the
// engine drivers (engine_test_support.h, whose header documents the setup).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "engine/context.h"
#include "engine/moe_experts.h"
#include "engine/moe_types.h"
#include "engine/routing.h"
#include "kernels/cpu.h"
#include "kernels/gemm.h"

namespace moetune::engine_test {

namespace mk = moetune::kernels;
using mk::bf16;

constexpr double kU = 1.0 / 256.0;  // 2^-8
constexpr double kCOut = 4.0;
constexpr double kCGrad = 6.0;

// Flip to true locally to print the error ratio err / (u * scale) of every
// compared tensor (the margin to c). Must stay false when committed.
constexpr bool kVerbose = false;

inline float round_bf(float v) { return mk::bf16_to_f32(mk::f32_to_bf16(v)); }

// ---------------------------------------------------------------------------
// Problem: weights of one layer (fixed) and batches (per forward call).
// ---------------------------------------------------------------------------

// Projection indices of the arrays below (the engine itself uses moetune::Proj).
enum ProjIndex { kGate = 0, kUp = 1, kDown = 2 };
const char* const kProjName[3] = {"gate", "up", "down"};

struct Rng {
  explicit Rng(uint64_t seed) : g(seed) {}
  float uni(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(g); }
  int below(int n) { return std::uniform_int_distribution<int>(0, n - 1)(g); }
  std::mt19937_64 g;
};

// n bf16-representable values from U[-amp, amp].
inline std::vector<float> rand_bf(size_t n, float amp, Rng& rng) {
  std::vector<float> v(n);
  for (float& f : v) f = round_bf(rng.uni(-amp, amp));
  return v;
}

inline std::vector<bf16> bits(const std::vector<float>& v) {
  std::vector<bf16> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = mk::f32_to_bf16(v[i]);
  return b;
}

struct LoraCfg {
  int r[3] = {4, 4, 4};  // 0 = disabled
  float s = 1.5f;        // not a power of two: bf16(s * A x) really rounds
  DType a_dtype = DType::kF32;
  DType b_dtype = DType::kF32;
};

// Activation and optional frozen biases of a layer (defaults: today's SwiGLU,
// no biases; generated from their own seed so that the other weights of a
// layer do not depend on them).
struct ActCfg {
  Activation act = Activation::kSwiGLU;
  float alpha = 1.702f, limit = 7.0f;
  bool bias[3] = {false, false, false};  // gate [E, I], up [E, I], down [E, H]
  DType bias_dtype = DType::kF32;
  float bias_amp = 0.5f;
  bool any_bias() const { return bias[0] || bias[1] || bias[2]; }
};

struct Layer {
  int E = 0, H = 0, I = 0;
  ActCfg act;
  std::vector<float> bias[3];  // bf16-representable; empty = absent
  std::vector<bf16> bias_b[3];
  std::vector<float> W[3];  // gate/up [E, I, H], down [E, H, I]
  std::vector<bf16> Wb[3];
  LoraCfg lora;
  std::vector<float> A[3], B[3];  // A [E, r, in], B [E, out, r]
  std::vector<bf16> Ab[3], Bb[3];

  int in(int p) const { return p == kDown ? I : H; }
  int out(int p) const { return p == kDown ? H : I; }
  bool on(int p) const { return lora.r[p] > 0; }

  LoraSet lora_set() const {
    LoraSet s;
    s.scaling = lora.s;
    LoraProj* ps[3] = {&s.gate, &s.up, &s.down};
    for (int p = 0; p < 3; ++p) {
      if (!on(p)) continue;
      ps[p]->r = lora.r[p];
      ps[p]->a_dtype = lora.a_dtype;
      ps[p]->b_dtype = lora.b_dtype;
      ps[p]->A = lora.a_dtype == DType::kBf16 ? static_cast<const void*>(Ab[p].data())
                                              : static_cast<const void*>(A[p].data());
      ps[p]->B = lora.b_dtype == DType::kBf16 ? static_cast<const void*>(Bb[p].data())
                                              : static_cast<const void*>(B[p].data());
    }
    return s;
  }
};

inline Layer make_layer(int E, int H, int I, const LoraCfg& lc, uint64_t seed,
                        const ActCfg& ac = ActCfg{}) {
  Rng rng(seed);
  Layer L;
  L.E = E;
  L.H = H;
  L.I = I;
  L.lora = lc;
  L.act = ac;
  Rng brng(seed ^ 0xb1a5b1a5ull);
  for (int p = 0; p < 3; ++p) {
    if (!ac.bias[p]) continue;
    L.bias[p] = rand_bf(size_t(E) * (p == kDown ? H : I), ac.bias_amp, brng);
    L.bias_b[p] = bits(L.bias[p]);
  }
  // Base weights U[-a, a] with a = 3/sqrt(fan_in): pre-activations O(1), so
  // silu is exercised in its non-linear range.
  for (int p = 0; p < 3; ++p) {
    L.W[p] = rand_bf(size_t(E) * I * H, 3.0f / std::sqrt(float(L.in(p))), rng);
    L.Wb[p] = bits(L.W[p]);
    if (!L.on(p)) continue;
    const int r = lc.r[p];
    // The LoRA term s * B (A x) is made comparable to the base term (a zero-
    // initialised B would test nothing).
    L.A[p] = rand_bf(size_t(E) * r * L.in(p), 3.0f / std::sqrt(float(L.in(p))), rng);
    L.B[p] = rand_bf(size_t(E) * L.out(p) * r, 1.5f / (lc.s * std::sqrt(float(r))), rng);
    L.Ab[p] = bits(L.A[p]);
    L.Bb[p] = bits(L.B[p]);
  }
  return L;
}

enum class Pattern {
  kDistinct,    // k distinct experts per token from `allowed`
  kDuplicates,  // k experts drawn with replacement (a token may hit one expert twice)
  kAllOne,      // every slot on expert `one`
  kHot,         // slot 0 of every token on expert `one`, the others distinct from the rest
};

struct BatchCfg {
  int64_t T = 9;
  int k = 2;
  Pattern pattern = Pattern::kDistinct;
  std::vector<int> allowed;  // empty = all experts
  int one = 0;
  std::vector<int> masked;  // experts with expert_mask = 0 (mask passed iff non-empty)
};

struct Batch {
  int64_t T = 0;
  int k = 0;
  std::vector<float> x, w, dout;  // [T, H], [T, k], [T, H]
  std::vector<int64_t> ids;       // [T, k]
  std::vector<uint8_t> mask;      // [E] or empty
};

inline Batch make_batch(const Layer& L, const BatchCfg& c, uint64_t seed) {
  Rng rng(seed);
  Batch b;
  b.T = c.T;
  b.k = c.k;
  b.x = rand_bf(size_t(c.T) * L.H, 1.0f, rng);
  b.dout = rand_bf(size_t(c.T) * L.H, 1.0f, rng);
  b.w.resize(size_t(c.T) * c.k);
  for (float& w : b.w) w = round_bf(rng.uni(0.05f, 1.0f));
  std::vector<int> allowed = c.allowed;
  if (allowed.empty())
    for (int e = 0; e < L.E; ++e) allowed.push_back(e);
  b.ids.resize(size_t(c.T) * c.k);
  for (int64_t t = 0; t < c.T; ++t) {
    std::vector<int> pool = allowed;
    for (int j = 0; j < c.k; ++j) {
      int e;
      switch (c.pattern) {
        case Pattern::kAllOne:
          e = c.one;
          break;
        case Pattern::kDuplicates:
          e = allowed[rng.below(int(allowed.size()))];
          break;
        case Pattern::kHot:
          if (j == 0) {
            e = c.one;
            pool.erase(std::remove(pool.begin(), pool.end(), c.one), pool.end());
            break;
          }
          [[fallthrough]];
        default: {
          if (pool.empty()) throw std::logic_error("test setup: k > number of allowed experts");
          const int i = rng.below(int(pool.size()));
          e = pool[i];
          pool.erase(pool.begin() + i);
        }
      }
      b.ids[t * c.k + j] = e;
    }
  }
  if (!c.masked.empty()) {
    b.mask.assign(L.E, 1);
    for (int e : c.masked) b.mask[e] = 0;
  }
  return b;
}

inline bool routed(const Batch& b, int64_t slot) {
  return b.mask.empty() || b.mask[b.ids[slot]] != 0;
}

}  // namespace moetune::engine_test
