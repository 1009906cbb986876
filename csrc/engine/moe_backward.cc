// The backward pass of MoeExperts (math in moe_experts.h). Phases, one
// BackwardPass method each:
//   0. zero_idle_lora_grads: LoRA gradients of experts without rows are 0
//   1. gather: x and dout rows into expert-major order (bf16)
//   2. lora_reduce_down: per expert, q = s * dout Bd (LoRA down, reduce side)
//   3. down_act: per (expert, I chunk), g, u (saved or recomputed), h;
//      D = dout Wd + q Ad  (= Wd^T dout + s Ad^T Bd^T dout, fused);
//      d topk_weights partial = <D, h> (+ <dout, bd> in chunk 0); dh = w D; dg, du
//   4. lora_grads: per expert, LoRA weight gradients (dA, dB for down, gate,
//      up) and the reduce-side gradients p = s * dg Bg, s * du Bu
//   5. dx_rows: per (expert, H chunk), dx rows = dg Wg + du Wu + p_g Ag + p_u Au
//      (one fused four-segment GEMM)
//   6. combine: per token block, dx[t] = sum_j dx rows, d topk_weights = sum
//      of partials
#include <algorithm>
#include <cstring>

#include "engine/expert_work.h"
#include "engine/moe_common.h"
#include "engine/moe_experts.h"
#include "engine/moe_layout.h"

namespace moetune {

using kernels::bf16;
using kernels::bf16_to_f32;
using kernels::f32_to_bf16;
using kernels::PackedB;
using kernels::Segment;

using common::esize;
using common::kTokenBlock;

namespace {

// p = bf16(s * (G_e B_e)) with LoRA B_e [K, r] (its own layout read as [K, N]).
void lora_back_reduce(const kernels::KernelBundle& k, const kernels::EltwiseKernel& ew,
                      const LoraProj& p, float s, int e, int64_t K, const bf16* ge, int64_t ldg,
                      int64_t n, Arena& a, bf16* ps, int64_t ldr) {
  common::reduce_to_rank(k, ew, static_cast<const char*>(p.B) + e * K * p.r * esize(p.b_dtype),
                         p.b_dtype, /*kn=*/true, K, p.r, ge, ldg, n, s, a, ps, ldr);
}

// Token-axis contractions for the LoRA weight gradients: sum over the n rows
// of one expert of (small_t)^T (big_t) with small [n, r] and big [n, N]. Only
// the small side is transposed (r x n); the big side is packed with K = n,
// which is a cheap interleave of row pairs. Result [r, N], or its transpose.
PackedB pack_tokens(const bf16* big, int64_t ldb, int64_t N, int64_t n, Arena& a) {
  bf16* rp = a.alloc<bf16>(kernels::packed_elems(n, N));
  kernels::pack_b(big, kernels::SrcType::kBf16, ldb, true, n, 0, N, 1.0f, rp);
  return PackedB{rp, n, N};
}

void token_contract(const kernels::KernelBundle& k, const bf16* small, int64_t lds, int64_t r,
                    const float* row_scale, const PackedB& big, int64_t n, Arena& a, float* dst,
                    bool transpose_out) {
  const int64_t N = big.N, ldt = layout::ld_tok(n);
  bf16* st = a.alloc<bf16>(r * ldt);
  kernels::transpose_to_a(small, kernels::SrcType::kBf16, lds, n, r, row_scale, st, ldt);
  Segment seg{st, ldt, big};
  if (!transpose_out) {
    k.gemm(r, 0, N, &seg, 1, dst, N, false);
    return;
  }
  float* c = a.alloc<float>(r * N);
  k.gemm(r, 0, N, &seg, 1, c, N, false);
  for (int64_t j = 0; j < N; ++j)
    for (int64_t i = 0; i < r; ++i) dst[j * r + i] = c[i * N + j];
}

}  // namespace

// One backward call's state: the arguments, the forward's Saved handle and
// the expert-major buffers the phases hand to each other (workspace slots).
class BackwardPass {
 public:
  BackwardPass(const MoeExperts& ex, const BackwardArgs& args, const Saved& s)
      : ex_(ex),
        ctx_(*ex.ctx_),
        k_(ctx_.kernels()),
        ew_(ctx_.kernels().eltwise),
        args_(args),
        s_(s),
        rt_(s.routing),
        lora_(args.lora),
        gr_(args.grads),
        sc_(lora_.scaling),
        T_(s.T),
        H_(ex.H()),
        I_(ex.I()),
        rows_(rt_.rows()),
        ldh_(layout::ld_bf16(H_)),
        ldi_(layout::ld_bf16(I_)),
        chI_(layout::chunks(I_)),
        chH_(layout::chunks(H_)),
        ldr_{lora_.gate.enabled() ? layout::ld_bf16(lora_.gate.r) : 0,
             lora_.up.enabled() ? layout::ld_bf16(lora_.up.r) : 0,
             lora_.down.enabled() ? layout::ld_bf16(lora_.down.r) : 0},
        work_(group_work(ex.work_blocks(rt_, /*backward=*/true), rt_.active, ex.E(),
                         ctx_.num_partitions())) {}

