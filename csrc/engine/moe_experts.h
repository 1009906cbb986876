// moetune engine: one MoE layer's routed experts — frozen base weights packed
// once at load, a fused LoRA-aware forward and an exact backward.
//
// Forward, per token t and slot j with expert e = topk_ids[t, j]:
//   g = Wg x + s Bg (Ag x) [+ bg],  u = Wu x + s Bu (Au x) [+ bu],  h = act(g, u)
//   y = Wd h + s Bd (Ad h) [+ bd],  out[t] = sum_j topk_weights[t, j] * y   (fp32)
// act (ExpertsOptions::activation):
//   kSwiGLU         h = silu(g) * u
//   kClampedSwiGLU  (gpt-oss) gc = min(g, limit), uc = clamp(u, -limit, limit),
//                   h = (uc + 1) * gc * sigmoid(alpha * gc); its backward uses
//                   torch.clamp's subgradient (passes at the bounds, 0 outside).
// The biases bg, bu [E, I] and bd [E, H] are optional frozen base weights
// (load_biases; each present or not): with none loaded no bias work is done.
// Backward gives dx, d topk_weights (= <dout, y>, computed without keeping y:
// <Wd^T dout + s Ad^T(Bd^T dout), h> + <dout, bd>) and the six LoRA weight
// gradients (biases, like W, get none).
//
// Numerics: every GEMM operand is bf16 (x, W, LoRA A/B, h, s*(A x), the
// gradients fed back), every accumulation fp32; biases are added in fp32 (g, u
// before their bf16 rounding; y before the weighted sum). g and u are rounded
// to bf16 before the activation in both forward and backward, so the saved and the
// recomputed activation policies give bit-identical results, and results do
// not depend on the thread count (each output element has one owner task
// that sums in a fixed order).
//
// Re-entrancy: forward returns a Saved handle holding everything backward
// needs; handles are independent (no shared stack), so any number of layers,
// micro-batches and checkpoint recomputes can be in flight in any order.
// Dropping a handle frees its memory; backward does not consume it, so a
// retained graph may run backward twice. A handle belongs to the object whose
// forward made it: backward with another object's handle throws
// std::invalid_argument (its routing and buffers have that object's shapes).
//
// Lifetimes: the object, its Context, its Jobs and its Saved handles may be
// dropped in any order (a queued job holds what it reads; a finished job holds
// nothing). Forward refuses experts never loaded (load / load_expert /
// WeightStore::mark_all_loaded): their buffers are uninitialised.
//
// Weight formats (ExpertsOptions::weight_format): bf16 packs the weights as
// they are; int8 / int4 quantize them in load_expert (kernels/quant.h) and
// every GEMM task dequantizes the panel slice it needs into its arena, so the
// GEMMs see exactly dq(q(W)) in bf16, forward and backward alike. Backward
// weights for quantized formats: kRepack dequantizes the K-rows it needs and
// transposes them; kTransposedCopy keeps, next to the quantized weights, a
// bf16 packed copy of dq(q(W))^T made at load (the same values, so the same
// gradients: it buys backward speed with 2 bytes per weight).
//
// Structure: MoeExperts validates calls, queues jobs and owns the Saved
// handles; its WeightStore (weight_store.h) holds the packed weights, biases
// and the weight GEMMs. The passes are in moe_forward.cc / moe_backward.cc,
// one function per phase.
//
// NUMA partitions (ContextOptions::partitions, engine/partitions.h): expert e
// belongs to partition expert_partition(e, E, P) (balanced contiguous ranges).
// The constructor places its share of every weight buffer in that node's
// memory by first touch from a worker of the partition (no libnuma, no
// mbind: the pages are fresh from mmap for the sizes that matter; a small
// buffer that malloc recycles from its heap stays where it already was).
// Every per-expert task (load, LoRA reduces, the GEMM phases of forward,
// backward and the recompute) runs only on that partition's workers, so weights
// are read from local memory; per-token loops (gathers, combines) use every
// worker. Results are bit-identical for any partition count (the same tasks,
// each output element summed by one task in a fixed order).
//
// Thread-safety: forward/backward may be called from any thread; the work is
// queued on the Context and executed one job at a time. Loading weights while
// jobs that use them are queued is the caller's error. Destroying the object
// waits for its queued jobs. LoRA gradient pointers of disabled projections
// are ignored.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/buffer.h"
#include "engine/context.h"
#include "engine/moe_types.h"
#include "engine/routing.h"
#include "engine/weight_store.h"

