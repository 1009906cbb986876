// The forward pass of MoeExperts: see moe_experts.h for the math. Phases
// (each a parallel loop; a phase starts when the previous one is done), one
// ForwardPass method each:
//   1. save_inputs: x as bf16, topk_weights as fp32 (kept in Saved);
//      gather_x: x rows into expert-major order (bf16)
//   2. lora_reduce_gate_up: per expert, z = s * A x for gate and up
//   3. gate_up: per (expert, I chunk), g, u = W x + z B^T (one fused
//      two-segment GEMM each) [+ bias], rounded to bf16, h = act(g, u)
//   4. lora_reduce_down: per expert, z_d = s * Ad h
//   5. down: per (expert, H chunk), y = Wd h + z_d Bd^T [+ bd], fp32, expert-major
//   6. combine: per token block, out[t] = sum_j w[t, j] y[t, j], in slot order
#include <algorithm>
#include <cstring>

#include "engine/expert_work.h"
#include "engine/moe_common.h"
#include "engine/moe_experts.h"
#include "engine/moe_layout.h"

namespace moetune {

using kernels::bf16;
using kernels::bf16_to_f32;
using kernels::PackedB;
using kernels::Segment;

using common::esize;
using common::kTokenBlock;

namespace {

// z = bf16(s * (X_e A_e^T)) for rows of expert e -> zs rows (stride ldr).
void lora_reduce(const kernels::KernelBundle& k, const kernels::EltwiseKernel& ew,
                 const LoraProj& p, float s, int e, int64_t in, const bf16* xe, int64_t ldx,
                 int64_t n, Arena& a, bf16* zs, int64_t ldr) {
  common::reduce_to_rank(k, ew, static_cast<const char*>(p.A) + e * p.r * in * esize(p.a_dtype),
                         p.a_dtype, /*kn=*/false, in, p.r, xe, ldx, n, s, a, zs, ldr);
}

// Packs rows [n0, n0 + n) of LoRA B_e ([out, r] = [N, K]) for the expand.
PackedB lora_expand_b(const LoraProj& p, int e, int64_t out, int64_t n0, int64_t n, Arena& a) {
  const int64_t r = p.r;
  const size_t esz = esize(p.b_dtype);
  bf16* pb = a.alloc<bf16>(kernels::packed_elems(r, n));
  kernels::pack_b(static_cast<const char*>(p.B) + e * out * r * esz, src_type(p.b_dtype), r, false,
                  r, n0, n0 + n, 1.0f, pb);
  return PackedB{pb, r, n};
}

Buf<bf16>& saved_z(Saved& s, Proj p) {
  return p == Proj::kGate ? s.zs_gate : p == Proj::kUp ? s.zs_up : s.zs_down;
}

}  // namespace

void MoeExperts::gate_up_chunk(const LoraSet& lora, int e, int64_t off, const bf16* xe, int64_t n,
                               const Saved& s, int64_t i0, int64_t i1, Arena& a, bf16* gb, bf16* ub,
                               int64_t ld) const {
  const int64_t nc = i1 - i0;
  const int64_t ldh = layout::ld_bf16(H());
  float* c = a.alloc<float>(n * nc);
  for (Proj p : {Proj::kGate, Proj::kUp}) {
    const LoraProj& lp = lora[p];
    const Buf<bf16>& zs = p == Proj::kGate ? s.zs_gate : s.zs_up;
    Segment lora_seg;
    if (lp.enabled()) {
      const int64_t ldr = layout::ld_bf16(lp.r);
      lora_seg = Segment{zs.data() + off * ldr, ldr, lora_expand_b(lp, e, I(), i0, nc, a)};
    }
    store_.weight_gemm(p, e, i0, nc, xe, ldh, n, lp.enabled() ? &lora_seg : nullptr, c, nc, a);
    if (const float* b = store_.bias(p, e)) {
      for (int64_t m = 0; m < n; ++m)
        for (int64_t i = 0; i < nc; ++i) c[m * nc + i] += b[i0 + i];
    }
    bf16* dst = p == Proj::kGate ? gb : ub;
    for (int64_t m = 0; m < n; ++m)
      ctx_->kernels().eltwise.to_bf16(c + m * nc, 1.0f, dst + m * ld, nc);
  }
}

// One forward call's state: the inputs, the routing, and the expert-major
// buffers the phases hand to each other (workspace slots or Saved).
class ForwardPass {
 public:
  ForwardPass(const MoeExperts& ex, const ForwardArgs& args, Saved& s)
      : ex_(ex),
        ctx_(*ex.ctx_),
        k_(ctx_.kernels()),
        ew_(ctx_.kernels().eltwise),
        args_(args),
        s_(s),
        rt_(s.routing),
        lora_(args.lora),
        T_(args.T),
        H_(ex.H()),
        I_(ex.I()),
        rows_(rt_.rows()),
        ldh_(layout::ld_bf16(H_)),
        ldi_(layout::ld_bf16(I_)),
        work_(group_work(ex.work_blocks(rt_, /*backward=*/false), rt_.active, ex.E(),
                         ctx_.num_partitions())) {}

