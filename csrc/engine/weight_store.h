// moetune engine: the frozen weights of one layer's routed experts — packed
// (or quantized) once at load, optional biases, and the weight GEMMs the
// forward and backward passes run on them. Knows nothing of routing, jobs or
// saved activations (MoeExperts owns one of these and does that).
//
// Buffers, per projection p (gate, up, down; kernels' forward operand
// [K = in, N = out]: gate, up [H, I], down [I, H]). Each holds E experts
// back to back, expert e at bytes [e * stride, (e + 1) * stride) with the
// per-expert stride of buffers(); which exist depends on the options:
//   "<p>.bf16"             bf16 format: the forward operand, packed
//                          (kernels/gemm.h panel layout)
//   "<p>.q", "<p>.scales"  quantized formats (int8, int4, fp8_block, mxfp4):
//                          that operand's codes and scales (kernels/quant.h
//                          packed layout; scale bytes per kernels/weight_format.h)
//   "<p>.transposed_bf16"  BackwardWeights::kTransposedCopy: the backward
//                          operand W itself, [K = out, N = in], packed bf16
//                          (for int8 / int4 the dequantized dq(q(W)))
// Every buffer starts on a page (kBufferAlign) and spans whole pages, so a GPU
// runtime can page-lock exactly these buffers in place (cudaHostRegister)
// without also locking a neighbouring allocation (a copy from memory that is
// only partly registered fails); bytes() and the strides stay exact.
// The layout version is kernels::kPackedLayoutVersion. bytes_for() computes
// the total from the same per-buffer strides the constructor allocates, so
// weight_bytes() == bytes_for(E, H, I, options) by construction, without
// allocating anything. Biases (fp32 gate, up [E, I], down [E, H]; each present
// or not) are not part of it: bias_bytes().
//
// Thread-safety: the const methods (GEMMs, unpack_expert) may run from any
// number of threads at once; they write only into their arguments and the
// caller's arena. load_expert of distinct experts may run concurrently.
// Loading weights or biases, or writing through buffers(), while anything
// reads the weights is the caller's error.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/arena.h"
#include "engine/buffer.h"
#include "engine/moe_types.h"
#include "kernels/gemm.h"
#include "kernels/kernel_bundle.h"
#include "kernels/quant.h"
#include "kernels/quant_published.h"

namespace moetune {

class WeightStore {
 public:
  // What one buffer of a projection holds (see the header comment).
  enum class Kind : int { kBf16 = 0, kQ = 1, kScales = 2, kTransposedBf16 = 3 };
  static constexpr int kKinds = 4;
  static constexpr size_t kBufferAlign = 4096;  // weight buffers start on, and fill, whole pages
  static const char* kind_name(Kind k);         // "bf16" | "q" | "scales" | "transposed_bf16"

  // Validates the shape (E, H, I >= 1) and options (ExpertsOptions::validate;
  // std::invalid_argument), then allocates every buffer (uninitialised: load
  // every expert before use). kernels: the bundle of the Context this store
  // serves (a static constant; the store keeps a pointer).
  WeightStore(int E, int H, int I, const ExpertsOptions& options,
              const kernels::KernelBundle& kernels);
  WeightStore(const WeightStore&) = delete;
  WeightStore& operator=(const WeightStore&) = delete;

  // Host bytes of the weight buffers for these shapes and options (the same
  // checks as the constructor); the constructor allocates exactly this.
  static size_t bytes_for(int E, int H, int I, const ExpertsOptions& options);
  // Host bytes of all three biases (fp32 [E, I], [E, I], [E, H]).
  static size_t bias_bytes_for(int E, int H, int I);

  int E() const { return E_; }
  int H() const { return H_; }
  int I() const { return I_; }
  const kernels::QuantSpec& quant_spec() const { return spec_; }
  bool quantized() const { return spec_.format != kernels::WeightFormat::kBf16; }
  size_t weight_bytes() const;
  size_t bias_bytes() const;

  // Every allocated weight buffer (biases excluded): a stable name
  // "<proj>.<kind>", its memory, total and per-expert bytes, and the [K, N]
  // of the packed operand it holds per expert. For a disk cache (byte for
  // byte) and for streaming one expert's bytes elsewhere.
  struct Buffer {
    std::string name;
    Proj proj;
    Kind kind;
    void* data;
    size_t bytes;
    size_t per_expert_bytes;
    int64_t K, N;
  };
  std::vector<Buffer> buffers();

  // Packs (bf16) or quantizes expert e from HF rows: gate/up [I, H], down
  // [H, I], bf16 (bit-exact) or f32 (rounded to bf16 / quantized from f32).
  // Marks e loaded once every buffer of it is written.
  void load_expert(int e, const void* gate, const void* up, const void* down, DType dtype);
  // One projection's published codes and scales (kernels/quant_published.h
  // gives the layouts per format); strides in bytes (codes) / elements (scales).
  struct PublishedWeight {
    const uint8_t* codes;
    int64_t code_ld;
    const void* scales;
    kernels::ScaleSrc scale_src;
    int64_t scale_ld;
  };
  // Expert e from a checkpoint's own quantized codes and scales (gate, up,
  // down in that order), kept bit for bit in this store's format (which must
  // be the published one: fp8_block, mxfp4 or int4). Throws
  // std::invalid_argument naming the projection, expert and element for a bad
  // code or scale. Callers check the arrays' shapes (published_scale_shape).
  void load_expert_published(int e, const PublishedWeight (&w)[3]);
  // The loaded mask: the buffers are allocated uninitialised, so compute on
  // an expert never loaded would read garbage (MoeExperts refuses it).
  // mark_all_loaded: every buffer was filled through buffers() (a disk cache).
  bool loaded(int e) const { return loaded_[e].load(std::memory_order_acquire) != 0; }
  void mark_all_loaded();
  // gate, up [E, I], down [E, H], bf16 or f32, kept as fp32; nullptr = that
  // bias absent (replacing an earlier one).
  void load_biases(const void* gate, const void* up, const void* down, DType dtype);
  bool has_bias(Proj p) const { return bias_[idx(p)].size() != 0; }
  // Bias row of expert e ([I] for gate/up, [H] for down), nullptr when absent.
  const float* bias(Proj p, int e) const {
    return has_bias(p) ? bias_[idx(p)].data() + int64_t(e) * dims(p).N : nullptr;
  }

