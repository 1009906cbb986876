#include "engine/moe_experts.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace moetune {

using kernels::bf16;
using kernels::PackedB;

namespace {
// Per matrix kind: forward K, N and backward K, N.
struct Dims {
  int64_t K, N;
};
// Counts this object's queued jobs so the destructor can wait for them.
struct InFlightGuard {
  std::shared_ptr<MoeExperts::InFlight> f;
  explicit InFlightGuard(std::shared_ptr<MoeExperts::InFlight> p) : f(std::move(p)) {}
  ~InFlightGuard() {
    std::lock_guard<std::mutex> lock(f->mu);
    if (--f->count == 0) f->cv.notify_all();
  }
};
}  // namespace

size_t Saved::bytes() const {
  return x.bytes() + w.bytes() + zs_gate.bytes() + zs_up.bytes() + zs_down.bytes() + g.bytes() +
         u.bytes() + routing.slot_of.size() * 4 + routing.row_of.size() * 4;
}

MoeExperts::MoeExperts(std::shared_ptr<Context> ctx, int E, int H, int I, ExpertsOptions options)
    : ctx_(std::move(ctx)), E_(E), H_(H), I_(I), options_(options) {
  if (!ctx_) throw std::invalid_argument("moetune: MoeExperts needs a Context");
  if (E < 1 || H < 1 || I < 1) {
    throw std::invalid_argument("moetune: experts need E, H, I >= 1, got E=" + std::to_string(E) +
                                " H=" + std::to_string(H) + " I=" + std::to_string(I));
  }
  if (options_.activation != Activation::kSwiGLU &&
      options_.activation != Activation::kClampedSwiGLU) {
    throw std::invalid_argument("moetune: unknown activation " +
                                std::to_string(static_cast<int>(options_.activation)));
  }
  if (options_.activation == Activation::kClampedSwiGLU &&
      !(std::isfinite(options_.swiglu_alpha) && std::isfinite(options_.swiglu_limit) &&
        options_.swiglu_limit > 0.0f)) {
    throw std::invalid_argument("moetune: clamped SwiGLU needs a finite alpha and a finite limit > 0, got alpha=" +
                                std::to_string(options_.swiglu_alpha) +
                                " limit=" + std::to_string(options_.swiglu_limit));
  }
  spec_ = kernels::QuantSpec{options_.weight_format, options_.group_size};
  kernels::check_quant_spec(spec_);
  const bool quantized = spec_.format != kernels::WeightFormat::kBf16;
  const Dims f[3] = {{H, I}, {H, I}, {I, H}};
  for (int w = 0; w < 3; ++w) {
    if (quantized) {
      q_stride_[w] = kernels::quant_q_bytes(spec_, f[w].K, f[w].N);
      qscale_stride_[w] = kernels::quant_scale_count(spec_, f[w].K, f[w].N);
      q_[w].resize(static_cast<size_t>(q_stride_[w]) * E);
      qscale_[w].resize(static_cast<size_t>(qscale_stride_[w]) * E);
    } else {
      fwd_stride_[w] = kernels::packed_elems(f[w].K, f[w].N);
      fwd_[w].resize(static_cast<size_t>(fwd_stride_[w]) * E);
    }
    if (options_.backward_weights == BackwardWeights::kTransposedCopy) {
      bwd_stride_[w] = kernels::packed_elems(f[w].N, f[w].K);
      bwd_[w].resize(static_cast<size_t>(bwd_stride_[w]) * E);
    }
  }
}

std::shared_ptr<void> MoeExperts::track() {
  {
    std::lock_guard<std::mutex> lock(inflight_->mu);
    ++inflight_->count;
  }
  return std::make_shared<InFlightGuard>(inflight_);
}

MoeExperts::~MoeExperts() {
  std::unique_lock<std::mutex> lock(inflight_->mu);
  inflight_->cv.wait(lock, [&] { return inflight_->count == 0; });
}

size_t MoeExperts::packed_bytes() const {
  size_t b = 0;
  for (int w = 0; w < 3; ++w)
    b += fwd_[w].bytes() + bwd_[w].bytes() + bias_[w].bytes() + q_[w].bytes() + qscale_[w].bytes();
  return b;
}

std::vector<MoeExperts::PackedBuffer> MoeExperts::packed_buffers() {
  static const char* kName[3] = {"gate", "up", "down"};
  std::vector<PackedBuffer> out;
  auto add = [&](const std::string& n, void* d, size_t b) {
    if (b) out.push_back(PackedBuffer{n, d, b});
  };
  for (int w = 0; w < 3; ++w) {
    add(std::string(kName[w]) + ".bf16", fwd_[w].data(), fwd_[w].bytes());
    add(std::string(kName[w]) + ".q", q_[w].data(), q_[w].bytes());
    add(std::string(kName[w]) + ".scales", qscale_[w].data(), qscale_[w].bytes());
    add(std::string(kName[w]) + ".transposed_bf16", bwd_[w].data(), bwd_[w].bytes());
  }
  return out;
}