  void run() {
    save_inputs();
    gather_x();
    for (Proj p : {Proj::kGate, Proj::kUp}) lora_reduce_input(p);
    gate_up();
    lora_reduce_down();
    down();
    combine();
  }

 private:
  // x as bf16 (the GEMM operand) and the routing weights as fp32, kept for backward.
  void save_inputs() {
    s_.x.resize(T_ * H_);
    s_.w.resize(T_ * args_.k);
    ctx_.parallel_for(
        "fwd.save_inputs", (T_ + kTokenBlock - 1) / kTokenBlock, [&](int64_t b, Arena&) {
          const int64_t t1 = std::min(T_, (b + 1) * kTokenBlock);
          for (int64_t t = b * kTokenBlock; t < t1; ++t) {
            common::row_to_bf16(ew_,
                                static_cast<const char*>(args_.x) + t * H_ * esize(args_.x_dtype),
                                args_.x_dtype, H_, s_.x.data() + t * H_);
            for (int j = 0; j < args_.k; ++j) {
              const int64_t i = t * args_.k + j;
              s_.w.data()[i] = args_.w_dtype == DType::kF32
                                   ? static_cast<const float*>(args_.topk_weights)[i]
                                   : bf16_to_f32(static_cast<const bf16*>(args_.topk_weights)[i]);
            }
          }
        });
  }

  void gather_x() {
    xg_ = ctx_.workspace<bf16>(layout::kWsX, rows_ * ldh_).data();
    ctx_.parallel_for("fwd.gather", (rows_ + kTokenBlock - 1) / kTokenBlock,
                      [&](int64_t b, Arena&) {
                        common::gather_token_rows(ew_, rt_, b * kTokenBlock,
                                                  std::min(rows_, (b + 1) * kTokenBlock),
                                                  s_.x.data(), DType::kBf16, H_, xg_, ldh_);
                      });
  }

  // z = s * A x of gate or up, per active expert, into Saved.
  void lora_reduce_input(Proj p) {
    const LoraProj& lp = lora_[p];
    if (!lp.enabled()) return;
    Buf<bf16>& zs = saved_z(s_, p);
    const int64_t ldr = layout::ld_bf16(lp.r);
    zs.resize(rows_ * ldr);
    ctx_.parallel_for_partitioned("fwd.lora_reduce_gate_up", work_.active_begin,
                                  [&](int64_t i, Arena& a) {
                                    const int e = work_.active[i];
                                    const int64_t off = rt_.offsets[e];
                                    lora_reduce(k_, ew_, lp, lora_.scaling, e, H_, xg_ + off * ldh_,
                                                ldh_, rt_.count(e), a, zs.data() + off * ldr, ldr);
                                  });
  }

  // g, u (saved or in the workspace) and h, per (row block, I chunk).
  void gate_up() {
    if (ex_.options_.activations == ActivationPolicy::kSave) {
      s_.g.resize(rows_ * ldi_);
      s_.u.resize(rows_ * ldi_);
      gbuf_ = s_.g.data();
      ubuf_ = s_.u.data();
    } else {
      gbuf_ = ctx_.workspace<bf16>(layout::kWsG, rows_ * ldi_).data();
      ubuf_ = ctx_.workspace<bf16>(layout::kWsU, rows_ * ldi_).data();
    }
    hb_ = ctx_.workspace<bf16>(layout::kWsH, rows_ * ldi_).data();
    const int64_t chI = layout::chunks(I_);
    ctx_.parallel_for_partitioned(
        "fwd.gate_up", ExpertWork::tasks(work_.block_begin, chI), [&](int64_t task, Arena& a) {
          const RowBlock& blk = work_.blocks[task / chI];
          const int64_t i0 = (task % chI) * layout::kChunk, i1 = std::min(I_, i0 + layout::kChunk);
          const int64_t off = blk.r0, n = blk.r1 - blk.r0;
          bf16* g = gbuf_ + off * ldi_ + i0;
          bf16* u = ubuf_ + off * ldi_ + i0;
          ex_.gate_up_chunk(lora_, blk.e, off, xg_ + off * ldh_, n, s_, i0, i1, a, g, u, ldi_);
          for (int64_t m = 0; m < n; ++m) {
            bf16* hrow = hb_ + (off + m) * ldi_;
            ex_.activate(g + m * ldi_, u + m * ldi_, hrow + i0, i1 - i0);
            if (i1 == I_) std::fill(hrow + I_, hrow + ldi_, bf16(0));
          }
        });
  }

