#include "cpu.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace moetune::kernels {
namespace {

uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

// Linux: ask for the AMX tile-data state component. Needed once per process
// before the first tile instruction; harmless if already granted.
bool request_amx_permission(std::string& notes) {
#if defined(__linux__)
  constexpr int kArchGetXcompPerm = 0x1022;
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    notes += "AMX present but arch_prctl(ARCH_REQ_XCOMP_PERM) refused (kernel < 5.16?); ";
    return false;
  }
  unsigned long bitmask = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &bitmask) != 0 ||
      !(bitmask & (1ul << kXfeatureXtiledata))) {
    notes += "AMX tile data permission not granted; ";
    return false;
  }
  return true;
#else
  notes += "AMX needs Linux; ";
  return false;
#endif
}

DetectedCpu detect() {
  DetectedCpu cpu;
  RawCpu& raw = cpu.raw;
  unsigned a, b, c, d;
  if (__get_cpuid(1, &a, &b, &c, &d)) {
    raw[FeatureSource::kCpuid1Ecx] = c;
    // XGETBV exists only when the OS has set CR4.OSXSAVE (CPUID.1:ECX[27]).
    if (c & (1u << 27)) raw[FeatureSource::kXcr0] = read_xcr0();
  }
  if (__get_cpuid_max(0, nullptr) >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    raw[FeatureSource::kCpuid7Ebx] = b;
    raw[FeatureSource::kCpuid7Ecx] = c;
    raw[FeatureSource::kCpuid7Edx] = d;
    if (a >= 1) {  // the highest sub-leaf of leaf 7
      __cpuid_count(7, 1, a, b, c, d);
      raw[FeatureSource::kCpuid7s1Eax] = a;
    }
  }
  FeatureSet f = decode_features(raw);
  // Only ask for tile data when the CPU has AMX and the OS saves tile state.
  if (f.has(Feature::kAmxTile) && f.has(Feature::kOsTileState) && request_amx_permission(cpu.notes))
    raw[FeatureSource::kOsGrant] = 1;
  cpu.features = decode_features(raw);
  if (f.has(Feature::kAvx512F) && !f.has(Feature::kOsZmmState))
    cpu.notes += "AVX-512 present but the OS does not save ZMM state; ";
  if (f.has(Feature::kAmxTile) && !f.has(Feature::kOsTileState))
    cpu.notes += "AMX present but XCR0 does not enable tile state; ";
  return cpu;
}

}  // namespace

const DetectedCpu& detected_cpu() {
  static const DetectedCpu cpu = detect();
  return cpu;
}

std::string cpu_summary() {
  const DetectedCpu& cpu = detected_cpu();
  std::string runs;
  for (const IsaInfo& i : kIsas)
    if (isa_runnable(i.id, cpu.features)) runs += (runs.empty() ? "" : " ") + std::string(i.name);
  std::string s = "features: " + feature_names(cpu.features) + "; runs: " + runs;
  if (!cpu.notes.empty()) s += " (" + cpu.notes + ")";
  return s;
}

}  // namespace moetune::kernels