kernels::QuantB MoeExperts::quant(int which, int e) const {
  const int64_t K = which == 2 ? I_ : H_;
  const int64_t N = which == 2 ? H_ : I_;
  return kernels::QuantB{spec_, q_[which].data() + e * q_stride_[which],
                         qscale_[which].data() + e * qscale_stride_[which], K, N};
}

PackedB MoeExperts::fwd(int which, int e) const {
  const int64_t K = which == 2 ? I_ : H_;
  const int64_t N = which == 2 ? H_ : I_;
  return PackedB{fwd_[which].data() + e * fwd_stride_[which], K, N};
}

namespace {
// Columns per dequantized sub-slice: 2 panels (one AMX / AVX-512 register
// block wide); 32 x K bf16 is 128 KiB at K = 2048, 448 KiB at K = 7168.
constexpr int64_t kDequantCols = 32;
}  // namespace

std::vector<RowBlock> MoeExperts::work_blocks(const Routing& rt, bool backward) const {
  const bool prepares = spec_.format != kernels::WeightFormat::kBf16 ||
                        (backward && options_.backward_weights == BackwardWeights::kRepack);
  const int64_t group = options_.row_group > 0 ? options_.row_group : (prepares ? 4 * kRowBlock : 0);
  if (group == 0) return rt.blocks;
  std::vector<RowBlock> out;
  for (int e : rt.active) {
    const int64_t n = rt.count(e), nb = (n + group - 1) / group;
    for (int64_t b = 0; b < nb; ++b)
      out.push_back(RowBlock{e, rt.offsets[e] + n * b / nb, rt.offsets[e] + n * (b + 1) / nb});
  }
  std::stable_sort(out.begin(), out.end(), [](const RowBlock& a, const RowBlock& b) {
    return a.r1 - a.r0 > b.r1 - b.r0;
  });
  return out;
}

void MoeExperts::weight_gemm(int which, int e, int64_t n0, int64_t nc, const bf16* A, int64_t lda,
                             int64_t M, const kernels::Segment* extra, float* C, int64_t ldc,
                             Arena& a) const {
  const kernels::KernelBundle& k = ctx_->kernels();
  kernels::Segment seg[2];
  const int nseg = extra ? 2 : 1;
  if (spec_.format == kernels::WeightFormat::kBf16) {
    seg[0] = kernels::Segment{A, lda, kernels::packed_slice(fwd(which, e), n0, nc)};
    if (extra) seg[1] = *extra;
    k.gemm(M, 0, nc, seg, nseg, C, ldc, false);
    return;
  }
  const kernels::QuantB q = quant(which, e);
  bf16* panel = a.alloc<bf16>(kernels::packed_elems(q.K, std::min(nc, kDequantCols)));
  for (int64_t c0 = 0; c0 < nc; c0 += kDequantCols) {
    const int64_t w = std::min(kDequantCols, nc - c0);
    ctx_->kernels().dequant(q, n0 + c0, n0 + c0 + w, 0, q.K, panel);
    seg[0] = kernels::Segment{A, lda, PackedB{panel, q.K, w}};
    if (extra) seg[1] = kernels::Segment{extra->A, extra->lda, kernels::packed_slice(extra->B, c0, w)};
    k.gemm(M, 0, w, seg, nseg, C + c0, ldc, false);
  }
}

PackedB MoeExperts::bwd(int which, int e) const {
  const int64_t K = which == 2 ? H_ : I_;
  const int64_t N = which == 2 ? I_ : H_;
  return PackedB{bwd_[which].data() + e * bwd_stride_[which], K, N};
}

PackedB MoeExperts::bwd_slice(int which, int e, int64_t n0, int64_t n, Arena& a) const {
  if (options_.backward_weights == BackwardWeights::kTransposedCopy) {
    return kernels::packed_slice(bwd(which, e), n0, n);
  }
  const PackedB src = fwd(which, e);
  bf16* dst = a.alloc<bf16>(kernels::packed_elems(src.N, n));
  ctx_->kernels().transpose_packed(src, n0, n0 + n, dst);
  return PackedB{dst, src.N, n};
}