  void run() {
    zero_idle_lora_grads();
    gather();
    lora_reduce_down();
    down_act();
    lora_grads();
    dx_rows();
    combine();
  }

 private:
  // LoRA grads of experts without rows are zero; active experts overwrite theirs.
  void zero_idle_lora_grads() {
    std::vector<char> active(ex_.E(), 0);
    for (int e : rt_.active) active[e] = 1;
    for (Proj p : kAllProjs) {
      const LoraProj& lp = lora_[p];
      if (!lp.enabled()) continue;
      const int64_t in = p == Proj::kDown ? I_ : H_, out = p == Proj::kDown ? H_ : I_;
      for (auto [d, per_e] :
           {std::pair<float*, int64_t>{gr_.dA(p), lp.r * in}, {gr_.dB(p), out * lp.r}}) {
        if (!d) continue;
        for (int e = 0; e < ex_.E(); ++e)
          if (!active[e]) std::fill(d + e * per_e, d + (e + 1) * per_e, 0.0f);
      }
    }
  }

  void gather() {
    xg_ = ctx_.workspace<bf16>(layout::kWsX, rows_ * ldh_).data();
    dog_ = ctx_.workspace<bf16>(layout::kWsDout, rows_ * ldh_).data();
    ctx_.parallel_for(
        "bwd.gather", (rows_ + kTokenBlock - 1) / kTokenBlock, [&](int64_t b, Arena&) {
          const int64_t r0 = b * kTokenBlock, r1 = std::min(rows_, r0 + kTokenBlock);
          common::gather_token_rows(ew_, rt_, r0, r1, s_.x.data(), DType::kBf16, H_, xg_, ldh_);
          common::gather_token_rows(ew_, rt_, r0, r1, args_.dout, args_.dout_dtype, H_, dog_, ldh_);
        });
  }

  // q = s * dout Bd.
  void lora_reduce_down() {
    const int64_t ldr = ldr_[idx(Proj::kDown)];
    qs_ = ctx_.workspace<bf16>(layout::kWsQ, rows_ * ldr).data();
    if (!lora_.down.enabled()) return;
    ctx_.parallel_for_partitioned(
        "bwd.lora_reduce_down", work_.active_begin, [&](int64_t i, Arena& a) {
          const int e = work_.active[i];
          const int64_t off = rt_.offsets[e];
          lora_back_reduce(k_, ew_, lora_.down, sc_, e, H_, dog_ + off * ldh_, ldh_, rt_.count(e),
                           a, qs_ + off * ldr, ldr);
        });
  }

