// The forward pass of MoeExperts: see moe_experts.h for the math. Phases
// (each a parallel loop; a phase starts when the previous one is done):
//   1. gather x rows into expert-major order (bf16)
//   2. per expert: LoRA reduce z = s * A x for gate and up
//   3. per (expert, I chunk): g, u = W x + z B^T (one fused two-segment GEMM
//      each) [+ bias], rounded to bf16, h = act(g, u)
//   4. per expert: LoRA reduce z_d = s * Ad h
//   5. per (expert, H chunk): y = Wd h + z_d Bd^T [+ bd], fp32, expert-major
//   6. per token block: out[t] = sum_j w[t, j] y[t, j], in slot order
#include <algorithm>
#include <cstring>

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

void gather_rows(Context& ctx, const Routing& rt, const void* src, DType dtype, int64_t H,
                 bf16* dst, int64_t ld) {
  const int64_t rows = rt.rows();
  ctx.parallel_for("fwd.gather", (rows + kTokenBlock - 1) / kTokenBlock, [&](int64_t b, Arena&) {
    common::gather_token_rows(ctx.kernels().eltwise, rt, b * kTokenBlock, std::min(rows, (b + 1) * kTokenBlock), src,
                              dtype, H, dst, ld);
  });
}

// z = bf16(s * (X_e A_e^T)) for rows of expert e -> zs rows (stride ldr).
void lora_reduce(const kernels::KernelBundle& k, const kernels::EltwiseKernel& ew,
                 const LoraProj& p, float s, int e, int64_t in, const bf16* xe, int64_t ldx,
                 int64_t n, Arena& a, bf16* zs, int64_t ldr) {
  common::reduce_to_rank(k, ew, static_cast<const char*>(p.A) + e * p.r * in * esize(p.a_dtype),
                         p.a_dtype, /*kn=*/false, in, p.r, xe, ldx, n, s, a, zs, ldr);
}

}  // namespace

// Packs rows [n0, n0 + n) of LoRA B_e ([out, r] = [N, K]) for the expand.
static PackedB lora_expand_b(const LoraProj& p, int e, int64_t out, int64_t n0, int64_t n,
                             Arena& a) {
  const int64_t r = p.r;
  const size_t esz = esize(p.b_dtype);
  bf16* pb = a.alloc<bf16>(kernels::packed_elems(r, n));
  kernels::pack_b(static_cast<const char*>(p.B) + e * out * r * esz, src_type(p.b_dtype), r, false,
                  r, n0, n0 + n, 1.0f, pb);
  return PackedB{pb, r, n};
}

void MoeExperts::gate_up_chunk(const LoraSet& lora, int e, int64_t off, const bf16* xe, int64_t n,
                               const Saved& s, int64_t i0, int64_t i1, Arena& a, bf16* gb,
                               bf16* ub, int64_t ld) const {
  const int64_t nc = i1 - i0;
  const int64_t ldh = layout::ld_bf16(H_);
  float* c = a.alloc<float>(n * nc);
  for (int which = 0; which < 2; ++which) {
    const LoraProj& p = which == 0 ? lora.gate : lora.up;
    const Buf<bf16>& zs = which == 0 ? s.zs_gate : s.zs_up;
    Segment lora_seg;
    if (p.enabled()) {
      const int64_t ldr = layout::ld_bf16(p.r);
      lora_seg = Segment{zs.data() + off * ldr, ldr, lora_expand_b(p, e, I_, i0, nc, a)};
    }
    weight_gemm(which, e, i0, nc, xe, ldh, n, p.enabled() ? &lora_seg : nullptr, c, nc, a);
    if (const float* b = bias(which, e)) {
      for (int64_t m = 0; m < n; ++m)
        for (int64_t i = 0; i < nc; ++i) c[m * nc + i] += b[i0 + i];
    }
    bf16* dst = which == 0 ? gb : ub;
    for (int64_t m = 0; m < n; ++m) ctx_->kernels().eltwise.to_bf16(c + m * nc, 1.0f, dst + m * ld, nc);
  }
}