  void lora_reduce_down() {
    const LoraProj& lp = lora_.down;
    if (!lp.enabled()) return;
    const int64_t ldr = layout::ld_bf16(lp.r);
    s_.zs_down.resize(rows_ * ldr);
    ctx_.parallel_for_partitioned(
        "fwd.lora_reduce_down", work_.active_begin, [&](int64_t i, Arena& a) {
          const int e = work_.active[i];
          const int64_t off = rt_.offsets[e];
          lora_reduce(k_, ew_, lp, lora_.scaling, e, I_, hb_ + off * ldi_, ldi_, rt_.count(e), a,
                      s_.zs_down.data() + off * ldr, ldr);
        });
  }

  // y = Wd h (+ LoRA, + bias), fp32 expert-major.
  void down() {
    y_ = ctx_.workspace<float>(layout::kWsY, rows_ * H_).data();
    const int64_t chH = layout::chunks(H_);
    const LoraProj& lp = lora_.down;
    ctx_.parallel_for_partitioned(
        "fwd.down", ExpertWork::tasks(work_.block_begin, chH), [&](int64_t task, Arena& a) {
          const RowBlock& blk = work_.blocks[task / chH];
          const int e = blk.e;
          const int64_t h0 = (task % chH) * layout::kChunk, h1 = std::min(H_, h0 + layout::kChunk);
          const int64_t off = blk.r0, n = blk.r1 - blk.r0, nc = h1 - h0;
          Segment lora_seg;
          if (lp.enabled()) {
            const int64_t ldr = layout::ld_bf16(lp.r);
            lora_seg =
                Segment{s_.zs_down.data() + off * ldr, ldr, lora_expand_b(lp, e, H_, h0, nc, a)};
          }
          ex_.store_.weight_gemm(Proj::kDown, e, h0, nc, hb_ + off * ldi_, ldi_, n,
                                 lp.enabled() ? &lora_seg : nullptr, y_ + off * H_ + h0, H_, a);
          if (const float* b = ex_.store_.bias(Proj::kDown, e)) {
            for (int64_t m = 0; m < n; ++m) {
              float* yr = y_ + (off + m) * H_;
              for (int64_t h = h0; h < h1; ++h) yr[h] += b[h];
            }
          }
        });
  }

  // out[t] = sum_j w[t, j] y[row(t, j)], in slot order (deterministic).
  void combine() {
    ctx_.parallel_for(
        "fwd.combine", (T_ + kTokenBlock - 1) / kTokenBlock, [&](int64_t b, Arena& a) {
          float* acc = a.alloc<float>(H_);
          const int64_t t1 = std::min(T_, (b + 1) * kTokenBlock);
          for (int64_t t = b * kTokenBlock; t < t1; ++t) {
            std::fill(acc, acc + H_, 0.0f);
            for (int j = 0; j < args_.k; ++j) {
              const int64_t row = rt_.row_of[t * args_.k + j];
              if (row < 0) continue;
              const float wt = s_.w.data()[t * args_.k + j];
              const float* yr = y_ + row * H_;
              for (int64_t h = 0; h < H_; ++h) acc[h] += wt * yr[h];
            }
            common::store_row(ew_, acc, H_,
                              static_cast<char*>(args_.out) + t * H_ * esize(args_.out_dtype),
                              args_.out_dtype);
          }
        });
  }

  const MoeExperts& ex_;
  Context& ctx_;
  const kernels::KernelBundle& k_;
  const kernels::EltwiseKernel& ew_;
  const ForwardArgs& args_;
  Saved& s_;
  const Routing& rt_;
  const LoraSet& lora_;
  const int64_t T_, H_, I_, rows_, ldh_, ldi_;
  // GEMM row blocks and active experts, grouped by NUMA partition.
  const ExpertWork work_;
  bf16* xg_ = nullptr;    // [rows, ldh] gathered x
  bf16* gbuf_ = nullptr;  // [rows, ldi] g, u (Saved with kSave, else workspace)
  bf16* ubuf_ = nullptr;
  bf16* hb_ = nullptr;  // [rows, ldi] h
  float* y_ = nullptr;  // [rows, H] expert outputs
};

void MoeExperts::run_forward(const ForwardArgs& args, Saved& s) {
  ForwardPass(*this, args, s).run();
}

}  // namespace moetune
