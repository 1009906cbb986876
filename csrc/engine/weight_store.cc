#include "engine/weight_store.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

namespace moetune {

using kernels::bf16;
using kernels::PackedB;
using kernels::QuantB;

namespace {

// Element (k, n) of a packed operand (the kernels/gemm.h panel layout).
bf16 packed_at(const PackedB& b, int64_t k, int64_t n) {
  return b.panel(
      n / kernels::kPanelN)[(k / 2) * 2 * kernels::kPanelN + (n % kernels::kPanelN) * 2 + (k % 2)];
}

void check_dtype(DType dtype, const char* what) {
  if (dtype != DType::kBf16 && dtype != DType::kF32) {
    throw std::invalid_argument(std::string("moetune: ") + what +
                                " must be bfloat16 or float32, got " + dtype_name(dtype));
  }
}

}  // namespace

const char* WeightStore::kind_name(Kind k) {
  switch (k) {
    case Kind::kBf16:
      return "bf16";
    case Kind::kQ:
      return "q";
    case Kind::kScales:
      return "scales";
    case Kind::kTransposedBf16:
      return "transposed_bf16";
  }
  return "?";
}

WeightStore::Layout WeightStore::layout_for(int E, int H, int I, const ExpertsOptions& options) {
  if (E < 1 || H < 1 || I < 1) {
    throw std::invalid_argument("moetune: experts need E, H, I >= 1, got E=" + std::to_string(E) +
                                " H=" + std::to_string(H) + " I=" + std::to_string(I));
  }
  options.validate();
  const kernels::QuantSpec spec = options.quant_spec();
  Layout l;
  for (Proj p : kAllProjs) {
    const int64_t K = p == Proj::kDown ? I : H, N = p == Proj::kDown ? H : I;
    size_t* s = l.stride[idx(p)];
    if (spec.format == kernels::WeightFormat::kBf16) {
      s[int(Kind::kBf16)] = kernels::packed_elems(K, N) * sizeof(bf16);
    } else {
      s[int(Kind::kQ)] = kernels::quant_q_bytes(spec, K, N);
      s[int(Kind::kScales)] = kernels::quant_scale_bytes(spec, K, N);
    }
    if (options.backward_weights == BackwardWeights::kTransposedCopy)
      s[int(Kind::kTransposedBf16)] = kernels::packed_elems(N, K) * sizeof(bf16);
  }
  return l;
}

size_t WeightStore::bytes_for(int E, int H, int I, const ExpertsOptions& options) {
  const Layout l = layout_for(E, H, I, options);
  size_t per_expert = 0;
  for (const auto& proj : l.stride)
    for (size_t s : proj) per_expert += s;
  return per_expert * size_t(E);
}

size_t WeightStore::bias_bytes_for(int E, int H, int I) {
  return size_t(E) * (2 * size_t(I) + size_t(H)) * sizeof(float);
}

WeightStore::WeightStore(int E, int H, int I, const ExpertsOptions& options,
                         const kernels::KernelBundle& kernels)
    : E_(E),
      H_(H),
      I_(I),
      spec_(options.quant_spec()),
      transposed_copy_(options.backward_weights == BackwardWeights::kTransposedCopy),
      tiles_(options.dequant_path == DequantPath::kTiles),
      dequant_cols_(options.dequant_cols),
      kernels_(&kernels),
      layout_(layout_for(E, H, I, options)),
      loaded_(new std::atomic<uint8_t>[size_t(E)]) {
  for (int p = 0; p < 3; ++p)
    for (int k = 0; k < kKinds; ++k)
      buf_[p][k].resize(layout_.stride[p][k] * size_t(E), kBufferAlign);
  for (int e = 0; e < E; ++e) loaded_[e].store(0, std::memory_order_relaxed);
}

void WeightStore::mark_all_loaded() {
  for (int e = 0; e < E_; ++e) loaded_[e].store(1, std::memory_order_release);
}

size_t WeightStore::weight_bytes() const {
  size_t b = 0;
  for (const auto& proj : buf_)
    for (const Buf<uint8_t>& buf : proj) b += buf.bytes();
  return b;
}

size_t WeightStore::bias_bytes() const {
  return bias_[0].bytes() + bias_[1].bytes() + bias_[2].bytes();
}

std::vector<WeightStore::Buffer> WeightStore::buffers() {
  std::vector<Buffer> out;
  for (Proj p : kAllProjs) {
    for (int k = 0; k < kKinds; ++k) {
      Buf<uint8_t>& b = buf_[idx(p)][k];
      if (!b.bytes()) continue;
      const Kind kind = static_cast<Kind>(k);
      const Dims d = dims(p);
      const bool t = kind == Kind::kTransposedBf16;
      out.push_back(Buffer{std::string(proj_name(p)) + "." + kind_name(kind), p, kind, b.data(),
                           b.bytes(), layout_.stride[idx(p)][k], t ? d.N : d.K, t ? d.K : d.N});
    }
  }
  return out;
}

QuantB WeightStore::quant(Proj p, int e) const {
  const Dims d = dims(p);
  return QuantB{spec_, at<uint8_t>(p, Kind::kQ, e), at<uint8_t>(p, Kind::kScales, e), d.K, d.N};
}

PackedB WeightStore::fwd(Proj p, int e) const {
  const Dims d = dims(p);
  return PackedB{at<bf16>(p, Kind::kBf16, e), d.K, d.N};
}

PackedB WeightStore::bwd(Proj p, int e) const {
  const Dims d = dims(p);
  return PackedB{at<bf16>(p, Kind::kTransposedBf16, e), d.N, d.K};
}

int64_t WeightStore::dequant_cols(int64_t K) const {
  return dequant_cols_ > 0 ? dequant_cols_ : kernels::dequant_chunk_cols(*kernels_, K);
}

bool WeightStore::prepares_slices(bool backward) const {
  return quantized() || (backward && !transposed_copy_);
}

void WeightStore::load_expert(int e, const void* gate, const void* up, const void* down,
                              DType dtype) {
  if (e < 0 || e >= E_) {
    throw std::invalid_argument("moetune: expert id " + std::to_string(e) + " outside [0, " +
                                std::to_string(E_) + ")");
  }
  check_dtype(dtype, "expert weights");
  // Not loaded until every buffer is rewritten (a failed reload leaves it so).
  loaded_[e].store(0, std::memory_order_release);
  const kernels::SrcType st = src_type(dtype);
  const void* src[3] = {gate, up, down};
  // HF layout is [out, in] = [N, K] for the forward product x W^T.
  for (Proj p : kAllProjs) {
    const Dims d = dims(p);
    const void* w = src[idx(p)];
    if (quantized()) {
      kernels::quantize_pack(w, st, d.K, d.K, d.N, spec_, at<uint8_t>(p, Kind::kQ, e),
                             at<uint8_t>(p, Kind::kScales, e),
                             std::string(proj_name(p)) + "_proj of expert " + std::to_string(e));
      fill_transposed_copy(p, e);
      continue;
    }
    kernels::pack_b(w, st, d.K, /*kn=*/false, d.K, 0, d.N, 1.0f, at<bf16>(p, Kind::kBf16, e));
    if (transposed_copy_) {
      // Backward multiplies by W itself: [out, in] read as [K = out, N = in].
      kernels::pack_b(w, st, d.K, /*kn=*/true, d.N, 0, d.K, 1.0f,
                      at<bf16>(p, Kind::kTransposedBf16, e));
    }
  }
  loaded_[e].store(1, std::memory_order_release);
}

void WeightStore::fill_transposed_copy(Proj p, int e) {
  if (!transposed_copy_) return;
  // bf16 dq(q(W))^T: the same values the repack path would make.
  const Dims d = dims(p);
  Buf<bf16> tmp(static_cast<size_t>(kernels::packed_elems(d.K, d.N)));
  kernels_->dequant(quant(p, e), 0, d.N, 0, d.K, tmp.data());
  kernels_->transpose_packed(PackedB{tmp.data(), d.K, d.N}, 0, d.K,
                             at<bf16>(p, Kind::kTransposedBf16, e));
}

void WeightStore::load_expert_published(int e, const PublishedWeight (&w)[3]) {
  if (e < 0 || e >= E_) {
    throw std::invalid_argument("moetune: expert id " + std::to_string(e) + " outside [0, " +
                                std::to_string(E_) + ")");
  }
  loaded_[e].store(0, std::memory_order_release);  // as load_expert: loaded once all is rewritten
  for (Proj p : kAllProjs) {
    const Dims d = dims(p);
    const PublishedWeight& src = w[idx(p)];
    kernels::pack_published(spec_, d.K, d.N, src.codes, src.code_ld, src.scales, src.scale_src,
                            src.scale_ld, at<uint8_t>(p, Kind::kQ, e),
                            at<uint8_t>(p, Kind::kScales, e),
                            std::string(proj_name(p)) + "_proj of expert " + std::to_string(e));
    fill_transposed_copy(p, e);
  }
  loaded_[e].store(1, std::memory_order_release);
}

void WeightStore::load_biases(const void* gate, const void* up, const void* down, DType dtype) {
  check_dtype(dtype, "expert biases");
  const void* src[3] = {gate, up, down};
  for (Proj p : kAllProjs) {
    Buf<float>& b = bias_[idx(p)];
    if (!src[idx(p)]) {
      b.clear();
      continue;
    }
    const size_t n = static_cast<size_t>(E_) * dims(p).N;
    b.resize(n);
    if (dtype == DType::kF32) {
      std::memcpy(b.data(), src[idx(p)], n * sizeof(float));
    } else {
      const bf16* s = static_cast<const bf16*>(src[idx(p)]);
      for (size_t i = 0; i < n; ++i) b.data()[i] = kernels::bf16_to_f32(s[i]);
    }
  }
}

void WeightStore::unpack_expert(int e, bf16* gate, bf16* up, bf16* down) const {
  if (e < 0 || e >= E_) {
    throw std::invalid_argument("moetune: expert id " + std::to_string(e) + " outside [0, " +
                                std::to_string(E_) + ")");
  }
  bf16* dst[3] = {gate, up, down};
  for (Proj p : kAllProjs) {
    const Dims d = dims(p);
    Buf<bf16> tmp;
    PackedB src;
    if (quantized()) {
      tmp.resize(static_cast<size_t>(kernels::packed_elems(d.K, d.N)));
      kernels::kernels_for(kernels::Isa::kScalar).dequant(quant(p, e), 0, d.N, 0, d.K, tmp.data());
      src = PackedB{tmp.data(), d.K, d.N};
    } else {
      src = fwd(p, e);
    }
    bf16* out = dst[idx(p)];  // [N = out, K = in]
    for (int64_t n = 0; n < d.N; ++n)
      for (int64_t k = 0; k < d.K; ++k) out[n * d.K + k] = packed_at(src, k, n);
  }
}

void WeightStore::weight_gemm(Proj p, int e, int64_t n0, int64_t nc, const bf16* A, int64_t lda,
                              int64_t M, const kernels::Segment* extra, float* C, int64_t ldc,
                              Arena& a) const {
  kernels::Segment seg[2];
  const int nseg = extra ? 2 : 1;
  if (!quantized()) {
    seg[0] = kernels::Segment{A, lda, kernels::packed_slice(fwd(p, e), n0, nc)};
    if (extra) seg[1] = *extra;
    kernels_->gemm(M, 0, nc, seg, nseg, C, ldc, false);
    return;
  }
  const QuantB q = quant(p, e);
  if (fused_dequant()) {
    kernels_->quant_gemm(M, 0, nc, A, lda, kernels::quant_slice(q, n0, nc), extra, nseg - 1, C,
                         ldc);
    return;
  }
  const int64_t cols = dequant_cols(q.K);
  bf16* panel = a.alloc<bf16>(kernels::packed_elems(q.K, std::min(nc, cols)));
  for (int64_t c0 = 0; c0 < nc; c0 += cols) {
    const int64_t w = std::min(cols, nc - c0);
    kernels_->dequant(q, n0 + c0, n0 + c0 + w, 0, q.K, panel);
    seg[0] = kernels::Segment{A, lda, PackedB{panel, q.K, w}};
    if (extra)
      seg[1] = kernels::Segment{extra->A, extra->lda, kernels::packed_slice(extra->B, c0, w)};
    kernels_->gemm(M, 0, w, seg, nseg, C + c0, ldc, false);
  }
}

PackedB WeightStore::bwd_slice(Proj p, int e, int64_t n0, int64_t n, Arena& a) const {
  if (transposed_copy_) return kernels::packed_slice(bwd(p, e), n0, n);
  const PackedB src = fwd(p, e);
  bf16* dst = a.alloc<bf16>(kernels::packed_elems(src.N, n));
  kernels_->transpose_packed(src, n0, n0 + n, dst);
  return PackedB{dst, src.N, n};
}

void WeightStore::weight_t_gemm(const Proj* which, int nw, int e, int64_t n0, int64_t nc,
                                kernels::Segment* segs, int nseg, int64_t M, float* C, int64_t ldc,
                                Arena& a) const {
  if (!quantized() || transposed_copy_) {
    for (int j = 0; j < nw; ++j) segs[j].B = bwd_slice(which[j], e, n0, nc, a);
    kernels_->gemm(M, 0, nc, segs, nseg, C, ldc, false);
    return;
  }
  // W^T columns [n0+c0, +w) are W's K rows: the bundle's fused
  // dequantize-and-transpose where it has one, else dequantize them into
  // rows[j] and transpose that (the same values either way). Per column a
  // task holds nw transposed rows (N bf16 each), plus as many dequantized
  // ones when not fused: that is what the L2 budget sees.
  const bool fused = kernels_->dequant_t != nullptr;
  const int64_t cols = dequant_cols((fused ? 1 : 2) * nw * dims(which[0]).N);
  const int64_t wmax = std::min(nc, cols);
  bf16* rows[kernels::kMaxSegments];
  bf16* tr[kernels::kMaxSegments];
  for (int j = 0; j < nw; ++j) {
    const int64_t N = dims(which[j]).N;
    rows[j] = fused ? nullptr : a.alloc<bf16>(kernels::packed_elems(wmax, N));
    tr[j] = a.alloc<bf16>(kernels::packed_elems(N, wmax));
  }
  kernels::Segment local[kernels::kMaxSegments];
  for (int64_t c0 = 0; c0 < nc; c0 += cols) {
    const int64_t w = std::min(cols, nc - c0);
    for (int j = 0; j < nw; ++j) {
      const QuantB q = quant(which[j], e);
      if (fused) {
        kernels_->dequant_t(q, n0 + c0, n0 + c0 + w, tr[j]);
      } else {
        kernels_->dequant(q, 0, q.N, n0 + c0, n0 + c0 + w, rows[j]);
        kernels_->transpose_packed(PackedB{rows[j], w, q.N}, 0, w, tr[j]);
      }
      local[j] = kernels::Segment{segs[j].A, segs[j].lda, PackedB{tr[j], q.N, w}};
    }
    for (int j = nw; j < nseg; ++j)
      local[j] = kernels::Segment{segs[j].A, segs[j].lda, kernels::packed_slice(segs[j].B, c0, w)};
    kernels_->gemm(M, 0, w, local, nseg, C + c0, ldc, false);
  }
}

}  // namespace moetune
