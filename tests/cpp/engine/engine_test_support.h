// Shared helpers for the engine-layer tests (csrc/engine): moetune::MoeExperts
// forward + backward against a plain double-precision reference, used by
// test_engine_numerics.cc, test_engine_invariants.cc and test_engine_errors.cc.
//
// The reference is the obvious per-(token, slot) loop over the *unpacked*
// weights, in double, with no intermediate rounding: it shares no code with
// the engine (no GEMM library, no packed layouts). Every input is a
// bf16-representable value (generated as float, rounded with f32_to_bf16) and
// the reference uses exactly those values, so the only differences between
// engine and reference are the engine's documented bf16 roundings of GEMM
// operands and its fp32 accumulation.
//
// Tolerance (normwise, per output tensor):
//     max |engine - ref|  <=  c * u * scale,   u = 2^-8 (bf16 unit roundoff:
//                                               8-bit significand, RNE)
// with scale = max |ref| over the whole tensor. How c is counted: every bf16
// rounding perturbs the rounded quantity by <= u relative. All weights are
// fan-in normalised (U[-3/sqrt(fan_in), +]) and the LoRA term is made about as
// large as the base term, so every intermediate is O(1) relative to the
// outputs and a perturbation of u relative at any stage reaches the output as
// ~u * |ref| after the following (random-sign, norm-preserving on average)
// linear maps. fp32 accumulation (K <= 301: ~K * 2^-24 < 2e-5) is negligible
// next to u. Counting the chained roundings on the longest path:
//   * kCOut = 4 for `out`: z = bf16(s*A x) -> g (or u) -> h -> z_d =
//     bf16(s*Ad h) -> y (fp32) -> out, plus the final store when out is bf16:
//     5 roundings, but z and z_d perturb only the LoRA share of their sums and
//     the roundings are independent (they add in quadrature, not linearly),
//     so 4 is an upper count; the largest ratio observed over all cases is
//     ~2.2 (H = 1, where max|ref| is the max of few values).
//   * kCGrad = 6 for dx, d topk_weights and the six LoRA gradients: on top of
//     the forward roundings (z, g, u, h, z_d) the backward rounds
//     q = bf16(s*Bd^T dout), dg and du, p = bf16(s*Bg^T dg) / bf16(s*Bu^T du),
//     the w-scaled token-side operands of the LoRA-gradient contractions, and
//     dx / dw when stored as bf16 (dout itself is bf16-representable here, so
//     exact in either dtype). Longest chains: z -> g -> dg -> p -> dA and
//     q -> D -> dg -> dx (+ store): 6 roundings that matter at full weight;
//     largest observed ratio ~3.1 (single-token, rank-1 LoRA gradients).
//   * d topk_weights is a dot product <dout, y> over H terms (computed by the
//     engine as <D, h> over I terms). Its rounding error scales with the
//     2-norm of its term vector, not with the sum, which can cancel; with one
//     slot (T = 1, k = 1) max|ref| can be arbitrarily small by chance. So its
//     scale is max(max_slot |dw|, max_slot ||(D_i h_i)_i||_2): the natural
//     magnitude of the dot product. For more than a handful of slots this is
//     the same as max|ref|.
// Structural zeros are exact: where the reference is exactly 0 (tokens whose
// experts are all masked, LoRA gradients of experts with no routed tokens or
// masked experts, d topk_weights of masked slots) the engine must give exactly
// 0 (random continuous inputs never produce an exact 0 otherwise).
//
// Exactness invariants (bitwise): thread counts 1/2/3, ActivationPolicy
// kSave/kRecompute, BackwardWeights kRepack/kTransposedCopy.
//
// Flip kVerbose (below) to true locally to print the observed error ratio
// err / (u * scale) of every compared tensor (the margin to c).

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
#include "engine_reference.h"
#include "engine_test_data.h"
#include "kernels/cpu.h"
#include "kernels/gemm.h"