void MoeExperts::run_forward(const ForwardArgs& args, Saved& s) {
  Context& ctx = *ctx_;
  const kernels::KernelBundle& k = ctx.kernels();
  const Routing& rt = s.routing;
  const int64_t T = args.T, H = H_, I = I_, rows = rt.rows();
  const int64_t ldh = layout::ld_bf16(H), ldi = layout::ld_bf16(I);
  const LoraSet& lora = args.lora;
  const bool save_gu = options_.activations == ActivationPolicy::kSave;

  // Saved inputs: x as bf16 (the GEMM operand) and the weights as fp32.
  s.x.resize(T * H);
  s.w.resize(T * args.k);
  ctx.parallel_for("fwd.save_inputs", (T + kTokenBlock - 1) / kTokenBlock, [&](int64_t b, Arena&) {
    const int64_t t1 = std::min(T, (b + 1) * kTokenBlock);
    for (int64_t t = b * kTokenBlock; t < t1; ++t) {
      common::row_to_bf16(ctx.kernels().eltwise, static_cast<const char*>(args.x) + t * H * esize(args.x_dtype),
                          args.x_dtype, H, s.x.data() + t * H);
      for (int j = 0; j < args.k; ++j) {
        const int64_t i = t * args.k + j;
        s.w.data()[i] = args.w_dtype == DType::kF32
                            ? static_cast<const float*>(args.topk_weights)[i]
                            : bf16_to_f32(static_cast<const bf16*>(args.topk_weights)[i]);
      }
    }
  });

  auto xg = ctx.workspace<bf16>(layout::kWsX, rows * ldh);
  gather_rows(ctx, rt, s.x.data(), DType::kBf16, H, xg.data(), ldh);

  const int64_t n_active = static_cast<int64_t>(rt.active.size());
  // 2. LoRA reduce for gate / up.
  for (int which = 0; which < 2; ++which) {
    const LoraProj& p = which == 0 ? lora.gate : lora.up;
    if (!p.enabled()) continue;
    Buf<bf16>& zs = which == 0 ? s.zs_gate : s.zs_up;
    const int64_t ldr = layout::ld_bf16(p.r);
    zs.resize(rows * ldr);
    ctx.parallel_for("fwd.lora_reduce_gate_up", n_active, [&](int64_t i, Arena& a) {
      const int e = rt.active[i];
      const int64_t off = rt.offsets[e];
      lora_reduce(k, ctx.kernels().eltwise, p, lora.scaling, e, H, xg.data() + off * ldh, ldh, rt.count(e), a,
                  zs.data() + off * ldr, ldr);
    });
  }

  // 3. gate/up GEMMs + activation.
  bf16* gbuf;
  bf16* ubuf;
  if (save_gu) {
    s.g.resize(rows * ldi);
    s.u.resize(rows * ldi);
    gbuf = s.g.data();
    ubuf = s.u.data();
  } else {
    gbuf = ctx.workspace<bf16>(layout::kWsG, rows * ldi).data();
    ubuf = ctx.workspace<bf16>(layout::kWsU, rows * ldi).data();
  }
  auto hb = ctx.workspace<bf16>(layout::kWsH, rows * ldi);
  const int64_t chI = layout::chunks(I);
  const std::vector<RowBlock> blocks = work_blocks(rt, /*backward=*/false);
  const int64_t n_blocks = static_cast<int64_t>(blocks.size());
  ctx.parallel_for("fwd.gate_up", n_blocks * chI, [&](int64_t task, Arena& a) {
    const RowBlock& blk = blocks[task / chI];
    const int e = blk.e;
    const int64_t i0 = (task % chI) * layout::kChunk, i1 = std::min(I, i0 + layout::kChunk);
    const int64_t off = blk.r0, n = blk.r1 - blk.r0;
    bf16* g = gbuf + off * ldi + i0;
    bf16* u = ubuf + off * ldi + i0;
    gate_up_chunk(lora, e, off, xg.data() + off * ldh, n, s, i0, i1, a, g, u, ldi);
    for (int64_t m = 0; m < n; ++m) {
      bf16* hrow = hb.data() + (off + m) * ldi;
      activate(g + m * ldi, u + m * ldi, hrow + i0, i1 - i0);
      if (i1 == I) std::fill(hrow + I, hrow + ldi, bf16(0));
    }
  });

  // 4. LoRA reduce for down.
  if (lora.down.enabled()) {
    const int64_t ldr = layout::ld_bf16(lora.down.r);
    s.zs_down.resize(rows * ldr);
    ctx.parallel_for("fwd.lora_reduce_down", n_active, [&](int64_t i, Arena& a) {
      const int e = rt.active[i];
      const int64_t off = rt.offsets[e];
      lora_reduce(k, ctx.kernels().eltwise, lora.down, lora.scaling, e, I, hb.data() + off * ldi, ldi, rt.count(e), a,
                  s.zs_down.data() + off * ldr, ldr);
    });
  }

  // 5. down GEMM, fp32 expert-major output.
  auto y = ctx.workspace<float>(layout::kWsY, rows * H);
  const int64_t chH = layout::chunks(H);
  ctx.parallel_for("fwd.down", n_blocks * chH, [&](int64_t task, Arena& a) {
    const RowBlock& blk = blocks[task / chH];
    const int e = blk.e;
    const int64_t h0 = (task % chH) * layout::kChunk, h1 = std::min(H, h0 + layout::kChunk);
    const int64_t off = blk.r0, n = blk.r1 - blk.r0, nc = h1 - h0;
    Segment lora_seg;
    if (lora.down.enabled()) {
      const int64_t ldr = layout::ld_bf16(lora.down.r);
      lora_seg = Segment{s.zs_down.data() + off * ldr, ldr, lora_expand_b(lora.down, e, H, h0, nc, a)};
    }
    weight_gemm(2, e, h0, nc, hb.data() + off * ldi, ldi, n, lora.down.enabled() ? &lora_seg : nullptr,
                y.data() + off * H + h0, H, a);
    if (const float* b = bias(2, e)) {
      for (int64_t m = 0; m < n; ++m) {
        float* yr = y.data() + (off + m) * H;
        for (int64_t h = h0; h < h1; ++h) yr[h] += b[h];
      }
    }
  });

  // 6. weighted combine in slot order (deterministic).
  ctx.parallel_for("fwd.combine", (T + kTokenBlock - 1) / kTokenBlock, [&](int64_t b, Arena& a) {
    float* acc = a.alloc<float>(H);
    const int64_t t1 = std::min(T, (b + 1) * kTokenBlock);
    for (int64_t t = b * kTokenBlock; t < t1; ++t) {
      std::fill(acc, acc + H, 0.0f);
      for (int j = 0; j < args.k; ++j) {
        const int64_t row = rt.row_of[t * args.k + j];
        if (row < 0) continue;
        const float wt = s.w.data()[t * args.k + j];
        const float* yr = y.data() + row * H;
        for (int64_t h = 0; h < H; ++h) acc[h] += wt * yr[h];
      }
      common::store_row(ctx.kernels().eltwise, acc, H,
                        static_cast<char*>(args.out) + t * H * esize(args.out_dtype), args.out_dtype);
    }
  });
}

}  // namespace moetune
