// Tests for the engine layer (csrc/engine): moetune::MoeExperts forward +
// backward against a plain double-precision reference, Context jobs and
// build_routing.
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
// Set MOETUNE_TEST_VERBOSE=1 to print the observed error ratio
// err / (u * scale) of every compared tensor (the margin to c).
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

namespace {

using namespace moetune;
namespace mk = moetune::kernels;
using mk::bf16;

constexpr double kU = 1.0 / 256.0;  // 2^-8
constexpr double kCOut = 4.0;
constexpr double kCGrad = 6.0;

bool verbose() {
  static const bool v = [] {
    const char* e = std::getenv("MOETUNE_TEST_VERBOSE");
    return e && *e && std::string(e) != "0";
  }();
  return v;
}

float round_bf(float v) { return mk::bf16_to_f32(mk::f32_to_bf16(v)); }

// ---------------------------------------------------------------------------
// Problem: weights of one layer (fixed) and batches (per forward call).
// ---------------------------------------------------------------------------

enum Proj { kGate = 0, kUp = 1, kDown = 2 };
const char* const kProjName[3] = {"gate", "up", "down"};

struct Rng {
  explicit Rng(uint64_t seed) : g(seed) {}
  float uni(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(g); }
  int below(int n) { return std::uniform_int_distribution<int>(0, n - 1)(g); }
  std::mt19937_64 g;
};

// n bf16-representable values from U[-amp, amp].
std::vector<float> rand_bf(size_t n, float amp, Rng& rng) {
  std::vector<float> v(n);
  for (float& f : v) f = round_bf(rng.uni(-amp, amp));
  return v;
}

std::vector<bf16> bits(const std::vector<float>& v) {
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

struct Layer {
  int E = 0, H = 0, I = 0;
  std::vector<float> W[3];     // gate/up [E, I, H], down [E, H, I]
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

Layer make_layer(int E, int H, int I, const LoraCfg& lc, uint64_t seed) {
  Rng rng(seed);
  Layer L;
  L.E = E;
  L.H = H;
  L.I = I;
  L.lora = lc;
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
  std::vector<int> masked;   // experts with expert_mask = 0 (mask passed iff non-empty)
};

struct Batch {
  int64_t T = 0;
  int k = 0;
  std::vector<float> x, w, dout;  // [T, H], [T, k], [T, H]
  std::vector<int64_t> ids;       // [T, k]
  std::vector<uint8_t> mask;      // [E] or empty
};

Batch make_batch(const Layer& L, const BatchCfg& c, uint64_t seed) {
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
        case Pattern::kAllOne: e = c.one; break;
        case Pattern::kDuplicates: e = allowed[rng.below(int(allowed.size()))]; break;
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

bool routed(const Batch& b, int64_t slot) {
  return b.mask.empty() || b.mask[b.ids[slot]] != 0;
}

// ---------------------------------------------------------------------------
// Double-precision reference.
// ---------------------------------------------------------------------------

struct Ref {
  std::vector<double> out, dx, dw;
  std::vector<double> dw_scale;  // per slot: ||(D_i h_i)_i||_2, see the header
  std::vector<double> dA[3], dB[3];
};

double sigm(double g) { return 1.0 / (1.0 + std::exp(-g)); }

Ref reference(const Layer& L, const Batch& b) {
  const int H = L.H, I = L.I;
  const double s = L.lora.s;
  Ref R;
  R.out.assign(size_t(b.T) * H, 0.0);
  R.dx.assign(size_t(b.T) * H, 0.0);
  R.dw.assign(size_t(b.T) * b.k, 0.0);
  R.dw_scale.assign(size_t(b.T) * b.k, 0.0);
  for (int p = 0; p < 3; ++p) {
    if (!L.on(p)) continue;
    R.dA[p].assign(L.A[p].size(), 0.0);
    R.dB[p].assign(L.B[p].size(), 0.0);
  }
  // y = W v + s B (A v) for projection p of expert e; also returns z = A v.
  auto proj = [&](int p, int e, const std::vector<double>& v, std::vector<double>& z) {
    const int n_in = L.in(p), n_out = L.out(p);
    const float* W = L.W[p].data() + size_t(e) * n_out * n_in;
    std::vector<double> y(n_out, 0.0);
    for (int o = 0; o < n_out; ++o)
      for (int i = 0; i < n_in; ++i) y[o] += double(W[size_t(o) * n_in + i]) * v[i];
    z.clear();
    if (L.on(p)) {
      const int r = L.lora.r[p];
      const float* A = L.A[p].data() + size_t(e) * r * n_in;
      const float* B = L.B[p].data() + size_t(e) * n_out * r;
      z.assign(r, 0.0);
      for (int q = 0; q < r; ++q)
        for (int i = 0; i < n_in; ++i) z[q] += double(A[size_t(q) * n_in + i]) * v[i];
      for (int o = 0; o < n_out; ++o)
        for (int q = 0; q < r; ++q) y[o] += s * double(B[size_t(o) * r + q]) * z[q];
    }
    return y;
  };
  // Backward of proj given dy: returns dv = W^T dy + s A^T (B^T dy) and adds
  // the LoRA gradients dB += s dy z^T, dA += s (B^T dy) v^T.
  auto proj_bwd = [&](int p, int e, const std::vector<double>& v, const std::vector<double>& z,
                      const std::vector<double>& dy) {
    const int n_in = L.in(p), n_out = L.out(p);
    const float* W = L.W[p].data() + size_t(e) * n_out * n_in;
    std::vector<double> dv(n_in, 0.0);
    for (int o = 0; o < n_out; ++o)
      for (int i = 0; i < n_in; ++i) dv[i] += double(W[size_t(o) * n_in + i]) * dy[o];
    if (L.on(p)) {
      const int r = L.lora.r[p];
      const float* A = L.A[p].data() + size_t(e) * r * n_in;
      const float* B = L.B[p].data() + size_t(e) * n_out * r;
      std::vector<double> q(r, 0.0);  // B^T dy
      for (int o = 0; o < n_out; ++o)
        for (int j = 0; j < r; ++j) q[j] += double(B[size_t(o) * r + j]) * dy[o];
      for (int j = 0; j < r; ++j)
        for (int i = 0; i < n_in; ++i) dv[i] += s * double(A[size_t(j) * n_in + i]) * q[j];
      double* dA = R.dA[p].data() + size_t(e) * r * n_in;
      double* dB = R.dB[p].data() + size_t(e) * n_out * r;
      for (int o = 0; o < n_out; ++o)
        for (int j = 0; j < r; ++j) dB[size_t(o) * r + j] += s * dy[o] * z[j];
      for (int j = 0; j < r; ++j)
        for (int i = 0; i < n_in; ++i) dA[size_t(j) * n_in + i] += s * q[j] * v[i];
    }
    return dv;
  };

  for (int64_t t = 0; t < b.T; ++t) {
    std::vector<double> x(H), dout(H);
    for (int i = 0; i < H; ++i) {
      x[i] = b.x[t * H + i];
      dout[i] = b.dout[t * H + i];
    }
    for (int j = 0; j < b.k; ++j) {
      const int64_t slot = t * b.k + j;
      if (!routed(b, slot)) continue;
      const int e = int(b.ids[slot]);
      const double w = b.w[slot];
      std::vector<double> zg, zu, zd;
      const std::vector<double> g = proj(kGate, e, x, zg);
      const std::vector<double> u = proj(kUp, e, x, zu);
      std::vector<double> h(I);
      for (int i = 0; i < I; ++i) h[i] = g[i] * sigm(g[i]) * u[i];
      const std::vector<double> y = proj(kDown, e, h, zd);
      for (int i = 0; i < H; ++i) R.out[t * H + i] += w * y[i];
      // backward
      std::vector<double> dy(H);
      double dw = 0.0;
      for (int i = 0; i < H; ++i) {
        dy[i] = w * dout[i];
        dw += dout[i] * y[i];
      }
      R.dw[slot] = dw;
      const std::vector<double> dh = proj_bwd(kDown, e, h, zd, dy);
      std::vector<double> dg(I), du(I);
      double l2 = 0.0;
      for (int i = 0; i < I; ++i) {
        const double sg = sigm(g[i]);
        dg[i] = dh[i] * u[i] * sg * (1.0 + g[i] * (1.0 - sg));
        du[i] = dh[i] * g[i] * sg;
        const double term = (dh[i] / w) * h[i];  // D_i h_i
        l2 += term * term;
      }
      R.dw_scale[slot] = std::sqrt(l2);
      const std::vector<double> dxg = proj_bwd(kGate, e, x, zg, dg);
      const std::vector<double> dxu = proj_bwd(kUp, e, x, zu, du);
      for (int i = 0; i < H; ++i) R.dx[t * H + i] += dxg[i] + dxu[i];
    }
  }
  return R;
}

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

size_t dsize(DType d) { return d == DType::kBf16 ? 2 : d == DType::kI32 ? 4 : d == DType::kF32 ? 4 : 8; }

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
};

std::shared_ptr<Context> make_context(const EngineCfg& ec) {
  ContextOptions o;
  o.num_threads = ec.threads;
  o.isa = ec.isa;
  o.cpus = ec.cpus;
  return std::make_shared<Context>(o);
}

std::unique_ptr<MoeExperts> make_experts(const Layer& L, const EngineCfg& ec,
                                         std::shared_ptr<Context> ctx = nullptr) {
  if (!ctx) ctx = make_context(ec);
  auto m = std::make_unique<MoeExperts>(ctx, L.E, L.H, L.I, ec.opts);
  if (ec.load_dtype == DType::kBf16) {
    m->load(L.Wb[0].data(), L.Wb[1].data(), L.Wb[2].data(), DType::kBf16);
  } else {
    m->load(L.W[0].data(), L.W[1].data(), L.W[2].data(), DType::kF32);
  }
  return m;
}

Outputs run_engine(MoeExperts& m, const Layer& L, const Batch& b, const IoCfg& io) {
  Call c(L, b, io);
  auto saved = m.forward(c.fwd());
  m.backward(saved, c.bwd());
  return c.collect();
}

Outputs run_engine(const Layer& L, const Batch& b, const IoCfg& io, const EngineCfg& ec) {
  auto m = make_experts(L, ec);
  return run_engine(*m, L, b, io);
}

// ---------------------------------------------------------------------------
// Comparison.
// ---------------------------------------------------------------------------

// Checks max|got - ref| <= c * u * scale (scale = max|ref| unless given) and
// exact zeros where ref is exactly zero. NaN fails.
void expect_close(const std::string& what, const std::vector<float>& got,
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
  if (verbose()) {
    std::cout << "    [ratio] " << what << ": err/(u*scale) = " << ratio << " (c = " << c
              << ", scale = " << scale << ")\n";
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size()
                     << " elements outside c*u*scale = " << c << "*2^-8*" << scale
                     << "; first at " << first_bad << " got " << got[first_bad] << " ref "
                     << ref[first_bad] << "; worst at " << worst_i << " err/(u*scale) = " << ratio;
  EXPECT_EQ(bad_zero, 0u) << what << ": " << bad_zero
                          << " elements must be exactly 0 (structural zero); first at "
                          << first_bad_zero << " got " << got[first_bad_zero];
}

void expect_matches_reference(const std::string& tag, const Layer& L, const Batch& b,
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

void expect_bitwise(const std::string& what, const Outputs& a, const Outputs& b) {
  ASSERT_EQ(a.raw.size(), b.raw.size()) << what;
  if (std::memcmp(a.raw.data(), b.raw.data(), a.raw.size()) == 0) return;
  // Locate the first difference for the message.
  auto first_diff = [](const std::vector<float>& x, const std::vector<float>& y) -> long {
    for (size_t i = 0; i < x.size(); ++i)
      if (std::memcmp(&x[i], &y[i], 4) != 0) return long(i);
    return -1;
  };
  std::string where;
  const std::vector<float>* xs[] = {&a.out, &a.dx, &a.dw, &a.dA[0], &a.dB[0], &a.dA[1],
                                    &a.dB[1], &a.dA[2], &a.dB[2]};
  const std::vector<float>* ys[] = {&b.out, &b.dx, &b.dw, &b.dA[0], &b.dB[0], &b.dA[1],
                                    &b.dB[1], &b.dA[2], &b.dB[2]};
  const char* names[] = {"out", "dx", "dw", "dA_gate", "dB_gate", "dA_up", "dB_up", "dA_down",
                         "dB_down"};
  for (int i = 0; i < 9; ++i) {
    const long d = first_diff(*xs[i], *ys[i]);
    if (d >= 0) {
      where += std::string(" ") + names[i] + "[" + std::to_string(d) + "]: " +
               std::to_string((*xs[i])[d]) + " vs " + std::to_string((*ys[i])[d]) + ";";
    }
  }
  ADD_FAILURE() << what << ": results not bitwise identical:" << where;
}

bool isa_runnable(const std::optional<mk::Isa>& isa) {
  return !isa || mk::cpu_supports(*isa);
}

// ---------------------------------------------------------------------------
// Parameterised accuracy cases.
// ---------------------------------------------------------------------------

struct Case {
  std::string name;
  int E = 4, H = 40, I = 24;
  LoraCfg lora;
  BatchCfg batch;
  IoCfg io;
  EngineCfg eng;
  uint64_t seed = 1;
};

std::ostream& operator<<(std::ostream& os, const Case& c) { return os << c.name; }

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
    c.H = 33; c.I = 17; c.lora.r[0] = c.lora.r[1] = c.lora.r[2] = 1;
  });
  add("H33_I17_LoraAll_r16", [](Case& c) {
    c.H = 33; c.I = 17; c.lora.r[0] = c.lora.r[1] = c.lora.r[2] = 16;
  });
  add("H33_I17_NoLora", [&](Case& c) { c.H = 33; c.I = 17; no_lora(c); });
  add("H40_I24_GateOnly_r4", [](Case& c) { c.lora.r[1] = c.lora.r[2] = 0; });
  add("H40_I24_UpOnly_r16", [](Case& c) { c.lora.r[0] = c.lora.r[2] = 0; c.lora.r[1] = 16; });
  add("H40_I24_DownOnly_r4", [](Case& c) { c.lora.r[0] = c.lora.r[1] = 0; });
  add("H33_I17_DownOnly_r1", [](Case& c) {
    c.H = 33; c.I = 17; c.lora.r[0] = c.lora.r[1] = 0; c.lora.r[2] = 1;
  });
  add("H40_I24_MixedRanks_g1_u16_d4", [](Case& c) {
    c.lora.r[0] = 1; c.lora.r[1] = 16; c.lora.r[2] = 4; c.lora.s = 0.3f;
  });
  add("H40_I24_LoraAll_r40", [](Case& c) { c.lora.r[0] = c.lora.r[1] = c.lora.r[2] = 40; });
  add("H17_I9_LoraAll_r16_RankAboveDims", [](Case& c) {
    c.H = 17; c.I = 9; c.lora.r[0] = c.lora.r[1] = c.lora.r[2] = 16;
  });
  // Routing shapes.
  add("T1_k1", [](Case& c) { c.batch.T = 1; c.batch.k = 1; });
  add("T1_kE", [](Case& c) { c.batch.T = 1; c.batch.k = c.E; });
  add("T7_kE", [](Case& c) { c.H = 33; c.I = 17; c.batch.T = 7; c.batch.k = c.E; });
  add("AllTokensOneExpert_k1", [](Case& c) {
    c.E = 5; c.batch.T = 20; c.batch.k = 1; c.batch.pattern = Pattern::kAllOne; c.batch.one = 3;
  });
  add("AllTokensOneExpert_k3_SameExpertThrice", [](Case& c) {
    c.batch.T = 6; c.batch.k = 3; c.batch.pattern = Pattern::kAllOne; c.batch.one = 0;
  });
  add("ExpertsWithoutTokens", [](Case& c) {
    c.E = 8; c.batch.T = 15; c.batch.k = 2; c.batch.allowed = {1, 4, 6};
  });
  add("ExpertsWithoutTokens_r1_ids32", [](Case& c) {
    c.E = 7; c.H = 33; c.I = 17; c.lora.r[0] = c.lora.r[1] = c.lora.r[2] = 1;
    c.batch.T = 11; c.batch.k = 2; c.batch.allowed = {0, 5}; c.io.ids = DType::kI32;
  });
  add("DuplicateIdsInToken", [](Case& c) {
    c.E = 3; c.batch.T = 12; c.batch.k = 3; c.batch.pattern = Pattern::kDuplicates;
  });
  add("SingleExpertLayer_E1", [](Case& c) { c.E = 1; c.batch.k = 1; c.batch.T = 5; });
  // Input / output dtypes.
  add("X_f32", [](Case& c) { c.io.x = DType::kF32; });
  add("X_f32_Lora_bf16", [](Case& c) {
    c.io.x = DType::kF32; c.lora.a_dtype = c.lora.b_dtype = DType::kBf16;
  });
  add("Lora_bf16", [](Case& c) { c.lora.a_dtype = c.lora.b_dtype = DType::kBf16; });
  add("LoraA_bf16_B_f32", [](Case& c) { c.lora.a_dtype = DType::kBf16; });
  add("LoraA_f32_B_bf16_H33", [](Case& c) {
    c.H = 33; c.I = 17; c.lora.b_dtype = DType::kBf16;
  });
  add("Ids_i32", [](Case& c) { c.io.ids = DType::kI32; });
  add("Ids_i64_T65_TwoTokenBlocks", [](Case& c) { c.batch.T = 65; c.io.ids = DType::kI64; });
  add("Weights_loaded_f32", [](Case& c) { c.eng.load_dtype = DType::kF32; });
  add("AllBf16_io", [](Case& c) {
    c.io.w = c.io.out = c.io.dout = c.io.dx = c.io.dw = DType::kBf16;
  });
  add("AllF32_io", [](Case& c) {
    c.io.x = c.io.w = c.io.out = c.io.dout = c.io.dx = c.io.dw = DType::kF32;
  });
  add("OnlyLoraGrads_NoDxNoDw", [](Case& c) { c.io.want_dx = c.io.want_dw = false; });
  add("Only_dA_and_dx", [](Case& c) { c.io.want_dB = false; c.io.want_dw = false; });
  add("Only_dB_and_dw", [](Case& c) { c.io.want_dA = false; c.io.want_dx = false; });
  // expert_mask.
  add("ExpertMask", [](Case& c) {
    c.E = 6; c.batch.T = 16; c.batch.k = 2; c.batch.masked = {1, 3};
  });
  add("ExpertMask_NoLora_ids32", [&](Case& c) {
    no_lora(c); c.E = 6; c.batch.T = 16; c.batch.k = 3; c.batch.masked = {0, 4, 5};
    c.io.ids = DType::kI32;
  });
  add("ExpertMask_AllMasked", [](Case& c) {
    c.E = 3; c.batch.T = 4; c.batch.k = 2; c.batch.masked = {0, 1, 2};
  });
  // Multi-chunk shapes (kChunk = 256), several threads.
  add("H301_I270_Chunks_T70_threads2", [](Case& c) {
    c.E = 5; c.H = 301; c.I = 270; c.batch.T = 70; c.batch.k = 2; c.eng.threads = 2;
    c.lora.r[0] = 4; c.lora.r[1] = 1; c.lora.r[2] = 16;
  });
  // Hot experts with more rows than one row block (routing.h kRowBlock = 192).
  add("HotExpert_T400_AllOnOne_threads2", [](Case& c) {
    c.E = 3; c.H = 33; c.I = 17; c.batch.T = 400; c.batch.k = 1;
    c.batch.pattern = Pattern::kAllOne; c.batch.one = 1; c.eng.threads = 2;
  });
  add("HotExpert_T300_k3_Skewed_threads3", [](Case& c) {
    c.E = 6; c.batch.T = 300; c.batch.k = 3; c.batch.pattern = Pattern::kHot; c.batch.one = 4;
    c.eng.threads = 3; c.lora.r[1] = 1; c.lora.r[2] = 16;
  });
  add("HotExpert_T193_Recompute_TransposedCopy", [](Case& c) {
    c.E = 2; c.batch.T = 193; c.batch.k = 1; c.batch.pattern = Pattern::kAllOne; c.batch.one = 0;
    c.eng.threads = 2; c.eng.opts.activations = ActivationPolicy::kRecompute;
    c.eng.opts.backward_weights = BackwardWeights::kTransposedCopy;
  });
  // Forced ISAs.
  add("IsaScalar_H33_I17_LoraAll", [](Case& c) {
    c.H = 33; c.I = 17; c.eng.isa = mk::Isa::kScalar;
  });
  add("IsaScalar_ExpertMask_Lora_bf16", [](Case& c) {
    c.E = 6; c.batch.T = 16; c.batch.masked = {2}; c.eng.isa = mk::Isa::kScalar;
    c.lora.a_dtype = c.lora.b_dtype = DType::kBf16;
  });
  add("IsaAvx2_H33_I17_LoraAll", [](Case& c) {
    c.H = 33; c.I = 17; c.eng.isa = mk::Isa::kAvx2;
  });
  add("IsaAvx2_MixedRanks_threads3_Recompute_TransposedCopy", [](Case& c) {
    c.E = 5; c.batch.T = 13; c.lora.r[0] = 16; c.lora.r[1] = 0; c.lora.r[2] = 1;
    c.eng.isa = mk::Isa::kAvx2; c.eng.threads = 3;
    c.eng.opts.activations = ActivationPolicy::kRecompute;
    c.eng.opts.backward_weights = BackwardWeights::kTransposedCopy;
  });
  add("IsaAvx2_H290_I260_Chunks", [](Case& c) {
    c.E = 3; c.H = 290; c.I = 260; c.batch.T = 20; c.eng.isa = mk::Isa::kAvx2;
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
                                         mk::Isa::kAvx2};
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
    c.eng.isa = isas[rng.below(4)];
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

LoraCfg all_lora(int r) {
  LoraCfg lc;
  lc.r[0] = lc.r[1] = lc.r[2] = r;
  return lc;
}

TEST(EngineReentrancy, ThreeForwardsThenBackwardsInOrder231) {
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

TEST(EngineReentrancy, BackwardTwiceOnSameSavedIsIdentical) {
  const Layer L = make_layer(4, 40, 24, all_lora(4), 511);
  BatchCfg bcfg;
  bcfg.T = 10;
  const Batch b = make_batch(L, bcfg, 512);
  const Batch other = make_batch(L, bcfg, 513);
  IoCfg io;
  EngineCfg ec;
  ec.threads = 2;
  auto m = make_experts(L, ec);
  Call c(L, b, io);
  auto saved = m->forward(c.fwd());
  m->backward(saved, c.bwd());
  const Outputs first = c.collect();
  expect_matches_reference("first backward", L, b, io, first, reference(L, b));
  // Something else in between, reusing the context's workspaces.
  run_engine(*m, L, other, io);
  c.poison_grads();
  m->backward(saved, c.bwd());
  expect_bitwise("second backward on the same Saved", c.collect(), first);
}

TEST(EngineReentrancy, AsyncForwardBackwardChainedWithoutWaiting) {
  const Layer L = make_layer(4, 33, 17, all_lora(4), 521);
  BatchCfg bc1, bc2;
  bc1.T = 9;
  bc2.T = 21;
  bc2.k = 3;
  const Batch b1 = make_batch(L, bc1, 522), b2 = make_batch(L, bc2, 523);
  IoCfg io;
  io.out = DType::kBf16;
  EngineCfg ec;
  ec.threads = 3;
  auto m = make_experts(L, ec);
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

TEST(EngineReentrancy, ConcurrentCallersOnOneEngine) {
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

TEST(EngineReentrancy, TwoContextsSideBySide) {
  // Two engines with different ISAs/threads in flight at once are independent.
  const Layer L = make_layer(4, 40, 24, all_lora(4), 531);
  BatchCfg bc;
  bc.T = 17;
  const Batch b = make_batch(L, bc, 532);
  IoCfg io;
  EngineCfg e1, e2;
  e1.threads = 2;
  e2.isa = mk::Isa::kScalar;
  auto m1 = make_experts(L, e1);
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

// ---------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------

// Expects fn() to throw std::invalid_argument whose what() contains every needle.
template <typename Fn>
void expect_invalid_argument(const std::string& what, Fn&& fn,
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
  for (int64_t v : {(int64_t(1) << 32) + 1, -(int64_t(1) << 32), std::numeric_limits<int64_t>::min()}) {
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
  EXPECT_EQ(r.row_of[6], -1);  // the masked slot
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

TEST(EngineErrors, ForwardAsyncRejectsBadIdsAndEngineStillWorks) {
  const Layer L = make_layer(4, 40, 24, all_lora(4), 541);
  BatchCfg bc;
  bc.T = 6;
  IoCfg io;
  EngineCfg ec;
  ec.threads = 2;
  auto m = make_experts(L, ec);
  for (DType idt : {DType::kI64, DType::kI32}) {
    for (int64_t badv : {int64_t(L.E), int64_t(-1)}) {
      Batch bad = make_batch(L, bc, 542);
      bad.ids[7] = badv;  // token 3, slot 1
      IoCfg bio = io;
      bio.ids = idt;
      Call c(L, bad, bio);
      std::shared_ptr<Saved> s;
      expect_invalid_argument(std::string("forward_async ") + dtype_name(idt) + " id " +
                                  std::to_string(badv),
                              [&] { m->forward_async(c.fwd(), &s); },
                              {"topk_ids", std::to_string(badv)});
      EXPECT_EQ(s, nullptr) << "no handle for a rejected forward";
      expect_invalid_argument("forward (sync) id " + std::to_string(badv),
                              [&] { m->forward(c.fwd()); }, {"topk_ids", std::to_string(badv)});
    }
  }
  // The same MoeExperts still works, sync and async.
  const Batch good = make_batch(L, bc, 543);
  expect_matches_reference("after error", L, good, io, run_engine(*m, L, good, io),
                           reference(L, good));
  Call c(L, good, io);
  std::shared_ptr<Saved> s;
  Job f = m->forward_async(c.fwd(), &s);
  m->backward_async(s, c.bwd()).wait();
  f.wait();
  expect_matches_reference("after error (async)", L, good, io, c.collect(), reference(L, good));
}

TEST(EngineErrors, BackwardWithDifferentLoraConfigThrows) {
  const Layer L = make_layer(4, 40, 24, all_lora(4), 551);
  LoraCfg gate_only;
  gate_only.r[1] = gate_only.r[2] = 0;
  const Layer Lg = make_layer(4, 40, 24, gate_only, 551);
  LoraCfg rank2 = all_lora(2);
  const Layer L2 = make_layer(4, 40, 24, rank2, 551);
  const Layer L0 = make_layer(4, 40, 24, all_lora(0), 551);
  BatchCfg bc;
  bc.T = 8;
  const Batch b = make_batch(L, bc, 552);
  IoCfg io;
  EngineCfg ec;
  auto m = make_experts(L, ec);
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
    expect_invalid_argument(std::string("backward with ") + mm.name,
                            [&] { m->backward(saved, a); }, {"LoRA"});
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
TEST(EngineErrors, BackwardWithDifferentScalingThrows) {
  const Layer L = make_layer(4, 40, 24, all_lora(4), 556);
  BatchCfg bc;
  const Batch b = make_batch(L, bc, 557);
  EngineCfg ec;
  auto m = make_experts(L, ec);
  Call c(L, b, IoCfg{});
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

TEST(ContextTest, FailingJobBetweenForwardAndBackwardDisturbsNeither) {
  // A job that throws, queued on the engine's own context between a forward
  // and its backward, fails alone: both engine jobs complete correctly.
  const Layer L = make_layer(4, 40, 24, all_lora(4), 561);
  BatchCfg bc;
  bc.T = 6;
  const Batch b = make_batch(L, bc, 562);
  IoCfg io;
  EngineCfg ec;
  ec.threads = 2;
  auto m = make_experts(L, ec);
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
  expect_matches_reference("around a failing job", L, b, io, c.collect(), reference(L, b));
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

TEST(ContextTest, PhaseProfileNamesEnginePhases) {
  const Layer L = make_layer(3, 40, 24, all_lora(4), 591);
  BatchCfg bc;
  const Batch b = make_batch(L, bc, 592);
  EngineCfg ec;
  ec.threads = 2;
  auto m = make_experts(L, ec);
  m->context().reset_phase_profile();
  run_engine(*m, L, b, IoCfg{});
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
  for (mk::Isa isa : {mk::Isa::kScalar, mk::Isa::kAvx2, mk::Isa::kAvx512Bf16, mk::Isa::kAmxBf16}) {
    ContextOptions o;
    o.isa = isa;
    if (mk::cpu_supports(isa) && isa != mk::Isa::kAmxBf16) {
      Context ctx(o);
      EXPECT_EQ(ctx.gemm().isa, isa);
    } else if (!mk::cpu_supports(isa)) {
      EXPECT_ANY_THROW(Context ctx(o)) << mk::isa_name(isa);
    }
  }
  ContextOptions bad;
  bad.num_threads = 0;
  EXPECT_THROW(Context ctx(bad), std::invalid_argument);
}

TEST(EngineEdge, ZeroTokens) {
  const Layer L = make_layer(3, 40, 24, all_lora(4), 571);
  BatchCfg bc;
  bc.T = 0;
  const Batch b = make_batch(L, bc, 572);
  IoCfg io;
  EngineCfg ec;
  ec.threads = 2;
  auto m = make_experts(L, ec);
  const Outputs o = run_engine(*m, L, b, io);
  for (int p = 0; p < 3; ++p) {
    for (float v : o.dA[p]) ASSERT_EQ(v, 0.0f) << "dA_" << kProjName[p];
    for (float v : o.dB[p]) ASSERT_EQ(v, 0.0f) << "dB_" << kProjName[p];
  }
  // And a normal call afterwards.
  BatchCfg bc2;
  const Batch b2 = make_batch(L, bc2, 573);
  expect_matches_reference("after T=0", L, b2, io, run_engine(*m, L, b2, io), reference(L, b2));
}

TEST(EngineEdge, LoadExpertOneByOneEqualsLoad) {
  const Layer L = make_layer(3, 33, 17, all_lora(4), 581);
  BatchCfg bc;
  bc.T = 9;
  const Batch b = make_batch(L, bc, 582);
  IoCfg io;
  EngineCfg ec;
  for (BackwardWeights bw : {BackwardWeights::kRepack, BackwardWeights::kTransposedCopy}) {
    ec.opts.backward_weights = bw;
    const Outputs whole = run_engine(L, b, io, ec);
    auto m = std::make_unique<MoeExperts>(make_context(ec), L.E, L.H, L.I, ec.opts);
    const size_t per = size_t(L.I) * L.H;
    for (int e = L.E - 1; e >= 0; --e)
      m->load_expert(e, L.W[0].data() + e * per, L.W[1].data() + e * per, L.W[2].data() + e * per,
                     DType::kF32);
    expect_bitwise("load_expert(f32) vs load(bf16)", run_engine(*m, L, b, io), whole);
  }
  auto m = make_experts(L, ec);
  EXPECT_THROW(m->load_expert(L.E, L.Wb[0].data(), L.Wb[1].data(), L.Wb[2].data(), DType::kBf16),
               std::invalid_argument);
  EXPECT_THROW(m->load_expert(-1, L.Wb[0].data(), L.Wb[1].data(), L.Wb[2].data(), DType::kBf16),
               std::invalid_argument);
}

}  // namespace