  // The bf16 values the GEMMs use for expert e, in HF [out, in] rows: gate,
  // up [I, H], down [H, I]: W for bf16, dq(q(W)) for int8 / int4. Scalar code
  // (the oracle), for tests, merges and exports, not the hot path.
  void unpack_expert(int e, kernels::bf16* gate, kernels::bf16* up, kernels::bf16* down) const;

  // Whether a GEMM task prepares per-weight-slice data (dequantization, or
  // in backward the W^T repack), which larger row groups share.
  bool prepares_slices(bool backward) const;

  // C[M, 0:nc] = A * W(p, e)[:, n0:n0+nc] (+ `extra`, a segment whose B
  // covers the same nc columns, e.g. a LoRA expand), overwriting C. Quantized
  // formats: with DequantPath::kTiles and a bundle that has a fused kernel
  // (quant_gemm), that kernel; else dequantize and multiply dequant_cols(K)
  // columns at a time, so the bf16 panel stays L2-resident. Every column's
  // sum is the same single kernel pass as the bf16 path (bit-identical
  // results for every path and width).
  void weight_gemm(Proj p, int e, int64_t n0, int64_t nc, const kernels::bf16* A, int64_t lda,
                   int64_t M, const kernels::Segment* extra, float* C, int64_t ldc, Arena& a) const;
  // C[M, 0:nc] = sum_j segs[j].A * W(which[j], e)^T[:, n0:n0+nc] for j < nw,
  // plus segs[nw..nseg) whose B cover the same nc columns; overwrites C.
  // segs[j].B for j < nw is set here. Quantized formats with kRepack work
  // dequant_cols(N of W) columns at a time (dequantize those K rows,
  // transpose), so the bf16 panels stay L2-sized; results are bit-identical
  // to one call.
  void weight_t_gemm(const Proj* which, int nw, int e, int64_t n0, int64_t nc,
                     kernels::Segment* segs, int nseg, int64_t M, float* C, int64_t ldc,
                     Arena& a) const;

  // The forward operand [K = in, N = out] of projection p.
  struct Dims {
    int64_t K, N;
  };
  Dims dims(Proj p) const { return p == Proj::kDown ? Dims{I_, H_} : Dims{H_, I_}; }

  // Columns per dequantized slice of an operand with K rows: the
  // dequant_cols option, or with 0 the kernel bundle's (dequant_chunk_cols).
  int64_t dequant_cols(int64_t K) const;
  // Whether weight_gemm runs the bundle's fused quantized kernel.
  bool fused_dequant() const { return quantized() && tiles_ && kernels_->quant_gemm; }

 private:
  // Per-expert bytes of every buffer (0 = not allocated), [proj][kind].
  struct Layout {
    size_t stride[3][kKinds] = {};
  };
  // Checks E, H, I >= 1 and the options (std::invalid_argument), then gives
  // the strides for them: the one size computation of this class.
  static Layout layout_for(int E, int H, int I, const ExpertsOptions& options);

  // Expert e's part of buffer (p, k), typed.
  template <typename T>
  const T* at(Proj p, Kind k, int e) const {
    return reinterpret_cast<const T*>(buf_[idx(p)][int(k)].data() +
                                      size_t(e) * layout_.stride[idx(p)][int(k)]);
  }
  template <typename T>
  T* at(Proj p, Kind k, int e) {
    return reinterpret_cast<T*>(buf_[idx(p)][int(k)].data() +
                                size_t(e) * layout_.stride[idx(p)][int(k)]);
  }
  // kTransposedCopy: fills expert e's copy of projection p from its quantized buffers.
  void fill_transposed_copy(Proj p, int e);
  kernels::PackedB fwd(Proj p, int e) const;   // bf16 format
  kernels::QuantB quant(Proj p, int e) const;  // int8 / int4
  kernels::PackedB bwd(Proj p, int e) const;   // kTransposedCopy
  // W(p, e)^T columns [n0, n0+n) for backward: a view of the transposed copy
  // or, with kRepack (bf16 format), a repack into the arena.
  kernels::PackedB bwd_slice(Proj p, int e, int64_t n0, int64_t n, Arena& a) const;

  int E_, H_, I_;
  kernels::QuantSpec spec_;
  bool transposed_copy_;
  bool tiles_;                            // DequantPath::kTiles
  int dequant_cols_;                      // the option (0 = auto)
  const kernels::KernelBundle* kernels_;  // the Context's choice (weight GEMMs, repack, dequant)
  Layout layout_;
  Buf<uint8_t> buf_[3][kKinds];
  Buf<float> bias_[3];  // [E, I], [E, I], [E, H] fp32; empty = absent
  // [E]: expert e fully written (distinct experts load concurrently: atomics).
  std::unique_ptr<std::atomic<uint8_t>[]> loaded_;
};

}  // namespace moetune
