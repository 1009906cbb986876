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
// retained graph may run backward twice.
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
  LoraSet lora_shape;           // enabled flags, ranks and scaling of the forward
  Buf<kernels::bf16> x;         // [T, ldh] bf16 copy of the input
  Buf<float> w;                 // [T*k] routing weights, fp32
  Buf<kernels::bf16> zs_gate;   // [rows, ldr] bf16(s * Ag x) (LoRA only)
  Buf<kernels::bf16> zs_up;
  Buf<kernels::bf16> zs_down;   // [rows, ldr] bf16(s * Ad h)
  Buf<kernels::bf16> g, u;      // [rows, ldi] bf16 pre-activations (ActivationPolicy::kSave)
  bool complete = false;        // set when the forward job finished
  size_t bytes() const;
};

class MoeExperts {
 public:
  MoeExperts(std::shared_ptr<Context> ctx, int E, int H, int I, ExpertsOptions options);
  ~MoeExperts();  // waits for this object's queued jobs
  MoeExperts(const MoeExperts&) = delete;
  MoeExperts& operator=(const MoeExperts&) = delete;

  struct InFlight {
    std::mutex mu;
    std::condition_variable cv;
    int64_t count = 0;
  };

  int E() const { return E_; }
  int H() const { return H_; }
  int I() const { return I_; }
  const ExpertsOptions& options() const { return options_; }
  Context& context() { return *ctx_; }
  size_t packed_bytes() const;
  const kernels::QuantSpec& quant_spec() const { return spec_; }

  // Every non-empty packed weight buffer (for a disk cache to export or
  // import them byte for byte): a stable name, its memory and size. The
  // layout is fixed by kernels::kPackedLayoutVersion, E/H/I and the options;
  // writing them while jobs run is the caller's error.
  struct PackedBuffer {
    std::string name;
    void* data;
    size_t bytes;
  };
  std::vector<PackedBuffer> packed_buffers();

  // Packs expert e from HF-layout rows: gate/up [I, H], down [H, I] (bf16
  // bit-exact, or f32 rounded to bf16). Distinct e may be loaded concurrently.
  void load_expert(int e, const void* gate, const void* up, const void* down, DType dtype);
  // All experts at once from [E, I, H], [E, I, H], [E, H, I], in the pool.
  void load(const void* gate, const void* up, const void* down, DType dtype);
  // Optional frozen biases of all experts: gate, up [E, I], down [E, H], bf16
  // or f32 (kept as fp32); nullptr = that bias absent (replaces an earlier one).
  void load_biases(const void* gate, const void* up, const void* down, DType dtype);
  bool has_bias(int which) const { return bias_[which].size() != 0; }  // 0 gate, 1 up, 2 down

  // Validates topk ids now (throws std::invalid_argument), then queues the
  // forward; `out` must stay alive until the job is waited on.
  Job forward_async(const ForwardArgs& args, std::shared_ptr<Saved>* saved);
  std::shared_ptr<Saved> forward(const ForwardArgs& args);
  Job backward_async(std::shared_ptr<Saved> saved, const BackwardArgs& args);
  void backward(std::shared_ptr<Saved> saved, const BackwardArgs& args);

 private:
  kernels::PackedB fwd(int which, int e) const;   // 0 gate [K=H,N=I], 1 up, 2 down [K=I,N=H]
  kernels::QuantB quant(int which, int e) const;  // the same operands, quantized formats
  // C[M, 0:nc] = A * W(which, e)[:, n0:n0+nc] (+ `extra`, a segment whose B
  // covers the same nc columns, e.g. a LoRA expand), overwriting C. Quantized
  // formats dequantize and multiply kDequantCols columns at a time, so the
  // bf16 panel stays L2-resident; every column's sum is the same single
  // kernel pass as the bf16 path (bit-identical results).
  void weight_gemm(int which, int e, int64_t n0, int64_t nc, const kernels::bf16* A, int64_t lda,
                   int64_t M, const kernels::Segment* extra, float* C, int64_t ldc, Arena& a) const;
  kernels::PackedB bwd(int which, int e) const;   // transposed copies (kTransposedCopy only)
  // Packs W^T columns [n0, n0+n) for backward: from the second copy or by repacking.
  kernels::PackedB bwd_slice(int which, int e, int64_t n0, int64_t n, Arena& a) const;
  // C[M, 0:nc] = sum_j segs[j].A * W(which[j], e)^T[:, n0:n0+nc] for j < nw,
  // plus segs[nw..nseg) whose B cover the same nc columns; overwrites C.
  // segs[j].B for j < nw is set here. Quantized formats with kRepack work
  // kDequantCols columns at a time (dequantize those K rows, transpose), so
  // the bf16 panels stay L2-sized; results are bit-identical to one call.
  void weight_t_gemm(const int* which, int nw, int e, int64_t n0, int64_t nc, kernels::Segment* segs,
                     int nseg, int64_t M, float* C, int64_t ldc, Arena& a) const;
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

  // Bias row of expert e for projection `which`, or nullptr when absent.
  const float* bias(int which, int e) const {
    return has_bias(which) ? bias_[which].data() + int64_t(e) * (which == 2 ? H_ : I_) : nullptr;
  }
  // The configured activation on n elements (forward) / its backward.
  void activate(const kernels::bf16* g, const kernels::bf16* u, kernels::bf16* h, int64_t n) const;
  float activate_bwd(const kernels::bf16* g, const kernels::bf16* u, const float* d, float w,
                     kernels::bf16* h, kernels::bf16* dg, kernels::bf16* du, int64_t n) const;

  std::shared_ptr<void> track();  // held by each queued job

  std::shared_ptr<Context> ctx_;
  std::shared_ptr<InFlight> inflight_ = std::make_shared<InFlight>();
  int E_, H_, I_;
  ExpertsOptions options_;
  kernels::QuantSpec spec_;
  Buf<uint8_t> q_[3];       // quantized formats: packed q values per matrix kind
  Buf<float> qscale_[3];    // and their scales (kernels/quant.h layout)
  int64_t q_stride_[3] = {0, 0, 0};
  int64_t qscale_stride_[3] = {0, 0, 0};
  Buf<kernels::bf16> fwd_[3];
  Buf<kernels::bf16> bwd_[3];
  Buf<float> bias_[3];  // [E, I], [E, I], [E, H] fp32; empty = absent
  int64_t fwd_stride_[3] = {0, 0, 0};
  int64_t bwd_stride_[3] = {0, 0, 0};
};

}  // namespace moetune
