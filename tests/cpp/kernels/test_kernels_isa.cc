// The ISA table (csrc/kernels/isa_table.def, isa.h): what each ISA requires,
// which ISA a given CPU runs (on made-up CPUs: the rules must hold on
// machines we do not have), decoding CPUID/XCR0 bits, the detected CPU, the
// isa parser, the Context's selection and the kernel bundles.
//
// Defect 2 of issue 10: AMX used to be enabled on AMX-BF16 alone, but its
// kernel also runs AVX512-BF16 (K tails, small-r LoRA) and AVX-512 F/BW code
// (packing, element-wise, dequant); a VM exposing AMX but masking AVX512-BF16
// would SIGILL. AmxNeedsEverythingItsCodeRuns and
// DecodeFeatures.VmMaskingAvx512Bf16 pin the fix.

#include <gtest/gtest.h>

#include <initializer_list>
#include <set>

#include "kernel_test_support.h"

namespace moetune::kernel_test {
namespace {

using F = mk::Feature;
using mk::FeatureSet;
using mk::Isa;

FeatureSet set_of(std::initializer_list<F> fs, FeatureSet base = {}) {
  for (F f : fs) base = base.with(f);
  return base;
}

// Made-up CPUs, spelled out here (not read from the table).
const FeatureSet kNoSimd = {};
const FeatureSet kAvx2Cpu =
    set_of({F::kAvx, F::kAvx2, F::kFma, F::kF16c, F::kPopcnt, F::kOsYmmState});
const FeatureSet kSkylakeSp =
    set_of({F::kAvx512F, F::kAvx512Dq, F::kAvx512Bw, F::kAvx512Vl, F::kOsZmmState}, kAvx2Cpu);
const FeatureSet kCooperLake = set_of({F::kAvx512Bf16, F::kAvx512Vnni}, kSkylakeSp);
const FeatureSet kSapphireRapids = set_of(
    {F::kAmxTile, F::kAmxBf16, F::kAmxInt8, F::kOsTileState, F::kAmxPermission}, kCooperLake);

// ---------------------------------------------------------------------------
// What each ISA requires
// ---------------------------------------------------------------------------

// The implication table, spelled out: an ISA requires every feature of the
// instructions its bundle can execute, and the OS state behind them.
TEST(IsaTable, RequirementsSpelledOut) {
  const FeatureSet avx2 = kAvx2Cpu;
  const FeatureSet avx512 =
      set_of({F::kAvx512F, F::kAvx512Bw, F::kAvx512Vl, F::kAvx512Dq, F::kOsZmmState},
             avx2);  // -mavx512f implies AVX2 code
  const FeatureSet avx512_bf16 = set_of({F::kAvx512Bf16}, avx512);
  const FeatureSet amx =
      set_of({F::kAmxTile, F::kAmxBf16, F::kOsTileState, F::kAmxPermission}, avx512_bf16);
  const std::pair<Isa, FeatureSet> want[] = {{Isa::kScalar, kNoSimd},
                                             {Isa::kAvx2, avx2},
                                             {Isa::kAvx512, avx512},
                                             {Isa::kAvx512Bf16, avx512_bf16},
                                             {Isa::kAmxBf16, amx}};
  ASSERT_EQ(mk::kIsaCount, 5) << "a new ISA: add its expected requirement here";
  for (const auto& [isa, req] : want)
    EXPECT_EQ(mk::isa_info(isa).required, req) << mk::isa_name(isa);
}

// The closure rule itself, for every row: an ISA requires its own features
// and the OS state they need, what the ISAs it includes require, and what the
// units its bundle borrows code from require.
TEST(IsaTable, RequirementCoversOwnIncludedAndBorrowedCode) {
  for (const mk::IsaInfo& i : mk::kIsas) {
    SCOPED_TRACE(i.name);
    EXPECT_TRUE(i.required.contains(i.features));
    for (const mk::FeatureInfo& f : mk::kFeatures)
      if (i.required.has(f.id))
        EXPECT_TRUE(i.required.contains(mk::isa_detail::parse_features(f.needs))) << f.name;
    for (const char* unit : {i.unit, i.transpose_unit, i.eltwise_unit, i.dequant_unit})
      EXPECT_TRUE(i.required.contains(mk::isa_with_unit(unit).required)) << "unit " << unit;
    std::string inc = i.includes;
    for (size_t p = 0; !inc.empty(); inc = p == std::string::npos ? "" : inc.substr(p + 1)) {
      p = inc.find(' ');
      const std::string name = inc.substr(0, p);
      const std::optional<Isa> other = mk::parse_isa(name);
      ASSERT_TRUE(other.has_value()) << name;
      EXPECT_TRUE(i.required.contains(mk::isa_info(*other).required)) << "includes " << name;
    }
  }
}

TEST(IsaTable, RowsInOrderAndNamesUnique) {
  std::set<std::string> names, units, gemms;
  int row = 0;
  for (const mk::IsaInfo& i : mk::kIsas) {
    EXPECT_EQ(static_cast<int>(i.id), row++);
    EXPECT_TRUE(names.insert(i.name).second) << i.name;
    EXPECT_TRUE(units.insert(i.unit).second) << i.unit;
    EXPECT_TRUE(gemms.insert(i.gemm_name).second) << i.gemm_name;
    EXPECT_STRNE(i.name, "auto");
  }
  EXPECT_EQ(mk::kIsas[0].id, Isa::kScalar) << "the scalar oracle comes first";
  EXPECT_TRUE(mk::isa_info(Isa::kScalar).required.empty()) << "the oracle runs everywhere";
}

// The flags CMake gives each unit are its row's features' flags: the ones the
// units had before the table (no -mfma in the AVX-512 units: FMA contraction
// would change their rounding).
TEST(IsaTable, CompileFlags) {
  using V = std::set<std::string>;
  EXPECT_EQ(V(), [] {
    auto f = mk::isa_compile_flags(Isa::kScalar);
    return V(f.begin(), f.end());
  }());
  const std::pair<Isa, V> want[] = {
      {Isa::kAvx2, {"-mavx", "-mavx2", "-mfma", "-mf16c", "-mpopcnt"}},
      {Isa::kAvx512, {"-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"}},
      {Isa::kAvx512Bf16, {"-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16"}},
      {Isa::kAmxBf16,
       {"-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
        "-mavx512bf16"}}};
  for (const auto& [isa, flags] : want) {
    const std::vector<std::string> got = mk::isa_compile_flags(isa);
    EXPECT_EQ(V(got.begin(), got.end()), flags) << mk::isa_name(isa);
    EXPECT_EQ(got.size(), flags.size()) << mk::isa_name(isa) << ": a flag twice";
  }
}

// ---------------------------------------------------------------------------
// Which ISA a CPU runs (pure functions on made-up feature sets)
// ---------------------------------------------------------------------------

TEST(IsaRunnable, BestIsaOfTypicalCpus) {
  EXPECT_EQ(mk::best_runnable_isa(kNoSimd), Isa::kScalar);
  EXPECT_EQ(mk::best_runnable_isa(kAvx2Cpu), Isa::kAvx2);
  EXPECT_EQ(mk::best_runnable_isa(kSkylakeSp), Isa::kAvx512);
  EXPECT_EQ(mk::best_runnable_isa(kCooperLake), Isa::kAvx512Bf16);
  EXPECT_EQ(mk::best_runnable_isa(kSapphireRapids), Isa::kAmxBf16);
  for (const mk::IsaInfo& i : mk::kIsas)
    EXPECT_TRUE(mk::isa_runnable(i.id, kSapphireRapids)) << i.name;
  EXPECT_TRUE(mk::isa_runnable(Isa::kScalar, kNoSimd));
}

// Defect 2: AMX tiles alone do not make the amx_bf16 bundle runnable.
TEST(IsaRunnable, AmxNeedsEverythingItsCodeRuns) {
  // A VM exposing AMX but masking AVX512-BF16 (K tails, small-r LoRA run on it).
  const FeatureSet no_bf16 = kSapphireRapids.without(F::kAvx512Bf16);
  EXPECT_FALSE(mk::isa_runnable(Isa::kAmxBf16, no_bf16));
  EXPECT_FALSE(mk::isa_runnable(Isa::kAvx512Bf16, no_bf16));
  EXPECT_EQ(mk::best_runnable_isa(no_bf16), Isa::kAvx512);
  // Masking AVX-512 BW (packing, element-wise, dequant) or VL.
  for (F f : {F::kAvx512Bw, F::kAvx512Vl, F::kAvx512F, F::kAvx512Dq}) {
    const FeatureSet masked = kSapphireRapids.without(f);
    EXPECT_FALSE(mk::isa_runnable(Isa::kAmxBf16, masked)) << mk::feature_info(f).name;
    EXPECT_EQ(mk::best_runnable_isa(masked), Isa::kAvx2) << mk::feature_info(f).name;
  }
  // Tile state not saved by the OS, or tile data not granted by Linux.
  EXPECT_FALSE(mk::isa_runnable(Isa::kAmxBf16, kSapphireRapids.without(F::kOsTileState)));
  EXPECT_EQ(mk::best_runnable_isa(kSapphireRapids.without(F::kOsTileState)), Isa::kAvx512Bf16);
  EXPECT_FALSE(mk::isa_runnable(Isa::kAmxBf16, kSapphireRapids.without(F::kAmxPermission)));
  EXPECT_EQ(mk::best_runnable_isa(kSapphireRapids.without(F::kAmxPermission)), Isa::kAvx512Bf16);
  // AMX-BF16 without the tile architecture, and tiles without AMX-BF16.
  EXPECT_FALSE(mk::isa_runnable(Isa::kAmxBf16, kSapphireRapids.without(F::kAmxTile)));
  EXPECT_FALSE(mk::isa_runnable(Isa::kAmxBf16, kSapphireRapids.without(F::kAmxBf16)));
}

TEST(IsaRunnable, OsStateIsRequired) {
  // The OS does not save ZMM/opmask state: no AVX-512 ISA, AVX2 still fine.
  const FeatureSet no_zmm = kSapphireRapids.without(F::kOsZmmState);
  for (Isa isa : {Isa::kAvx512, Isa::kAvx512Bf16, Isa::kAmxBf16})
    EXPECT_FALSE(mk::isa_runnable(isa, no_zmm)) << mk::isa_name(isa);
  EXPECT_EQ(mk::best_runnable_isa(no_zmm), Isa::kAvx2);
  // No YMM state either: scalar only.
  EXPECT_EQ(mk::best_runnable_isa(no_zmm.without(F::kOsYmmState)), Isa::kScalar);
  EXPECT_FALSE(mk::isa_runnable(Isa::kAvx2, kAvx2Cpu.without(F::kOsYmmState)));
}

// Exhaustively: an ISA runs with exactly its requirement, and with any one
// required feature missing it does not.
TEST(IsaRunnable, EveryRequiredFeatureIsNeeded) {
  for (const mk::IsaInfo& i : mk::kIsas) {
    EXPECT_TRUE(mk::isa_runnable(i.id, i.required)) << i.name;
    for (const mk::FeatureInfo& f : mk::kFeatures) {
      if (i.required.has(f.id))
        EXPECT_FALSE(mk::isa_runnable(i.id, i.required.without(f.id)))
            << i.name << " without " << f.name;
    }
  }
}

// ---------------------------------------------------------------------------
// From CPUID / XCR0 words to features (bit positions from the Intel SDM,
// typed here independently of the table)
// ---------------------------------------------------------------------------

mk::RawCpu sapphire_rapids_registers() {
  mk::RawCpu r;
  using S = mk::FeatureSource;
  r[S::kCpuid1Ecx] = (1u << 12) | (1u << 23) | (1u << 27) | (1u << 28) |
                     (1u << 29);  // fma popcnt osxsave avx f16c
  r[S::kCpuid7Ebx] =
      (1u << 5) | (1u << 16) | (1u << 17) | (1u << 30) | (1u << 31);  // avx2 avx512 f dq bw vl
  r[S::kCpuid7Ecx] = 1u << 11;                                        // avx512_vnni
  r[S::kCpuid7Edx] = (1u << 22) | (1u << 24) | (1u << 25);            // amx bf16 tile int8
  r[S::kCpuid7s1Eax] = 1u << 5;                                       // avx512_bf16
  r[S::kXcr0] = 0x602e7;  // x87 SSE AVX opmask ZMM_Hi256 Hi16_ZMM PKRU XTILECFG XTILEDATA
  r[S::kOsGrant] = 1;
  return r;
}

TEST(DecodeFeatures, SapphireRapids) {
  const mk::RawCpu r = sapphire_rapids_registers();
  EXPECT_EQ(mk::decode_features(r), kSapphireRapids);
  EXPECT_EQ(mk::best_runnable_isa(mk::decode_features(r)), Isa::kAmxBf16);
}

TEST(DecodeFeatures, VmMaskingAvx512Bf16) {
  mk::RawCpu r = sapphire_rapids_registers();
  r[mk::FeatureSource::kCpuid7s1Eax] = 0;
  const FeatureSet f = mk::decode_features(r);
  EXPECT_TRUE(f.has(F::kAmxBf16) && f.has(F::kAmxTile) && f.has(F::kAmxPermission));
  EXPECT_FALSE(mk::isa_runnable(Isa::kAmxBf16, f));
  EXPECT_EQ(mk::best_runnable_isa(f), Isa::kAvx512);
}

TEST(DecodeFeatures, OsStateFromXcr0) {
  mk::RawCpu r = sapphire_rapids_registers();
  r[mk::FeatureSource::kXcr0] = 0x2e7;  // no tile state
  EXPECT_EQ(mk::best_runnable_isa(mk::decode_features(r)), Isa::kAvx512Bf16);
  r[mk::FeatureSource::kXcr0] = 0x7;  // SSE + AVX only
  EXPECT_EQ(mk::best_runnable_isa(mk::decode_features(r)), Isa::kAvx2);
  r[mk::FeatureSource::kXcr0] = 0xc7;  // ZMM state without the opmask bit
  EXPECT_EQ(mk::best_runnable_isa(mk::decode_features(r)), Isa::kAvx2);
  r[mk::FeatureSource::kXcr0] = 0;  // no OSXSAVE: nothing may be read, nothing is enabled
  EXPECT_EQ(mk::best_runnable_isa(mk::decode_features(r)), Isa::kScalar);
  r = sapphire_rapids_registers();
  r[mk::FeatureSource::kOsGrant] = 0;  // Linux refused the tile data
  EXPECT_EQ(mk::best_runnable_isa(mk::decode_features(r)), Isa::kAvx512Bf16);
}

TEST(DecodeFeatures, AmdZen3) {  // AVX2, no AVX-512 (this CI's kind of CPU)
  mk::RawCpu r;
  r[mk::FeatureSource::kCpuid1Ecx] = (1u << 12) | (1u << 23) | (1u << 27) | (1u << 28) | (1u << 29);
  r[mk::FeatureSource::kCpuid7Ebx] = 1u << 5;
  r[mk::FeatureSource::kXcr0] = 0x207;
  EXPECT_EQ(mk::decode_features(r), kAvx2Cpu);
  EXPECT_EQ(mk::best_runnable_isa(mk::decode_features(r)), Isa::kAvx2);
}

// ---------------------------------------------------------------------------
// This CPU
// ---------------------------------------------------------------------------

TEST(DetectedCpu, ConsistentWithTheTable) {
  const mk::DetectedCpu& cpu = mk::detected_cpu();
  std::cout << "[ cpu      ] " << mk::cpu_summary() << "\n";
  EXPECT_EQ(cpu.features, mk::decode_features(cpu.raw));
  EXPECT_TRUE(mk::cpu_supports(Isa::kScalar));
  for (const mk::IsaInfo& i : mk::kIsas) {
    EXPECT_EQ(mk::cpu_supports(i.id), mk::isa_runnable(i.id, cpu.features)) << i.name;
    std::cout << "[ isa      ] " << i.name << " (gemm " << i.gemm_name << "): "
              << (mk::cpu_supports(i.id) ? "runs here" : "SKIPPED here: " + why_not_runnable(i.id))
              << "\n";
  }
  // Real CPUs (and what the table includes) nest: an AVX512-BF16 CPU runs avx512 too.
  if (mk::cpu_supports(Isa::kAvx512Bf16)) EXPECT_TRUE(mk::cpu_supports(Isa::kAvx512));
  if (mk::cpu_supports(Isa::kAvx512)) EXPECT_TRUE(mk::cpu_supports(Isa::kAvx2));
  const std::string s = mk::cpu_summary();
  EXPECT_NE(s.find("runs: scalar"), std::string::npos) << s;
}

// ---------------------------------------------------------------------------
// Parsing and selection
// ---------------------------------------------------------------------------

TEST(ParseIsa, NamesOfTheTableAndAuto) {
  EXPECT_EQ(mk::parse_isa("auto"), std::nullopt);
  for (const mk::IsaInfo& i : mk::kIsas) EXPECT_EQ(mk::parse_isa(i.name), i.id) << i.name;
  for (const char* bad : {"bogus", "AVX2", "", "avx512bf16", "amx"}) {
    try {
      (void)mk::parse_isa(bad);
      ADD_FAILURE() << "'" << bad << "' accepted";
    } catch (const std::invalid_argument& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(std::string("got '") + bad + "'"), std::string::npos) << msg;
      for (const mk::IsaInfo& i : mk::kIsas)
        EXPECT_NE(msg.find(std::string(" ") + i.name), std::string::npos) << msg;
    }
  }
}

TEST(SelectKernels, AutoIsTheBestRunnableAndForcedIsChecked) {
  EXPECT_EQ(mk::select_kernels(std::nullopt).isa, mk::best_runnable_isa(mk::cpu_features()));
  EXPECT_TRUE(mk::cpu_supports(mk::select_kernels(std::nullopt).isa));
  for (const mk::IsaInfo& i : mk::kIsas) {
    if (mk::cpu_supports(i.id)) {
      EXPECT_EQ(&mk::select_kernels(i.id), &mk::kernels_for(i.id)) << i.name;
      continue;
    }
    try {
      (void)mk::select_kernels(i.id);
      ADD_FAILURE() << i.name << " selected on a CPU that cannot run it";
    } catch (const std::runtime_error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(std::string("'") + i.name + "' cannot run"), std::string::npos) << msg;
      const FeatureSet missing = i.required.minus(mk::cpu_features());
      ASSERT_FALSE(missing.empty());
      EXPECT_NE(msg.find("needs " + mk::feature_names(missing)), std::string::npos) << msg;
    }
  }
}

