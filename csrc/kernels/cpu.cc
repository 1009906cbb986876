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

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  const bool fma = c & (1u << 12);
  const bool f16c = c & (1u << 29);
  const bool avx = c & (1u << 28);
  if (!osxsave || !avx) return f;
  const uint64_t xcr0 = read_xcr0();
  const bool ymm_os = (xcr0 & 0x6) == 0x6;
  const bool zmm_os = (xcr0 & 0xe6) == 0xe6;
  const bool tile_os = (xcr0 & (3ull << 17)) == (3ull << 17);

  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5);
  const bool avx512f = b & (1u << 16);
  const bool avx512dq = b & (1u << 17);
  const bool avx512bw = b & (1u << 30);
  const bool avx512vl = b & (1u << 31);
  const bool avx512vnni = c & (1u << 11);
  const bool amx_bf16 = d & (1u << 22);
  const bool amx_tile = d & (1u << 24);
  const bool amx_int8 = d & (1u << 25);
  unsigned a1 = 0, b1, c1, d1;
  __cpuid_count(7, 1, a1, b1, c1, d1);
  const bool avx512bf16 = a1 & (1u << 5);

  f.avx2_fma = avx2 && fma && f16c && ymm_os;
  // The AVX-512 units are compiled with F/BW/VL/DQ: require all four.
  const bool avx512 = avx512f && avx512bw && avx512vl && avx512dq && zmm_os;
  f.avx512 = avx512;
  f.avx512_bf16 = avx512 && avx512bf16;
  f.avx512_vnni = avx512 && avx512vnni;
  if (amx_tile && (amx_bf16 || amx_int8)) {
    if (!tile_os) {
      f.notes += "AMX present but XCR0 does not enable tile state; ";
    } else if (request_amx_permission(f.notes)) {
      f.amx_bf16 = amx_bf16;
      f.amx_int8 = amx_int8;
    }
  }
  if ((avx512f && !zmm_os)) f.notes += "AVX-512 present but OS does not save ZMM state; ";
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

bool cpu_supports(Isa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return f.avx2_fma;
    case Isa::kAvx512: return f.avx512;
    case Isa::kAvx512Bf16: return f.avx512_bf16;
    case Isa::kAmxBf16: return f.amx_bf16;
  }
  return false;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAmxBf16: return "amx_bf16";
  }
  return "?";
}

std::string cpu_summary() {
  const CpuFeatures& f = cpu_features();
  std::string s = "avx2_fma=" + std::to_string(f.avx2_fma) +
                  " avx512=" + std::to_string(f.avx512) +
                  " avx512_bf16=" + std::to_string(f.avx512_bf16) +
                  " avx512_vnni=" + std::to_string(f.avx512_vnni) +
                  " amx_bf16=" + std::to_string(f.amx_bf16) +
                  " amx_int8=" + std::to_string(f.amx_int8);
  if (!f.notes.empty()) s += " (" + f.notes + ")";
  return s;
}

}  // namespace moetune::kernels