void MoeExperts::weight_t_gemm(const int* which, int nw, int e, int64_t n0, int64_t nc, kernels::Segment* segs,
                               int nseg, int64_t M, float* C, int64_t ldc, Arena& a) const {
  const kernels::KernelBundle& k = ctx_->kernels();
  if (spec_.format == kernels::WeightFormat::kBf16 ||
      options_.backward_weights == BackwardWeights::kTransposedCopy) {
    for (int j = 0; j < nw; ++j) segs[j].B = bwd_slice(which[j], e, n0, nc, a);
    k.gemm(M, 0, nc, segs, nseg, C, ldc, false);
    return;
  }
  const int64_t wmax = std::min(nc, kDequantCols);
  bf16* rows[kernels::kMaxSegments];
  bf16* tr[kernels::kMaxSegments];
  for (int j = 0; j < nw; ++j) {
    const int64_t N = quant(which[j], e).N;
    rows[j] = a.alloc<bf16>(kernels::packed_elems(wmax, N));
    tr[j] = a.alloc<bf16>(kernels::packed_elems(N, wmax));
  }
  kernels::Segment local[kernels::kMaxSegments];
  for (int64_t c0 = 0; c0 < nc; c0 += kDequantCols) {
    const int64_t w = std::min(kDequantCols, nc - c0);
    for (int j = 0; j < nw; ++j) {
      // W^T columns [n0+c0, +w) are W's K rows: dequantize them, transpose.
      const kernels::QuantB q = quant(which[j], e);
      ctx_->kernels().dequant(q, 0, q.N, n0 + c0, n0 + c0 + w, rows[j]);
      k.transpose_packed(PackedB{rows[j], w, q.N}, 0, w, tr[j]);
      local[j] = kernels::Segment{segs[j].A, segs[j].lda, PackedB{tr[j], q.N, w}};
    }
    for (int j = nw; j < nseg; ++j)
      local[j] = kernels::Segment{segs[j].A, segs[j].lda, kernels::packed_slice(segs[j].B, c0, w)};
    k.gemm(M, 0, w, local, nseg, C + c0, ldc, false);
  }
}

void MoeExperts::load_expert(int e, const void* gate, const void* up, const void* down,
                             DType dtype) {
  if (e < 0 || e >= E_) {
    throw std::invalid_argument("moetune: expert id " + std::to_string(e) + " outside [0, " +
                                std::to_string(E_) + ")");
  }
  if (dtype != DType::kBf16 && dtype != DType::kF32) {
    throw std::invalid_argument(std::string("moetune: expert weights must be bfloat16 or float32, got ") +
                                dtype_name(dtype));
  }
  const kernels::SrcType st = src_type(dtype);
  const void* src[3] = {gate, up, down};
  // HF layout is [out, in] = [N, K] for the forward product x W^T.
  if (spec_.format != kernels::WeightFormat::kBf16) {
    static const char* kName[3] = {"gate_proj", "up_proj", "down_proj"};
    for (int w = 0; w < 3; ++w) {
      const kernels::QuantB q = quant(w, e);
      kernels::quantize_pack(src[w], st, q.K, q.K, q.N, spec_,
                             q_[w].data() + e * q_stride_[w], qscale_[w].data() + e * qscale_stride_[w],
                             std::string(kName[w]) + " of expert " + std::to_string(e));
      if (options_.backward_weights == BackwardWeights::kTransposedCopy) {
        // bf16 dq(q(W))^T: the same values the repack path would make.
        Buf<bf16> tmp(static_cast<size_t>(kernels::packed_elems(q.K, q.N)));
        ctx_->kernels().dequant(q, 0, q.N, 0, q.K, tmp.data());
        ctx_->kernels().transpose_packed(PackedB{tmp.data(), q.K, q.N}, 0, q.K,
                                      bwd_[w].data() + e * bwd_stride_[w]);
      }
    }
    return;
  }
  for (int w = 0; w < 3; ++w) {
    const PackedB f = fwd(w, e);
    kernels::pack_b(src[w], st, f.K, /*kn=*/false, f.K, 0, f.N, 1.0f,
                    fwd_[w].data() + e * fwd_stride_[w]);
    if (options_.backward_weights == BackwardWeights::kTransposedCopy) {
      const PackedB b = bwd(w, e);
      // Backward multiplies by W itself: [out, in] read as [K = out, N = in].
      kernels::pack_b(src[w], st, b.N, /*kn=*/true, b.K, 0, b.N, 1.0f,
                      bwd_[w].data() + e * bwd_stride_[w]);
    }
  }
}

void MoeExperts::load(const void* gate, const void* up, const void* down, DType dtype) {
  const size_t esz = dtype == DType::kBf16 ? 2 : 4;
  const size_t per = static_cast<size_t>(I_) * H_ * esz;
  ctx_->run([&] {
    ctx_->parallel_for("load", E_, [&](int64_t e, Arena&) {
      load_expert(static_cast<int>(e), static_cast<const char*>(gate) + e * per,
                  static_cast<const char*>(up) + e * per, static_cast<const char*>(down) + e * per,
                  dtype);
    });
  });
}

