#include "engine/moe_experts.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "engine/partitions.h"

namespace moetune {

using kernels::bf16;

namespace {
// Counts this object's queued jobs so the destructor can wait for them.
struct InFlightGuard {
  std::shared_ptr<MoeExperts::InFlight> f;
  explicit InFlightGuard(std::shared_ptr<MoeExperts::InFlight> p) : f(std::move(p)) {}
  ~InFlightGuard() {
    std::lock_guard<std::mutex> lock(f->mu);
    if (--f->count == 0) f->cv.notify_all();
  }
};

std::shared_ptr<Context> non_null(std::shared_ptr<Context> ctx) {
  if (!ctx) throw std::invalid_argument("moetune: MoeExperts needs a Context");
  return ctx;
}

void check_same_lora(const LoraProj& f, const LoraProj& b, Proj p) {
  if (f.enabled() != b.enabled() || (f.enabled() && f.r != b.r)) {
    throw std::invalid_argument(std::string("moetune: backward LoRA '") + proj_name(p) +
                                "' differs from the forward's (enabled/rank)");
  }
}
}  // namespace

size_t Saved::bytes() const {
  return x.bytes() + w.bytes() + zs_gate.bytes() + zs_up.bytes() + zs_down.bytes() + g.bytes() +
         u.bytes() + routing.slot_of.size() * 4 + routing.row_of.size() * 4;
}

MoeExperts::MoeExperts(std::shared_ptr<Context> ctx, int E, int H, int I, ExpertsOptions options)
    : ctx_(non_null(std::move(ctx))),
      options_(options),
      store_(E, H, I, options_, ctx_->kernels()) {
  if (ctx_->num_partitions() > 1) place_on_partitions();
}

std::vector<int64_t> MoeExperts::expert_tasks() const {
  const std::vector<int> b = partition_experts(E(), ctx_->num_partitions());
  return std::vector<int64_t>(b.begin(), b.end());
}

void MoeExperts::place_on_partitions() {
  // First touch: a page is allocated on the node of the CPU that first writes
  // it (Linux's default policy), so a worker of expert e's partition writes
  // one byte into every page that starts inside e's share of each buffer.
  // Buffers start on whole pages (kBufferAlign), so every page start belongs
  // to exactly one expert: no two tasks write the same byte. The bytes are
  // uninitialised until load anyway.
  const std::vector<WeightStore::Buffer> bufs = store_.buffers();
  constexpr size_t kPage = WeightStore::kBufferAlign;
  ctx_->run([&] {
    ctx_->parallel_for_partitioned("place", expert_tasks(), [&](int64_t e, Arena&) {
      for (const WeightStore::Buffer& b : bufs) {
        volatile char* base = static_cast<char*>(b.data);
        const size_t lo = size_t(e) * b.per_expert_bytes, hi = lo + b.per_expert_bytes;
        for (size_t off = (lo + kPage - 1) / kPage * kPage; off < hi; off += kPage) base[off] = 0;
      }
    });
  });
}

std::shared_ptr<void> MoeExperts::track() {
  {
    std::lock_guard<std::mutex> lock(inflight_->mu);
    ++inflight_->count;
  }
  return std::make_shared<InFlightGuard>(inflight_);
}

MoeExperts::~MoeExperts() {
  if (ctx_->forked()) return;  // its jobs never run here (and mu may be held)
  std::unique_lock<std::mutex> lock(inflight_->mu);
  inflight_->cv.wait(lock, [&] { return inflight_->count == 0; });
}

std::vector<RowBlock> MoeExperts::work_blocks(const Routing& rt, bool backward) const {
  const int64_t group = options_.row_group > 0
                            ? options_.row_group
                            : (store_.prepares_slices(backward) ? 4 * kRowBlock : 0);
  if (group == 0) return rt.blocks;
  std::vector<RowBlock> out;
  for (int e : rt.active) {
    const int64_t n = rt.count(e), nb = (n + group - 1) / group;
    for (int64_t b = 0; b < nb; ++b)
      out.push_back(RowBlock{e, rt.offsets[e] + n * b / nb, rt.offsets[e] + n * (b + 1) / nb});
  }
  std::stable_sort(out.begin(), out.end(),
                   [](const RowBlock& a, const RowBlock& b) { return a.r1 - a.r0 > b.r1 - b.r0; });
  return out;
}

void MoeExperts::load(const void* gate, const void* up, const void* down, DType dtype) {
  const size_t esz = dtype == DType::kBf16 ? 2 : 4;
  const size_t per = static_cast<size_t>(I()) * H() * esz;
  ctx_->run([&] {
    ctx_->parallel_for_partitioned("load", expert_tasks(), [&](int64_t e, Arena&) {
      store_.load_expert(static_cast<int>(e), static_cast<const char*>(gate) + e * per,
                         static_cast<const char*>(up) + e * per,
                         static_cast<const char*>(down) + e * per, dtype);
    });
  });
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
  s->routing = build_routing(args.topk_ids, args.ids_dtype, args.T, args.k, E(), args.expert_mask);
  for (int e : s->routing.active) {
    if (!store_.loaded(e)) {
      throw std::invalid_argument("moetune: expert " + std::to_string(e) +
                                  " is routed to but was never loaded (load / load_expert it "
                                  "first: its weights are uninitialised memory)");
    }
  }
  s->owner = inflight_;
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

Job MoeExperts::backward_async(std::shared_ptr<Saved> saved, const BackwardArgs& args) {
  if (!saved) throw std::invalid_argument("moetune: backward needs the handle returned by forward");
  // Same control block, even if that object is gone (its block is kept by the weak_ptr).
  if (saved->owner.owner_before(inflight_) || inflight_.owner_before(saved->owner)) {
    throw std::invalid_argument(
        "moetune: backward got a saved-activation handle made by another experts object's "
        "forward (a handle belongs to the object that made it)");
  }
  for (Proj p : kAllProjs) check_same_lora(saved->lora_shape[p], args.lora[p], p);
  if (saved->lora_shape.any() && saved->lora_shape.scaling != args.lora.scaling) {
    throw std::invalid_argument("moetune: backward LoRA scaling " +
                                std::to_string(args.lora.scaling) + " differs from the forward's " +
                                std::to_string(saved->lora_shape.scaling));
  }
  BackwardArgs a = args;
  return ctx_->submit([this, a, saved, guard = track()] {
    // Jobs run in submission order, so the forward has run; if it failed its
    // error was reported at its own wait and this handle is unusable.
    if (!saved->complete)
      throw std::runtime_error("moetune: backward on a forward that did not complete");
    run_backward(a, *saved);
  });
}

void MoeExperts::backward(std::shared_ptr<Saved> saved, const BackwardArgs& args) {
  backward_async(std::move(saved), args).wait();
}

}  // namespace moetune
