// moetune kernels: one kernel bundle per ISA — everything the engine calls
// that depends on the instruction set, selected once (by the Context).
//
// Each ISA of the table (isa_table.def) has exactly one bundle, built from its
// own unit's GEMM and the units its row names for the W^T repack, the
// element-wise set and the dequant. A bundle may run only where its ISA is
// runnable (isa.h: the requirement covers every unit it uses).
// Thread-safety: bundles are immutable constants with static storage, and
// every function in them is pure (see each contract), so any thread may use
// them concurrently.
#pragma once

#include <optional>

#include "eltwise.h"
#include "gemm.h"
#include "isa.h"
#include "quant.h"

namespace moetune::kernels {

// How wide a column slice of a quantized weight one GEMM task dequantizes
// into a bf16 panel before running the bundle's GEMM on it (the "panels"
// path; quant.h). A fact of the GEMM kernel's blocking: the panel (K x cols
// bf16) should stay in L2 while the kernel multiplies it, and columns beyond
// the kernel's column block buy nothing. Every width gives bit-identical
// results (each column's sum is one kernel pass); dequant_chunk_cols derives
// the width from these two numbers and K.
struct DequantChunk {
  int64_t l2_budget_bytes;  // bf16 panel bytes a task may keep in L2
  int64_t max_cols;         // the GEMM kernel's column block
};
// The narrowest chunk (2 panels: one AVX-512 / AMX register block wide).
inline constexpr int64_t kMinDequantCols = 32;

struct KernelBundle {
  Isa isa;
  const char* name;              // the GEMM kernel's name (IsaInfo::gemm_name)
  GemmFn gemm;                   // gemm.h contract
  TransposeFn transpose_packed;  // W^T slices for backward (gemm.h)
  EltwiseKernel eltwise;         // element-wise epilogues (eltwise.h)
  DequantFn dequant;             // quantized weights -> bf16 panels (quant.h)
  DequantChunk dequant_chunk;    // the panels path's slice width (above)
  QuantGemmFn quant_gemm;        // fused dequant + GEMM (quant.h), or nullptr: none
  DequantTFn dequant_t;          // fused dequant + W^T repack (quant.h), or nullptr: none
};

// Columns per dequantized slice of an operand with K rows: the widest
// multiple of 16 whose packed bf16 panel (packed_kp(K) x cols x 2 bytes)
// fits the bundle's L2 budget, within [kMinDequantCols, max_cols].
int64_t dequant_chunk_cols(const KernelBundle& k, int64_t K);

// The bundle of an ISA. Every ISA of the table is compiled in; this does not
// check the CPU (callers check cpu_supports / isa_runnable first).
const KernelBundle& kernels_for(Isa isa);

// The Context's choice: a forced ISA (throws std::runtime_error naming the
// missing features if this CPU/OS cannot run it) or, with nullopt, the
// fastest ISA this CPU runs.
const KernelBundle& select_kernels(std::optional<Isa> forced);

}  // namespace moetune::kernels