void MoeExperts::load_biases(const void* gate, const void* up, const void* down, DType dtype) {
  if (dtype != DType::kBf16 && dtype != DType::kF32) {
    throw std::invalid_argument(std::string("moetune: expert biases must be bfloat16 or float32, got ") +
                                dtype_name(dtype));
  }
  const void* src[3] = {gate, up, down};
  for (int w = 0; w < 3; ++w) {
    if (!src[w]) {
      bias_[w].clear();
      continue;
    }
    const size_t n = static_cast<size_t>(E_) * (w == 2 ? H_ : I_);
    bias_[w].resize(n);
    float* dst = bias_[w].data();
    if (dtype == DType::kF32) {
      std::memcpy(dst, src[w], n * sizeof(float));
    } else {
      const bf16* b = static_cast<const bf16*>(src[w]);
      for (size_t i = 0; i < n; ++i) dst[i] = kernels::bf16_to_f32(b[i]);
    }
  }
}

void MoeExperts::activate(const bf16* g, const bf16* u, bf16* h, int64_t n) const {
  const kernels::EltwiseKernel& ew = ctx_->kernels().eltwise;
  if (options_.activation == Activation::kClampedSwiGLU) {
    ew.clamped_swiglu(g, u, options_.swiglu_alpha, options_.swiglu_limit, h, n);
  } else {
    ew.swiglu(g, u, h, n);
  }
}

float MoeExperts::activate_bwd(const bf16* g, const bf16* u, const float* d, float w, bf16* h,
                               bf16* dg, bf16* du, int64_t n) const {
  const kernels::EltwiseKernel& ew = ctx_->kernels().eltwise;
  if (options_.activation == Activation::kClampedSwiGLU) {
    return ew.clamped_swiglu_bwd(g, u, d, w, options_.swiglu_alpha, options_.swiglu_limit, h, dg,
                                 du, n);
  }
  return ew.swiglu_bwd(g, u, d, w, h, dg, du, n);
}

Job MoeExperts::forward_async(const ForwardArgs& args, std::shared_ptr<Saved>* saved) {
  auto s = std::make_shared<Saved>();
  // Validation happens here, on the caller's thread, before anything is queued.
  s->routing = build_routing(args.topk_ids, args.ids_dtype, args.T, args.k, E_, args.expert_mask);
  s->T = args.T;
  s->k = args.k;
  s->lora_shape = args.lora;
  if (saved) *saved = s;
  ForwardArgs a = args;
  return ctx_->submit([this, a, s, guard = track()] {
    run_forward(a, *s);
    s->complete = true;
  });
}

std::shared_ptr<Saved> MoeExperts::forward(const ForwardArgs& args) {
  std::shared_ptr<Saved> s;
  forward_async(args, &s).wait();
  return s;
}

namespace {
void check_same_lora(const LoraProj& f, const LoraProj& b, const char* name) {
  if (f.enabled() != b.enabled() || (f.enabled() && f.r != b.r)) {
    throw std::invalid_argument(std::string("moetune: backward LoRA '") + name +
                                "' differs from the forward's (enabled/rank)");
  }
}

}  // namespace

Job MoeExperts::backward_async(std::shared_ptr<Saved> saved, const BackwardArgs& args) {
  if (!saved) throw std::invalid_argument("moetune: backward needs the handle returned by forward");
  check_same_lora(saved->lora_shape.gate, args.lora.gate, "gate");
  check_same_lora(saved->lora_shape.up, args.lora.up, "up");
  check_same_lora(saved->lora_shape.down, args.lora.down, "down");
  if (saved->lora_shape.any() && saved->lora_shape.scaling != args.lora.scaling) {
    throw std::invalid_argument("moetune: backward LoRA scaling " + std::to_string(args.lora.scaling) +
                                " differs from the forward's " +
                                std::to_string(saved->lora_shape.scaling));
  }
  BackwardArgs a = args;
  return ctx_->submit([this, a, saved, guard = track()] {
    // Jobs run in submission order, so the forward has run; if it failed its
    // error was reported at its own wait and this handle is unusable.
    if (!saved->complete) throw std::runtime_error("moetune: backward on a forward that did not complete");
    run_backward(a, *saved);
  });
}

void MoeExperts::backward(std::shared_ptr<Saved> saved, const BackwardArgs& args) {
  backward_async(std::move(saved), args).wait();
}

}  // namespace moetune
