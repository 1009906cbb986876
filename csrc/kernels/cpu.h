// moetune kernels: what this CPU and OS let us run, decided once.
//
// Detection reads CPUID leaves 1 and 7 (sub-leaves 0 and 1) and XCR0 (the OS
// must save the wider register state: YMM for AVX2, opmask + ZMM for AVX-512,
// tile config + data for AMX) into a RawCpu, and for AMX asks Linux for
// permission to use tile data (arch_prctl(ARCH_REQ_XCOMP_PERM,
// XFEATURE_XTILEDATA)); decode_features (isa.h) turns those bits into
// features. An ISA runs iff every feature it requires is present
// (isa_runnable), so a feature the CPU has but the OS refuses makes the ISAs
// needing it unrunnable, and no kernel can SIGILL.
#pragma once

#include <string>

#include "isa.h"

namespace moetune::kernels {

struct DetectedCpu {
  RawCpu raw;           // the words read (see FeatureSource)
  FeatureSet features;  // decode_features(raw)
  std::string notes;    // why something the CPU has was turned off, if anything
};

// Computed on first use (thread-safe static init), then constant.
const DetectedCpu& detected_cpu();
inline FeatureSet cpu_features() { return detected_cpu().features; }
inline bool cpu_supports(Isa isa) { return isa_runnable(isa, cpu_features()); }
// "features: ...; runs: scalar avx2 ..." plus the notes, for logs and `moetune info`.
std::string cpu_summary();

}  // namespace moetune::kernels
