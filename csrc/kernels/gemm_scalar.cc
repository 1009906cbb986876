// The reference kernel: plain loops over the packed layout, fp32 accumulate in
// K order. Always built, runs anywhere, and is the oracle the SIMD kernels are
// tested against. Not meant to be fast.
#include "gemm_impl.h"
#include "isa_unit.h"

MOETUNE_ISA_UNIT(scalar);

namespace moetune::kernels::scalar {

void gemm(int64_t M, int64_t n_begin, int64_t n_end, const Segment* segs, int nseg, float* C,
          int64_t ldc, bool accumulate) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n_begin; n < n_end; ++n) {
      float acc = accumulate ? C[m * ldc + n] : 0.0f;
      for (int s = 0; s < nseg; ++s) {
        const Segment& sg = segs[s];
        const bf16* panel = sg.B.panel(n / kPanelN);
        const int64_t col = n % kPanelN;
        for (int64_t k = 0; k < sg.B.K; ++k) {
          const float a = bf16_to_f32(sg.A[m * sg.lda + k]);
          const float b = bf16_to_f32(panel[(k / 2) * 2 * kPanelN + col * 2 + (k % 2)]);
          acc += a * b;
        }
      }
      C[m * ldc + n] = acc;
    }
  }
}

}  // namespace moetune::kernels::scalar
