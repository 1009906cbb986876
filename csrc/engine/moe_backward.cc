// The backward pass of MoeExperts (math in moe_experts.h). Phases:
//   1. gather x and dout rows into expert-major order (bf16)
//   2. per expert: q = s * dout Bd (LoRA down, reduce side)
//   3. per (expert, I chunk): g, u (saved or recomputed), h;
//      D = dout Wd + q Ad  (= Wd^T dout + s Ad^T Bd^T dout, fused);
//      d topk_weights partial = <D, h> (+ <dout, bd> in chunk 0); dh = w D; dg, du
//   4. per expert: LoRA weight gradients (dA, dB for down, gate, up) and the
//      reduce-side gradients p = s * dg Bg, s * du Bu
//   5. per (expert, H chunk): dx rows = dg Wg + du Wu + p_g Ag + p_u Au
//      (one fused four-segment GEMM)
//   6. per token block: dx[t] = sum_j dx rows, d topk_weights = sum of partials
#include <algorithm>
#include <cstring>

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
                    const float* row_scale, const PackedB& big, int64_t n, Arena& a,
                    float* dst, bool transpose_out) {
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

void MoeExperts::run_backward(const BackwardArgs& args, Saved& s) {
  Context& ctx = *ctx_;
  const kernels::KernelBundle& k = ctx.kernels();
  const Routing& rt = s.routing;
  const int64_t T = s.T, H = H_, I = I_, rows = rt.rows();
  const int kk = s.k;
  const int64_t ldh = layout::ld_bf16(H), ldi = layout::ld_bf16(I);
  const LoraSet& lora = args.lora;
  const float sc = lora.scaling;
  const bool save_gu = options_.activations == ActivationPolicy::kSave;
  const int64_t n_active = static_cast<int64_t>(rt.active.size());
  const int64_t chI = layout::chunks(I), chH = layout::chunks(H);
  const LoraGrads& gr = args.grads;

  // LoRA grads of experts without rows are zero; active experts overwrite theirs.
  {
    std::vector<char> active(E_, 0);
    for (int e : rt.active) active[e] = 1;
    auto zero = [&](float* d, const LoraProj& p, int64_t per_e) {
      if (!d || !p.enabled()) return;
      for (int e = 0; e < E_; ++e)
        if (!active[e]) std::fill(d + e * per_e, d + (e + 1) * per_e, 0.0f);
    };
    zero(gr.dA_gate, lora.gate, lora.gate.r * H);
    zero(gr.dB_gate, lora.gate, I * lora.gate.r);
    zero(gr.dA_up, lora.up, lora.up.r * H);
    zero(gr.dB_up, lora.up, I * lora.up.r);
    zero(gr.dA_down, lora.down, lora.down.r * I);
    zero(gr.dB_down, lora.down, H * lora.down.r);
  }

  // 1. gathers.
  auto xg = ctx.workspace<bf16>(layout::kWsX, rows * ldh);
  auto dog = ctx.workspace<bf16>(layout::kWsDout, rows * ldh);
  ctx.parallel_for("bwd.gather", (rows + kTokenBlock - 1) / kTokenBlock, [&](int64_t b, Arena&) {
    const int64_t r0 = b * kTokenBlock, r1 = std::min(rows, r0 + kTokenBlock);
    common::gather_token_rows(ctx.kernels().eltwise, rt, r0, r1, s.x.data(), DType::kBf16, H, xg.data(), ldh);
    common::gather_token_rows(ctx.kernels().eltwise, rt, r0, r1, args.dout, args.dout_dtype, H, dog.data(), ldh);
  });

  // 2. q = s * dout Bd.
  const int64_t ldr_d = lora.down.enabled() ? layout::ld_bf16(lora.down.r) : 0;
  auto qs = ctx.workspace<bf16>(layout::kWsQ, rows * ldr_d);
  if (lora.down.enabled()) {
    ctx.parallel_for("bwd.lora_reduce_down", n_active, [&](int64_t i, Arena& a) {
      const int e = rt.active[i];
      const int64_t off = rt.offsets[e];
      lora_back_reduce(k, ctx.kernels().eltwise, lora.down, sc, e, H, dog.data() + off * ldh, ldh, rt.count(e), a,
                       qs.data() + off * ldr_d, ldr_d);
    });
  }

  // 3. through down and the activation.
  auto hb = ctx.workspace<bf16>(layout::kWsH, rows * ldi);
  auto dgb = ctx.workspace<bf16>(layout::kWsDg, rows * ldi);
  auto dub = ctx.workspace<bf16>(layout::kWsDu, rows * ldi);
  auto dwp = ctx.workspace<float>(layout::kWsDwPart, rows * chI);
  const std::vector<RowBlock> blocks = work_blocks(rt, /*backward=*/true);
  const int64_t n_blocks = static_cast<int64_t>(blocks.size());
  ctx.parallel_for("bwd.down_act", n_blocks * chI, [&](int64_t task, Arena& a) {
    const RowBlock& blk = blocks[task / chI];
    const int e = blk.e;
    const int64_t c = task % chI;
    const int64_t i0 = c * layout::kChunk, i1 = std::min(I, i0 + layout::kChunk), nc = i1 - i0;
    const int64_t off = blk.r0, n = blk.r1 - blk.r0;
    const bf16* g;
    const bf16* u;
    int64_t ldgu;
    if (save_gu) {
      g = s.g.data() + off * ldi + i0;
      u = s.u.data() + off * ldi + i0;
      ldgu = ldi;
    } else {
      bf16* gt = a.alloc<bf16>(n * nc);
      bf16* ut = a.alloc<bf16>(n * nc);
      gate_up_chunk(lora, e, off, xg.data() + off * ldh, n, s, i0, i1, a, gt, ut, nc);
      g = gt;
      u = ut;
      ldgu = nc;
    }
    Segment seg[2];
    seg[0] = Segment{dog.data() + off * ldh, ldh, PackedB{}};  // B: W_d^T slice, set by weight_t_gemm
    int nseg = 1;
    if (lora.down.enabled()) {
      // Ad_e is [r, I] = [K, N].
      const int64_t r = lora.down.r;
      bf16* pa = a.alloc<bf16>(kernels::packed_elems(r, nc));
      kernels::pack_b(static_cast<const char*>(lora.down.A) + e * r * I * esize(lora.down.a_dtype),
                      src_type(lora.down.a_dtype), I, true, r, i0, i1, 1.0f, pa);
      seg[1] = Segment{qs.data() + off * ldr_d, ldr_d, PackedB{pa, r, nc}};
      nseg = 2;
    }
    float* d = a.alloc<float>(n * nc);
    const int wd = 2;
    weight_t_gemm(&wd, 1, e, i0, nc, seg, nseg, n, d, nc, a);
    const float* bd = bias(2, e);
    for (int64_t m = 0; m < n; ++m) {
      const int64_t row = off + m;
      const float wt = s.w.data()[rt.slot_of[row]];
      bf16* hr = hb.data() + row * ldi;
      bf16* dgr = dgb.data() + row * ldi;
      bf16* dur = dub.data() + row * ldi;
      float dot = activate_bwd(g + m * ldgu, u + m * ldgu, d + m * nc, wt, hr + i0, dgr + i0,
                               dur + i0, nc);
      if (bd && c == 0) {  // <dout, bd>: the down bias's share of <dout, y>, once per row
        const bf16* dr = dog.data() + row * ldh;
        for (int64_t j = 0; j < H; ++j) dot += bf16_to_f32(dr[j]) * bd[j];
      }
      if (i1 == I) {
        std::fill(hr + I, hr + ldi, bf16(0));
        std::fill(dgr + I, dgr + ldi, bf16(0));
        std::fill(dur + I, dur + ldi, bf16(0));
      }
      dwp.data()[row * chI + c] = dot;
    }
  });

  // 4. LoRA weight gradients + reduce-side gradients for dx.
  const int64_t ldr_g = lora.gate.enabled() ? layout::ld_bf16(lora.gate.r) : 0;
  const int64_t ldr_u = lora.up.enabled() ? layout::ld_bf16(lora.up.r) : 0;
  auto pg = ctx.workspace<bf16>(layout::kWsPg, rows * ldr_g);
  auto pu = ctx.workspace<bf16>(layout::kWsPu, rows * ldr_u);
  if (lora.any()) {
    ctx.parallel_for("bwd.lora_grads", n_active, [&](int64_t i, Arena& a) {
      const int e = rt.active[i];
      const int64_t off = rt.offsets[e], n = rt.count(e);
      float* wrow = a.alloc<float>(n);
      for (int64_t m = 0; m < n; ++m) wrow[m] = s.w.data()[rt.slot_of[off + m]];
      if (lora.down.enabled()) {
        const int64_t r = lora.down.r;
        // dBd = sum_t (w dout)_t (s z_d)_t^T  -> [H, r]  (as ((w z_d)^T dout)^T)
        if (gr.dB_down)
          token_contract(k, s.zs_down.data() + off * ldr_d, ldr_d, r, wrow,
                         pack_tokens(dog.data() + off * ldh, ldh, H, n, a), n, a,
                         gr.dB_down + e * H * r, true);
        // dAd = sum_t w_t q_t h_t^T  -> [r, I]
        if (gr.dA_down)
          token_contract(k, qs.data() + off * ldr_d, ldr_d, r, wrow,
                         pack_tokens(hb.data() + off * ldi, ldi, I, n, a), n, a,
                         gr.dA_down + e * r * I, false);
      }
      PackedB xpack{};
      if ((lora.gate.enabled() && gr.dA_gate) || (lora.up.enabled() && gr.dA_up))
        xpack = pack_tokens(xg.data() + off * ldh, ldh, H, n, a);
      for (int which = 0; which < 2; ++which) {
        const LoraProj& p = which == 0 ? lora.gate : lora.up;
        if (!p.enabled()) continue;
        const int64_t r = p.r, ldr = which == 0 ? ldr_g : ldr_u;
        const bf16* dge = (which == 0 ? dgb : dub).data() + off * ldi;
        const bf16* zs = (which == 0 ? s.zs_gate : s.zs_up).data() + off * ldr;
        bf16* ps = (which == 0 ? pg : pu).data() + off * ldr;
        float* dB = which == 0 ? gr.dB_gate : gr.dB_up;
        float* dA = which == 0 ? gr.dA_gate : gr.dA_up;
        // p = s * dg B   -> [n, r]
        lora_back_reduce(k, ctx.kernels().eltwise, p, sc, e, I, dge, ldi, n, a, ps, ldr);
        // dB = sum_t dg_t (s z)_t^T -> [I, r];  dA = sum_t p_t x_t^T -> [r, H]
        if (dB)
          token_contract(k, zs, ldr, r, nullptr, pack_tokens(dge, ldi, I, n, a), n, a,
                         dB + e * I * r, true);
        if (dA) token_contract(k, ps, ldr, r, nullptr, xpack, n, a, dA + e * r * H, false);
      }
    });
  }

  // 5. dx rows, fused over gate, up and their LoRA.
  auto dxr = ctx.workspace<float>(layout::kWsDx, rows * H);
  ctx.parallel_for("bwd.dx", n_blocks * chH, [&](int64_t task, Arena& a) {
    const RowBlock& blk = blocks[task / chH];
    const int e = blk.e;
    const int64_t h0 = (task % chH) * layout::kChunk, h1 = std::min(H, h0 + layout::kChunk);
    const int64_t nc = h1 - h0, off = blk.r0, n = blk.r1 - blk.r0;
    Segment seg[4];
    int nseg = 0;
    // B of the first two: W_g^T, W_u^T slices, set by weight_t_gemm.
    seg[nseg++] = Segment{dgb.data() + off * ldi, ldi, PackedB{}};
    seg[nseg++] = Segment{dub.data() + off * ldi, ldi, PackedB{}};
    for (int which = 0; which < 2; ++which) {
      const LoraProj& p = which == 0 ? lora.gate : lora.up;
      if (!p.enabled()) continue;
      const int64_t r = p.r, ldr = which == 0 ? ldr_g : ldr_u;
      // A_e is [r, H] = [K, N].
      bf16* pa = a.alloc<bf16>(kernels::packed_elems(r, nc));
      kernels::pack_b(static_cast<const char*>(p.A) + e * r * H * esize(p.a_dtype),
                      src_type(p.a_dtype), H, true, r, h0, h1, 1.0f, pa);
      seg[nseg++] = Segment{(which == 0 ? pg : pu).data() + off * ldr, ldr, PackedB{pa, r, nc}};
    }
    const int wgu[2] = {0, 1};
    weight_t_gemm(wgu, 2, e, h0, nc, seg, nseg, n, dxr.data() + off * H + h0, H, a);
  });

  // 6. per-token reductions in slot order.
  ctx.parallel_for("bwd.combine", (T + kTokenBlock - 1) / kTokenBlock, [&](int64_t b, Arena& a) {
    float* acc = a.alloc<float>(H);
    const int64_t t1 = std::min(T, (b + 1) * kTokenBlock);
    for (int64_t t = b * kTokenBlock; t < t1; ++t) {
      std::fill(acc, acc + H, 0.0f);
      for (int j = 0; j < kk; ++j) {
        const int64_t slot = t * kk + j, row = rt.row_of[slot];
        float dw = 0.0f;
        if (row >= 0) {
          const float* xr = dxr.data() + row * H;
          for (int64_t h = 0; h < H; ++h) acc[h] += xr[h];
          for (int64_t c = 0; c < chI; ++c) dw += dwp.data()[row * chI + c];
        }
        if (args.dtopk_weights) {
          if (args.dw_dtype == DType::kF32) static_cast<float*>(args.dtopk_weights)[slot] = dw;
          else static_cast<bf16*>(args.dtopk_weights)[slot] = f32_to_bf16(dw);
        }
      }
      if (!args.dx) continue;
      common::store_row(ctx.kernels().eltwise, acc, H,
                        static_cast<char*>(args.dx) + t * H * esize(args.dx_dtype), args.dx_dtype);
    }
  });
}

}  // namespace moetune