  // Through down and the activation: h, dg, du and the d topk_weights partials.
  void down_act() {
    hb_ = ctx_.workspace<bf16>(layout::kWsH, rows_ * ldi_).data();
    dgb_ = ctx_.workspace<bf16>(layout::kWsDg, rows_ * ldi_).data();
    dub_ = ctx_.workspace<bf16>(layout::kWsDu, rows_ * ldi_).data();
    dwp_ = ctx_.workspace<float>(layout::kWsDwPart, rows_ * chI_).data();
    ctx_.parallel_for_partitioned(
        "bwd.down_act", ExpertWork::tasks(work_.block_begin, chI_),
        [&](int64_t task, Arena& a) { down_act_task(work_.blocks[task / chI_], task % chI_, a); });
  }

  void down_act_task(const RowBlock& blk, int64_t c, Arena& a) const {
    const int e = blk.e;
    const int64_t i0 = c * layout::kChunk, i1 = std::min(I_, i0 + layout::kChunk), nc = i1 - i0;
    const int64_t off = blk.r0, n = blk.r1 - blk.r0;
    const bf16* g;
    const bf16* u;
    int64_t ldgu;
    if (ex_.options_.activations == ActivationPolicy::kSave) {
      g = s_.g.data() + off * ldi_ + i0;
      u = s_.u.data() + off * ldi_ + i0;
      ldgu = ldi_;
    } else {
      bf16* gt = a.alloc<bf16>(n * nc);
      bf16* ut = a.alloc<bf16>(n * nc);
      ex_.gate_up_chunk(lora_, e, off, xg_ + off * ldh_, n, s_, i0, i1, a, gt, ut, nc);
      g = gt;
      u = ut;
      ldgu = nc;
    }
    Segment seg[2];
    seg[0] = Segment{dog_ + off * ldh_, ldh_, PackedB{}};  // B: W_d^T slice, set by weight_t_gemm
    int nseg = 1;
    if (lora_.down.enabled()) {
      // Ad_e is [r, I] = [K, N].
      const int64_t r = lora_.down.r, ldr = ldr_[idx(Proj::kDown)];
      bf16* pa = a.alloc<bf16>(kernels::packed_elems(r, nc));
      kernels::pack_b(
          static_cast<const char*>(lora_.down.A) + e * r * I_ * esize(lora_.down.a_dtype),
          src_type(lora_.down.a_dtype), I_, true, r, i0, i1, 1.0f, pa);
      seg[1] = Segment{qs_ + off * ldr, ldr, PackedB{pa, r, nc}};
      nseg = 2;
    }
    float* d = a.alloc<float>(n * nc);
    const Proj wd = Proj::kDown;
    ex_.store_.weight_t_gemm(&wd, 1, e, i0, nc, seg, nseg, n, d, nc, a);
    const float* bd = ex_.store_.bias(Proj::kDown, e);
    for (int64_t m = 0; m < n; ++m) {
      const int64_t row = off + m;
      const float wt = s_.w.data()[rt_.slot_of[row]];
      bf16* hr = hb_ + row * ldi_;
      bf16* dgr = dgb_ + row * ldi_;
      bf16* dur = dub_ + row * ldi_;
      float dot = ex_.activate_bwd(g + m * ldgu, u + m * ldgu, d + m * nc, wt, hr + i0, dgr + i0,
                                   dur + i0, nc);
      if (bd && c == 0) {  // <dout, bd>: the down bias's share of <dout, y>, once per row
        const bf16* dr = dog_ + row * ldh_;
        for (int64_t j = 0; j < H_; ++j) dot += bf16_to_f32(dr[j]) * bd[j];
      }
      if (i1 == I_) {
        std::fill(hr + I_, hr + ldi_, bf16(0));
        std::fill(dgr + I_, dgr + ldi_, bf16(0));
        std::fill(dur + I_, dur + ldi_, bf16(0));
      }
      dwp_[row * chI_ + c] = dot;
    }
  }