namespace moetune::engine_test {

// ---------------------------------------------------------------------------
// Engine calls.
// ---------------------------------------------------------------------------

struct IoCfg {
  DType x = DType::kBf16;
  DType ids = DType::kI64;
  DType w = DType::kF32;
  DType out = DType::kF32;
  DType dout = DType::kBf16;
  DType dx = DType::kF32;
  DType dw = DType::kF32;
  bool want_dx = true, want_dw = true;
  bool want_dA = true, want_dB = true;
};

inline size_t dsize(DType d) {
  return d == DType::kBf16 ? 2 : d == DType::kI32 ? 4 : d == DType::kF32 ? 4 : 8;
}

// A typed buffer initialised from float values (or poisoned, for outputs).
struct TBuf {
  DType dt = DType::kF32;
  std::vector<unsigned char> bytes;
  void from(const std::vector<float>& v, DType d) {
    dt = d;
    bytes.assign(std::max<size_t>(v.size(), 1) * dsize(d), 0);
    for (size_t i = 0; i < v.size(); ++i) {
      if (d == DType::kBf16) {
        const bf16 b = mk::f32_to_bf16(v[i]);
        std::memcpy(bytes.data() + 2 * i, &b, 2);
      } else {
        std::memcpy(bytes.data() + 4 * i, &v[i], 4);
      }
    }
  }
  void poison(size_t n, DType d) {
    dt = d;
    bytes.assign(std::max<size_t>(n, 1) * dsize(d), 0);
    for (size_t i = 0; i < n; ++i) {
      if (d == DType::kBf16) {
        const bf16 b = 0x7fc1;
        std::memcpy(bytes.data() + 2 * i, &b, 2);
      } else {
        const float f = std::numeric_limits<float>::quiet_NaN();
        std::memcpy(bytes.data() + 4 * i, &f, 4);
      }
    }
  }
  std::vector<float> floats(size_t n) const {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; ++i) {
      if (dt == DType::kBf16) {
        bf16 b;
        std::memcpy(&b, bytes.data() + 2 * i, 2);
        v[i] = mk::bf16_to_f32(b);
      } else {
        std::memcpy(&v[i], bytes.data() + 4 * i, 4);
      }
    }
    return v;
  }
  void* data() { return bytes.data(); }
};

struct Outputs {
  std::vector<float> out, dx, dw, dA[3], dB[3];
  std::vector<unsigned char> raw;  // every output byte, for bitwise comparisons
};

// All buffers of one forward + backward call; stays put (pointers into it are
// handed to the engine, possibly asynchronously).
class Call {
 public:
  Call(const Layer& L, const Batch& b, const IoCfg& io) : L_(L), b_(b), io_(io) {
    const size_t TH = size_t(b.T) * L.H, Tk = size_t(b.T) * b.k;
    x_.from(b.x, io.x);
    w_.from(b.w, io.w);
    dout_.from(b.dout, io.dout);
    ids64_ = b.ids;
    if (ids64_.empty()) ids64_.push_back(0);
    ids32_.assign(ids64_.begin(), ids64_.end());
    out_.poison(TH, io.out);
    dx_.poison(TH, io.dx);
    dw_.poison(Tk, io.dw);
    for (int p = 0; p < 3; ++p) {
      if (!L.on(p)) continue;
      dA_[p].assign(L.A[p].size(), std::numeric_limits<float>::quiet_NaN());
      dB_[p].assign(L.B[p].size(), std::numeric_limits<float>::quiet_NaN());
    }
  }
  Call(const Call&) = delete;

