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

struct KernelBundle {
  Isa isa;
  const char* name;              // the GEMM kernel's name (IsaInfo::gemm_name)
  GemmFn gemm;                   // gemm.h contract
  TransposeFn transpose_packed;  // W^T slices for backward (gemm.h)
  EltwiseKernel eltwise;         // element-wise epilogues (eltwise.h)
  DequantFn dequant;             // quantized weights -> bf16 panels (quant.h)
};

// The bundle of an ISA. Every ISA of the table is compiled in; this does not
// check the CPU (callers check cpu_supports / isa_runnable first).
const KernelBundle& kernels_for(Isa isa);

// The Context's choice: a forced ISA (throws std::runtime_error naming the
// missing features if this CPU/OS cannot run it) or, with nullopt, the
// fastest ISA this CPU runs.
const KernelBundle& select_kernels(std::optional<Isa> forced);

}  // namespace moetune::kernels