  // LoRA weight gradients + reduce-side gradients p for dx, per active expert.
  void lora_grads() {
    pg_ = ctx_.workspace<bf16>(layout::kWsPg, rows_ * ldr_[idx(Proj::kGate)]).data();
    pu_ = ctx_.workspace<bf16>(layout::kWsPu, rows_ * ldr_[idx(Proj::kUp)]).data();
    if (!lora_.any()) return;
    ctx_.parallel_for_partitioned("bwd.lora_grads", work_.active_begin, [&](int64_t i, Arena& a) {
      const int e = work_.active[i];
      const int64_t off = rt_.offsets[e], n = rt_.count(e);
      if (lora_.down.enabled()) lora_grads_down(e, off, n, a);
      PackedB xpack{};
      if ((lora_.gate.enabled() && gr_.dA_gate) || (lora_.up.enabled() && gr_.dA_up))
        xpack = pack_tokens(xg_ + off * ldh_, ldh_, H_, n, a);
      for (Proj p : {Proj::kGate, Proj::kUp})
        if (lora_[p].enabled()) lora_grads_input(p, e, off, n, xpack, a);
    });
  }

  void lora_grads_down(int e, int64_t off, int64_t n, Arena& a) const {
    const int64_t r = lora_.down.r, ldr = ldr_[idx(Proj::kDown)];
    float* wrow = a.alloc<float>(n);
    for (int64_t m = 0; m < n; ++m) wrow[m] = s_.w.data()[rt_.slot_of[off + m]];
    // dBd = sum_t (w dout)_t (s z_d)_t^T  -> [H, r]  (as ((w z_d)^T dout)^T)
    if (gr_.dB_down)
      token_contract(k_, s_.zs_down.data() + off * ldr, ldr, r, wrow,
                     pack_tokens(dog_ + off * ldh_, ldh_, H_, n, a), n, a, gr_.dB_down + e * H_ * r,
                     true);
    // dAd = sum_t w_t q_t h_t^T  -> [r, I]
    if (gr_.dA_down)
      token_contract(k_, qs_ + off * ldr, ldr, r, wrow,
                     pack_tokens(hb_ + off * ldi_, ldi_, I_, n, a), n, a, gr_.dA_down + e * r * I_,
                     false);
  }

  // Gate or up: p = s * dg B, dB, dA (xpack: this expert's x rows packed, if a dA is wanted).
  void lora_grads_input(Proj p, int e, int64_t off, int64_t n, const PackedB& xpack,
                        Arena& a) const {
    const LoraProj& lp = lora_[p];
    const int64_t r = lp.r, ldr = ldr_[idx(p)];
    const bool gate = p == Proj::kGate;
    const bf16* dge = (gate ? dgb_ : dub_) + off * ldi_;
    const bf16* zs = (gate ? s_.zs_gate : s_.zs_up).data() + off * ldr;
    bf16* ps = (gate ? pg_ : pu_) + off * ldr;
    // p = s * dg B   -> [n, r]
    lora_back_reduce(k_, ew_, lp, sc_, e, I_, dge, ldi_, n, a, ps, ldr);
    // dB = sum_t dg_t (s z)_t^T -> [I, r];  dA = sum_t p_t x_t^T -> [r, H]
    if (float* dB = gr_.dB(p))
      token_contract(k_, zs, ldr, r, nullptr, pack_tokens(dge, ldi_, I_, n, a), n, a,
                     dB + e * I_ * r, true);
    if (float* dA = gr_.dA(p))
      token_contract(k_, ps, ldr, r, nullptr, xpack, n, a, dA + e * r * H_, false);
  }