  ForwardArgs fwd() {
    ForwardArgs a;
    a.T = b_.T;
    a.k = b_.k;
    a.x = x_.data();
    a.x_dtype = io_.x;
    a.ids_dtype = io_.ids;
    a.topk_ids = io_.ids == DType::kI32 ? static_cast<const void*>(ids32_.data())
                                        : static_cast<const void*>(ids64_.data());
    a.topk_weights = w_.data();
    a.w_dtype = io_.w;
    a.expert_mask = b_.mask.empty() ? nullptr : b_.mask.data();
    a.lora = L_.lora_set();
    a.out = out_.data();
    a.out_dtype = io_.out;
    return a;
  }
  BackwardArgs bwd() {
    BackwardArgs a;
    a.dout = dout_.data();
    a.dout_dtype = io_.dout;
    a.lora = L_.lora_set();
    a.dx = io_.want_dx ? dx_.data() : nullptr;
    a.dx_dtype = io_.dx;
    a.dtopk_weights = io_.want_dw ? dw_.data() : nullptr;
    a.dw_dtype = io_.dw;
    float** dA[3] = {&a.grads.dA_gate, &a.grads.dA_up, &a.grads.dA_down};
    float** dB[3] = {&a.grads.dB_gate, &a.grads.dB_up, &a.grads.dB_down};
    for (int p = 0; p < 3; ++p) {
      if (!L_.on(p)) continue;
      if (io_.want_dA) *dA[p] = dA_[p].data();
      if (io_.want_dB) *dB[p] = dB_[p].data();
    }
    return a;
  }
  // Re-poison the backward outputs (to run backward again).
  void poison_grads() {
    dx_.poison(size_t(b_.T) * L_.H, io_.dx);
    dw_.poison(size_t(b_.T) * b_.k, io_.dw);
    for (int p = 0; p < 3; ++p) {
      std::fill(dA_[p].begin(), dA_[p].end(), std::numeric_limits<float>::quiet_NaN());
      std::fill(dB_[p].begin(), dB_[p].end(), std::numeric_limits<float>::quiet_NaN());
    }
  }
  Outputs collect() const {
    Outputs o;
    const size_t TH = size_t(b_.T) * L_.H, Tk = size_t(b_.T) * b_.k;
    o.out = out_.floats(TH);
    o.dx = dx_.floats(TH);
    o.dw = dw_.floats(Tk);
    auto add = [&](const void* p, size_t n) {
      const unsigned char* c = static_cast<const unsigned char*>(p);
      o.raw.insert(o.raw.end(), c, c + n);
    };
    add(out_.bytes.data(), out_.bytes.size());
    add(dx_.bytes.data(), dx_.bytes.size());
    add(dw_.bytes.data(), dw_.bytes.size());
    for (int p = 0; p < 3; ++p) {
      o.dA[p] = dA_[p];
      o.dB[p] = dB_[p];
      add(dA_[p].data(), dA_[p].size() * 4);
      add(dB_[p].data(), dB_[p].size() * 4);
    }
    return o;
  }

 private:
  const Layer& L_;
  const Batch& b_;
  IoCfg io_;
  TBuf x_, w_, dout_, out_, dx_, dw_;
  std::vector<int64_t> ids64_;
  std::vector<int32_t> ids32_;
  std::vector<float> dA_[3], dB_[3];
};

struct EngineCfg {
  int threads = 1;
  std::optional<mk::Isa> isa;  // nullopt = best available
  ExpertsOptions opts;
  DType load_dtype = DType::kBf16;
  std::vector<int> cpus;  // ContextOptions::cpus
  CpuSets partitions;     // ContextOptions::partitions (NUMA)
};

inline std::shared_ptr<Context> make_context(const EngineCfg& ec) {
  ContextOptions o;
  o.num_threads = ec.threads;
  o.isa = ec.isa;
  o.cpus = ec.cpus;
  o.partitions = ec.partitions;
  return std::make_shared<Context>(o);
}

inline std::unique_ptr<MoeExperts> make_experts(const Layer& L, const EngineCfg& ec,
                                                std::shared_ptr<Context> ctx = nullptr) {
  if (!ctx) ctx = make_context(ec);
  ExpertsOptions opts = ec.opts;
  opts.activation = L.act.act;
  opts.swiglu_alpha = L.act.alpha;
  opts.swiglu_limit = L.act.limit;
  auto m = std::make_unique<MoeExperts>(ctx, L.E, L.H, L.I, opts);
  if (ec.load_dtype == DType::kBf16) {
    m->load(L.Wb[0].data(), L.Wb[1].data(), L.Wb[2].data(), DType::kBf16);
  } else {
    m->load(L.W[0].data(), L.W[1].data(), L.W[2].data(), DType::kF32);
  }
  if (L.act.any_bias()) {
    const bool b16 = L.act.bias_dtype == DType::kBf16;
    const void* src[3];
    for (int p = 0; p < 3; ++p)
      src[p] = L.bias[p].empty() ? nullptr
               : b16             ? static_cast<const void*>(L.bias_b[p].data())
                                 : static_cast<const void*>(L.bias[p].data());
    m->load_biases(src[0], src[1], src[2], L.act.bias_dtype);
  }
  return m;
}