// ---------------------------------------------------------------------------
// Kernel bundles
// ---------------------------------------------------------------------------

TEST(KernelBundles, OnePerIsaWellFormed) {
  for (const mk::IsaInfo& i : mk::kIsas) {
    const mk::KernelBundle& k = mk::kernels_for(i.id);
    SCOPED_TRACE(i.name);
    EXPECT_EQ(k.isa, i.id);
    EXPECT_STREQ(k.name, i.gemm_name);
    EXPECT_NE(k.gemm, nullptr);
    EXPECT_NE(k.transpose_packed, nullptr);
    EXPECT_NE(k.dequant, nullptr);
    const mk::EltwiseKernel& e = k.eltwise;
    EXPECT_TRUE(e.to_bf16 && e.swiglu && e.swiglu_bwd && e.clamped_swiglu && e.clamped_swiglu_bwd);
  }
  EXPECT_THROW(mk::kernels_for(static_cast<Isa>(mk::kIsaCount)), std::invalid_argument);
}

// Two bundles share a component exactly when their rows name the same unit
// for it (so the wiring in registry.cc is the table's).
TEST(KernelBundles, SharedCodeFollowsTheTable) {
  for (const mk::IsaInfo& a : mk::kIsas) {
    for (const mk::IsaInfo& b : mk::kIsas) {
      SCOPED_TRACE(std::string(a.name) + " vs " + b.name);
      const mk::KernelBundle &ka = mk::kernels_for(a.id), &kb = mk::kernels_for(b.id);
      const auto same = [](const char* x, const char* y) { return std::string(x) == y; };
      EXPECT_EQ(ka.gemm == kb.gemm, same(a.unit, b.unit));
      EXPECT_EQ(ka.transpose_packed == kb.transpose_packed,
                same(a.transpose_unit, b.transpose_unit));
      EXPECT_EQ(ka.eltwise.swiglu == kb.eltwise.swiglu, same(a.eltwise_unit, b.eltwise_unit));
      EXPECT_EQ(ka.dequant == kb.dequant, same(a.dequant_unit, b.dequant_unit));
    }
  }
}

}  // namespace
}  // namespace moetune::kernel_test