namespace moetune {

// What backward needs from forward. Opaque to callers except for its size.
// enable_shared_from_this: a handle that went through Python comes back as
// the original shared_ptr (nanobind uses it), not one whose deleter needs the
// Python GIL — a queued job may drop the last reference on the dispatcher
// thread while the GIL holder waits for that thread.
struct Saved : std::enable_shared_from_this<Saved> {
  Routing routing;
  int64_t T = 0;
  int k = 0;
  LoraSet lora_shape;          // enabled flags, ranks and scaling of the forward
  Buf<kernels::bf16> x;        // [T, ldh] bf16 copy of the input
  Buf<float> w;                // [T*k] routing weights, fp32
  Buf<kernels::bf16> zs_gate;  // [rows, ldr] bf16(s * Ag x) (LoRA only)
  Buf<kernels::bf16> zs_up;
  Buf<kernels::bf16> zs_down;  // [rows, ldr] bf16(s * Ad h)
  Buf<kernels::bf16> g, u;     // [rows, ldi] bf16 pre-activations (ActivationPolicy::kSave)
  bool complete = false;       // set when the forward job finished
  std::weak_ptr<void> owner;   // the MoeExperts whose forward made it (its in-flight block)
  size_t bytes() const;
};

class MoeExperts {
 public:
  // Validates E, H, I >= 1 and the options (std::invalid_argument), then
  // allocates the weights: exactly host_bytes(E, H, I, options) bytes.
  MoeExperts(std::shared_ptr<Context> ctx, int E, int H, int I, ExpertsOptions options);
  // Waits for this object's queued jobs (they hold no reference to anything
  // that needs the caller, e.g. Python's GIL); in a forked child, does not.
  ~MoeExperts();
  MoeExperts(const MoeExperts&) = delete;
  MoeExperts& operator=(const MoeExperts&) = delete;

  // Host bytes of the packed / quantized weights for these shapes and
  // options, without allocating (the size a loader plans for). Biases are
  // not included: WeightStore::bias_bytes_for.
  static size_t host_bytes(int E, int H, int I, const ExpertsOptions& options) {
    return WeightStore::bytes_for(E, H, I, options);
  }

  struct InFlight {
    std::mutex mu;
    std::condition_variable cv;
    int64_t count = 0;
  };

  int E() const { return store_.E(); }
  int H() const { return store_.H(); }
  int I() const { return store_.I(); }
  const ExpertsOptions& options() const { return options_; }
  Context& context() { return *ctx_; }
  const WeightStore& weights() const { return store_; }
  WeightStore& weights() { return store_; }
  // Weight buffers + the biases loaded (= host_bytes(...) + bias bytes).
  size_t packed_bytes() const { return store_.weight_bytes() + store_.bias_bytes(); }

  // Packs expert e from HF-layout rows: gate/up [I, H], down [H, I] (bf16
  // bit-exact, or f32 rounded to bf16). Distinct e may be loaded concurrently.
  void load_expert(int e, const void* gate, const void* up, const void* down, DType dtype) {
    store_.load_expert(e, gate, up, down, dtype);
  }
  // All experts at once from [E, I, H], [E, I, H], [E, H, I], in the pool.
  void load(const void* gate, const void* up, const void* down, DType dtype);
  // Optional frozen biases of all experts: gate, up [E, I], down [E, H], bf16
  // or f32 (kept as fp32); nullptr = that bias absent (replaces an earlier one).
  void load_biases(const void* gate, const void* up, const void* down, DType dtype) {
    store_.load_biases(gate, up, down, dtype);
  }
  bool has_bias(Proj p) const { return store_.has_bias(p); }

  // Validates topk ids now (throws std::invalid_argument), then queues the
  // forward; `out` must stay alive until the job is waited on.
  Job forward_async(const ForwardArgs& args, std::shared_ptr<Saved>* saved);
  std::shared_ptr<Saved> forward(const ForwardArgs& args);
  Job backward_async(std::shared_ptr<Saved> saved, const BackwardArgs& args);
  void backward(std::shared_ptr<Saved> saved, const BackwardArgs& args);

 private:
  friend class ForwardPass;   // moe_forward.cc
  friend class BackwardPass;  // moe_backward.cc

  // The row blocks of the GEMM phases of forward or backward (see
  // ExpertsOptions::row_group): equal-sized blocks of one expert's rows,
  // largest first (same results for any blocking: every output row is
  // computed independently of the others).
  std::vector<RowBlock> work_blocks(const Routing& rt, bool backward) const;
  void run_forward(const ForwardArgs& args, Saved& s);
  void run_backward(const BackwardArgs& args, Saved& s);
  // g, u (bf16) for expert-major rows [off, off + n) of expert e, columns [i0, i1).
  void gate_up_chunk(const LoraSet& lora, int e, int64_t off, const kernels::bf16* xe, int64_t n,
                     const Saved& s, int64_t i0, int64_t i1, Arena& a, kernels::bf16* gb,
                     kernels::bf16* ub, int64_t ld) const;

  // The configured activation on n elements (forward) / its backward.
  void activate(const kernels::bf16* g, const kernels::bf16* u, kernels::bf16* h, int64_t n) const;
  float activate_bwd(const kernels::bf16* g, const kernels::bf16* u, const float* d, float w,
                     kernels::bf16* h, kernels::bf16* dg, kernels::bf16* du, int64_t n) const;

  std::shared_ptr<void> track();  // held by each queued job
  // [P + 1] first expert of each NUMA partition (engine/partitions.h), as task offsets.
  std::vector<int64_t> expert_tasks() const;
  // With NUMA partitions: first-touches each expert's weight pages from its partition.
  void place_on_partitions();

  std::shared_ptr<Context> ctx_;
  std::shared_ptr<InFlight> inflight_ = std::make_shared<InFlight>();
  ExpertsOptions options_;
  WeightStore store_;
};

}  // namespace moetune