inline Outputs run_engine(MoeExperts& m, const Layer& L, const Batch& b, const IoCfg& io) {
  Call c(L, b, io);
  auto saved = m.forward(c.fwd());
  m.backward(saved, c.bwd());
  return c.collect();
}

inline Outputs run_engine(const Layer& L, const Batch& b, const IoCfg& io, const EngineCfg& ec) {
  auto m = make_experts(L, ec);
  return run_engine(*m, L, b, io);
}

// ---------------------------------------------------------------------------
// Comparison.
// ---------------------------------------------------------------------------

// Checks max|got - ref| <= c * u * scale (scale = max|ref| unless given) and
// exact zeros where ref is exactly zero. NaN fails.
inline void expect_close(const std::string& what, const std::vector<float>& got,
                         const std::vector<double>& ref, double c, double scale = -1.0) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  if (scale < 0) {
    scale = 0.0;
    for (double r : ref) scale = std::max(scale, std::fabs(r));
  }
  const double tol = c * kU * scale;
  double worst = 0.0;
  size_t worst_i = 0;
  size_t bad = 0, first_bad = 0, bad_zero = 0, first_bad_zero = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i];
    if (ref[i] == 0.0) {
      if (!(g == 0.0)) {
        if (bad_zero++ == 0) first_bad_zero = i;
      }
      continue;
    }
    const double err = std::fabs(g - ref[i]);
    if (!(err <= tol)) {
      if (bad++ == 0) first_bad = i;
    }
    if (!(err <= worst)) {
      worst = std::isnan(err) ? std::numeric_limits<double>::infinity() : err;
      worst_i = i;
    }
  }
  const double ratio = scale > 0 ? worst / (kU * scale) : 0.0;
  if (kVerbose) {
    std::cout << "    [ratio] " << what << ": err/(u*scale) = " << ratio << " (c = " << c
              << ", scale = " << scale << ")\n";
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size()
                     << " elements outside c*u*scale = " << c << "*2^-8*" << scale << "; first at "
                     << first_bad << " got " << got[first_bad] << " ref " << ref[first_bad]
                     << "; worst at " << worst_i << " err/(u*scale) = " << ratio;
  EXPECT_EQ(bad_zero, 0u) << what << ": " << bad_zero
                          << " elements must be exactly 0 (structural zero); first at "
                          << first_bad_zero << " got " << got[first_bad_zero];
}

inline void expect_matches_reference(const std::string& tag, const Layer& L, const Batch& b,
                                     const IoCfg& io, const Outputs& o, const Ref& R) {
  expect_close(tag + " out", o.out, R.out, kCOut);
  if (io.want_dx) expect_close(tag + " dx", o.dx, R.dx, kCGrad);
  if (io.want_dw) {
    double scale = 0.0;
    for (size_t i = 0; i < R.dw.size(); ++i)
      scale = std::max({scale, std::fabs(R.dw[i]), R.dw_scale[i]});
    expect_close(tag + " dtopk_weights", o.dw, R.dw, kCGrad, scale);
  }
  for (int p = 0; p < 3; ++p) {
    if (!L.on(p)) continue;
    if (io.want_dA) expect_close(tag + " dA_" + kProjName[p], o.dA[p], R.dA[p], kCGrad);
    if (io.want_dB) expect_close(tag + " dB_" + kProjName[p], o.dB[p], R.dB[p], kCGrad);
  }
}

