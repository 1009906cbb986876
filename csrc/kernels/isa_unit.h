// Private: the compile-time check every per-ISA translation unit makes.
//
//   #include "isa_unit.h"
//   MOETUNE_ISA_UNIT(avx512);   // this file is part of the avx512 unit
//
// fails to compile unless the CPU features the compiler enabled for this file
// (its predefined macros: __AVX512F__, ...) include every compiler feature of
// the unit's row in isa_table.def (CMake applied the table's flags) and lie
// within the ISA's required features (nothing the CPU check does not ask for
// can be emitted here: the rule that makes a runnable ISA SIGILL-free).
// Features outside the table (SSE4.2 etc.) are below AVX and not checked.
#pragma once

#include <string_view>

#include "isa.h"

#define MOETUNE_ISA_UNIT_STR_(x) #x
#define MOETUNE_ISA_UNIT_XSTR_(x) MOETUNE_ISA_UNIT_STR_(x)

namespace moetune::kernels {
namespace {  // internal linkage: the value differs per translation unit

// A feature's macro expands to 1 when the compiler enables it, else it stays
// its own name (or `none` for OS state).
constexpr FeatureSet unit_compiled_features() {
  FeatureSet s;
#define MOETUNE_ISA(...)
#define MOETUNE_FEATURE(id, name, flag, macro, ...) \
  if (std::string_view(MOETUNE_ISA_UNIT_XSTR_(macro)) == "1") s = s.with(Feature::id);
#include "isa_table.def"
#undef MOETUNE_FEATURE
#undef MOETUNE_ISA
  return s;
}

constexpr FeatureSet compiler_features_of(FeatureSet s) {
  FeatureSet out;
  for (const FeatureInfo& f : kFeatures)
    if (s.has(f.id) && *f.flag) out = out.with(f.id);
  return out;
}

}  // namespace
}  // namespace moetune::kernels

#define MOETUNE_ISA_UNIT(unit)                                                                     \
  static_assert(::moetune::kernels::unit_compiled_features().contains(                             \
                    ::moetune::kernels::compiler_features_of(                                      \
                        ::moetune::kernels::isa_with_unit(#unit).features)),                       \
                "this file is not compiled with its ISA's flags (isa_table.def, CMakeLists.txt)"); \
  static_assert(::moetune::kernels::isa_with_unit(#unit).required.contains(                        \
                    ::moetune::kernels::unit_compiled_features()),                                 \
                "this file is compiled for CPU features its ISA does not require: a global "       \
                "-m/-march flag, or a flag implication missing from isa_table.def")