  // dx rows, fused over gate, up and their LoRA.
  void dx_rows() {
    dxr_ = ctx_.workspace<float>(layout::kWsDx, rows_ * H_).data();
    ctx_.parallel_for_partitioned(
        "bwd.dx", ExpertWork::tasks(work_.block_begin, chH_), [&](int64_t task, Arena& a) {
          const RowBlock& blk = work_.blocks[task / chH_];
          const int e = blk.e;
          const int64_t h0 = (task % chH_) * layout::kChunk, h1 = std::min(H_, h0 + layout::kChunk);
          const int64_t nc = h1 - h0, off = blk.r0, n = blk.r1 - blk.r0;
          Segment seg[4];
          int nseg = 0;
          // B of the first two: W_g^T, W_u^T slices, set by weight_t_gemm.
          seg[nseg++] = Segment{dgb_ + off * ldi_, ldi_, PackedB{}};
          seg[nseg++] = Segment{dub_ + off * ldi_, ldi_, PackedB{}};
          for (Proj p : {Proj::kGate, Proj::kUp}) {
            const LoraProj& lp = lora_[p];
            if (!lp.enabled()) continue;
            const int64_t r = lp.r, ldr = ldr_[idx(p)];
            // A_e is [r, H] = [K, N].
            bf16* pa = a.alloc<bf16>(kernels::packed_elems(r, nc));
            kernels::pack_b(static_cast<const char*>(lp.A) + e * r * H_ * esize(lp.a_dtype),
                            src_type(lp.a_dtype), H_, true, r, h0, h1, 1.0f, pa);
            seg[nseg++] =
                Segment{(p == Proj::kGate ? pg_ : pu_) + off * ldr, ldr, PackedB{pa, r, nc}};
          }
          const Proj wgu[2] = {Proj::kGate, Proj::kUp};
          ex_.store_.weight_t_gemm(wgu, 2, e, h0, nc, seg, nseg, n, dxr_ + off * H_ + h0, H_, a);
        });
  }

  // Per-token reductions in slot order.
  void combine() {
    const int kk = s_.k;
    ctx_.parallel_for(
        "bwd.combine", (T_ + kTokenBlock - 1) / kTokenBlock, [&](int64_t b, Arena& a) {
          float* acc = a.alloc<float>(H_);
          const int64_t t1 = std::min(T_, (b + 1) * kTokenBlock);
          for (int64_t t = b * kTokenBlock; t < t1; ++t) {
            std::fill(acc, acc + H_, 0.0f);
            for (int j = 0; j < kk; ++j) {
              const int64_t slot = t * kk + j, row = rt_.row_of[slot];
              float dw = 0.0f;
              if (row >= 0) {
                const float* xr = dxr_ + row * H_;
                for (int64_t h = 0; h < H_; ++h) acc[h] += xr[h];
                for (int64_t c = 0; c < chI_; ++c) dw += dwp_[row * chI_ + c];
              }
              if (args_.dtopk_weights) {
                if (args_.dw_dtype == DType::kF32)
                  static_cast<float*>(args_.dtopk_weights)[slot] = dw;
                else
                  static_cast<bf16*>(args_.dtopk_weights)[slot] = f32_to_bf16(dw);
              }
            }
            if (!args_.dx) continue;
            common::store_row(ew_, acc, H_,
                              static_cast<char*>(args_.dx) + t * H_ * esize(args_.dx_dtype),
                              args_.dx_dtype);
          }
        });
  }

  const MoeExperts& ex_;
  Context& ctx_;
  const kernels::KernelBundle& k_;
  const kernels::EltwiseKernel& ew_;
  const BackwardArgs& args_;
  const Saved& s_;
  const Routing& rt_;
  const LoraSet& lora_;
  const LoraGrads& gr_;
  const float sc_;
  const int64_t T_, H_, I_, rows_, ldh_, ldi_, chI_, chH_;
  const int64_t ldr_[3];  // LoRA rank-side row strides per projection (0 = off)
  // GEMM row blocks and active experts, grouped by NUMA partition.
  const ExpertWork work_;
  bf16* xg_ = nullptr;  // [rows, ldh] gathered x, dout
  bf16* dog_ = nullptr;
  bf16* qs_ = nullptr;  // [rows, ldr_down] s * dout Bd
  bf16* hb_ = nullptr;  // [rows, ldi] h, dg, du
  bf16* dgb_ = nullptr;
  bf16* dub_ = nullptr;
  float* dwp_ = nullptr;  // [rows, chI] d topk_weights partials per I chunk
  bf16* pg_ = nullptr;    // [rows, ldr] s * dg Bg, s * du Bu
  bf16* pu_ = nullptr;
  float* dxr_ = nullptr;  // [rows, H] dx per expert-major row
};

void MoeExperts::run_backward(const BackwardArgs& args, Saved& s) {
  BackwardPass(*this, args, s).run();
}

}  // namespace moetune