inline void expect_bitwise(const std::string& what, const Outputs& a, const Outputs& b) {
  ASSERT_EQ(a.raw.size(), b.raw.size()) << what;
  if (std::memcmp(a.raw.data(), b.raw.data(), a.raw.size()) == 0) return;
  // Locate the first difference for the message.
  auto first_diff = [](const std::vector<float>& x, const std::vector<float>& y) -> long {
    for (size_t i = 0; i < x.size(); ++i)
      if (std::memcmp(&x[i], &y[i], 4) != 0) return long(i);
    return -1;
  };
  std::string where;
  const std::vector<float>* xs[] = {&a.out,   &a.dx,    &a.dw,    &a.dA[0], &a.dB[0],
                                    &a.dA[1], &a.dB[1], &a.dA[2], &a.dB[2]};
  const std::vector<float>* ys[] = {&b.out,   &b.dx,    &b.dw,    &b.dA[0], &b.dB[0],
                                    &b.dA[1], &b.dB[1], &b.dA[2], &b.dB[2]};
  const char* names[] = {"out",   "dx",    "dw",      "dA_gate", "dB_gate",
                         "dA_up", "dB_up", "dA_down", "dB_down"};
  for (int i = 0; i < 9; ++i) {
    const long d = first_diff(*xs[i], *ys[i]);
    if (d >= 0) {
      where += std::string(" ") + names[i] + "[" + std::to_string(d) +
               "]: " + std::to_string((*xs[i])[d]) + " vs " + std::to_string((*ys[i])[d]) + ";";
    }
  }
  ADD_FAILURE() << what << ": results not bitwise identical:" << where;
}

inline bool isa_runnable(const std::optional<mk::Isa>& isa) {
  return !isa || mk::cpu_supports(*isa);
}

// ---------------------------------------------------------------------------
// Parameterised accuracy cases.
// ---------------------------------------------------------------------------

struct Case {
  std::string name;
  int E = 4, H = 40, I = 24;
  LoraCfg lora;
  ActCfg act;
  BatchCfg batch;
  IoCfg io;
  EngineCfg eng;
  uint64_t seed = 1;
};

inline std::ostream& operator<<(std::ostream& os, const Case& c) { return os << c.name; }

// ---------------------------------------------------------------------------
// Re-entrancy helpers.
// ---------------------------------------------------------------------------

inline LoraCfg all_lora(int r) {
  LoraCfg lc;
  lc.r[0] = lc.r[1] = lc.r[2] = r;
  return lc;
}

// ---------------------------------------------------------------------------
// Fixture of the single-scenario tests: one layer, one batch on it (seeded
// seed + 1), default I/O dtypes and an engine holding the layer.
// ---------------------------------------------------------------------------

// E, H, I of a test layer.
struct LayerShape {
  int E = 4, H = 40, I = 24;
};

class EngineFixture : public ::testing::Test {
 protected:
  void build(uint64_t seed, const BatchCfg& batch = BatchCfg{}, const EngineCfg& eng = EngineCfg{},
             LayerShape shape = LayerShape{}, const LoraCfg& lora = all_lora(4)) {
    L = make_layer(shape.E, shape.H, shape.I, lora, seed);
    b = make_batch(L, batch, seed + 1);
    ec = eng;
    m = make_experts(L, ec);
  }
  // Forward + backward of the batch on the engine (fresh buffers).
  Outputs run() { return run_engine(*m, L, b, io); }
  void expect_reference(const std::string& tag, const Outputs& o) const {
    expect_matches_reference(tag, L, b, io, o, reference(L, b));
  }

  Layer L;
  Batch b;
  IoCfg io;
  EngineCfg ec;
  std::unique_ptr<MoeExperts> m;
};

inline BatchCfg tokens(int64_t T, int k = 2) {
  BatchCfg c;
  c.T = T;
  c.k = k;
  return c;
}

inline EngineCfg threads(int n) {
  EngineCfg c;
  c.threads = n;
  return c;
}

// ---------------------------------------------------------------------------
// Error helpers.
// ---------------------------------------------------------------------------

// Expects fn() to throw std::invalid_argument whose what() contains every needle.
template <typename Fn>
inline void expect_invalid_argument(const std::string& what, Fn&& fn,
                                    const std::vector<std::string>& needles) {
  try {
    fn();
  } catch (const std::invalid_argument& e) {
    const std::string msg = e.what();
    for (const std::string& n : needles)
      EXPECT_NE(msg.find(n), std::string::npos)
          << what << ": message \"" << msg << "\" lacks \"" << n << "\"";
    return;
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": threw a different exception: " << e.what();
    return;
  }
  ADD_FAILURE() << what << ": did not throw std::invalid_argument";
}

}  // namespace moetune::engine_test
