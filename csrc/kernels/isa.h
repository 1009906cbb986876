// moetune kernels: CPU features and ISAs, as data (isa_table.def), and the
// pure functions over them: which features an ISA requires, whether a set of
// features runs it, decoding CPUID/XCR0 bits into features. Nothing here
// reads the CPU (cpu.h does), so every rule can be tested on made-up CPUs.
//
// An ISA's *required* features are the closure over the table: its own
// "features" (what its translation units are compiled for) and the OS state
// they need, the requirements of the ISAs it "includes", and those of every
// unit whose code its kernel bundle uses (transpose, element-wise, dequant).
// isa_unit.h checks at compile time that each unit is compiled with no CPU
// feature outside its ISA's requirement, so a runnable ISA never executes an
// instruction the CPU check did not ask for.
// Thread-safety: constant data and pure functions only.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace moetune::kernels {

// Where a feature bit is read (cpu.cc fills one word per source).
enum class FeatureSource : int {
  kCpuid1Ecx = 0,
  kCpuid7Ebx,
  kCpuid7Ecx,
  kCpuid7Edx,
  kCpuid7s1Eax,  // CPUID leaf 7, sub-leaf 1
  kXcr0,         // 0 when the OS does not set OSXSAVE (then nothing is enabled)
  kOsGrant,      // bit 0: Linux granted AMX tile data to this process
  kCount
};

// Raw register words, indexed by FeatureSource.
struct RawCpu {
  std::array<uint64_t, static_cast<size_t>(FeatureSource::kCount)> word{};
  constexpr uint64_t& operator[](FeatureSource s) { return word[static_cast<size_t>(s)]; }
  constexpr uint64_t operator[](FeatureSource s) const { return word[static_cast<size_t>(s)]; }
};

#define MOETUNE_ISA(...)
#define MOETUNE_FEATURE(id, ...) id,
enum class Feature : int {
#include "isa_table.def"
};
#undef MOETUNE_FEATURE
#undef MOETUNE_ISA

#define MOETUNE_FEATURE(...)
#define MOETUNE_ISA(id, ...) id,
// Ordered slowest to fastest, as in the table.
enum class Isa : int {
#include "isa_table.def"
};
#undef MOETUNE_ISA
#undef MOETUNE_FEATURE

// A set of features (a bit per Feature).
class FeatureSet {
 public:
  constexpr FeatureSet() = default;
  constexpr bool has(Feature f) const { return (bits_ >> static_cast<int>(f)) & 1u; }
  constexpr FeatureSet with(Feature f) const { return FeatureSet(bits_ | bit(f)); }
  constexpr FeatureSet without(Feature f) const { return FeatureSet(bits_ & ~bit(f)); }
  constexpr FeatureSet operator|(FeatureSet o) const { return FeatureSet(bits_ | o.bits_); }
  constexpr FeatureSet minus(FeatureSet o) const { return FeatureSet(bits_ & ~o.bits_); }
  constexpr bool contains(FeatureSet o) const { return (o.bits_ & ~bits_) == 0; }
  constexpr bool empty() const { return bits_ == 0; }
  constexpr bool operator==(FeatureSet o) const { return bits_ == o.bits_; }
  constexpr bool operator!=(FeatureSet o) const { return bits_ != o.bits_; }

 private:
  constexpr explicit FeatureSet(uint64_t b) : bits_(b) {}
  static constexpr uint64_t bit(Feature f) { return uint64_t{1} << static_cast<int>(f); }
  uint64_t bits_ = 0;
};

struct FeatureInfo {
  Feature id;
  const char* name;
  const char* flag;  // compiler flag; "" for OS state
  FeatureSource source;
  uint64_t mask;      // present iff (word & mask) == mask
  const char* needs;  // OS-state feature names its instructions need
};

#define MOETUNE_ISA(...)
#define MOETUNE_FEATURE(id, name, flag, macro, source, mask, needs) \
  FeatureInfo{Feature::id, name, flag, FeatureSource::source, mask, needs},
inline constexpr FeatureInfo kFeatures[] = {
#include "isa_table.def"
};
#undef MOETUNE_FEATURE
#undef MOETUNE_ISA
inline constexpr int kFeatureCount = static_cast<int>(sizeof(kFeatures) / sizeof(kFeatures[0]));
static_assert(kFeatureCount <= 64, "FeatureSet holds 64 features");

struct IsaInfo {
  Isa id;
  const char* name;            // what Context(isa=...) and moetune.isas() use
  const char* unit;            // namespace / file suffix of its own code
  const char* gemm_name;       // the GEMM kernel, as `moetune info` prints it
  const char* transpose_unit;  // units whose shared code the bundle uses
  const char* eltwise_unit;
  const char* dequant_unit;
  const char* includes;  // ISA names, space separated
  FeatureSet features;   // its own: what its units are compiled for (flags)
  FeatureSet required;   // the closure (see the top of this file)
};

namespace isa_detail {

// Calls to these in a constant expression with a name the table does not
// have fail to compile (the throw is not a constant expression).
constexpr Feature feature_named(std::string_view name) {
  for (const FeatureInfo& f : kFeatures)
    if (name == f.name) return f.id;
  throw std::logic_error("isa_table.def: unknown feature name");
}

constexpr FeatureSet parse_features(std::string_view list) {
  FeatureSet s;
  while (!list.empty()) {
    const size_t sp = list.find(' ');
    const std::string_view tok = list.substr(0, sp);
    if (!tok.empty()) s = s.with(feature_named(tok));
    if (sp == std::string_view::npos) break;
    list.remove_prefix(sp + 1);
  }
  return s;
}

#define MOETUNE_FEATURE(...)
#define MOETUNE_ISA(id, name, unit, gemm_name, t, e, d, includes, features) \
  IsaInfo{Isa::id, name, #unit, gemm_name, #t, #e, #d, includes, parse_features(features), {}},
inline constexpr IsaInfo kRows[] = {
#include "isa_table.def"
};
#undef MOETUNE_ISA
#undef MOETUNE_FEATURE
inline constexpr size_t kRowCount = sizeof(kRows) / sizeof(kRows[0]);

constexpr size_t isa_with_unit(std::string_view unit) {
  for (size_t i = 0; i < kRowCount; ++i)
    if (unit == kRows[i].unit) return i;
  throw std::logic_error("isa_table.def: unknown unit");
}
constexpr size_t isa_named(std::string_view name) {
  for (size_t i = 0; i < kRowCount; ++i)
    if (name == kRows[i].name) return i;
  throw std::logic_error("isa_table.def: unknown ISA name");
}

// The requirement closure: iterate to the fixed point (each pass adds at
// least one ISA's final requirement, so kRowCount passes suffice).
constexpr std::array<IsaInfo, kRowCount> close_requirements() {
  std::array<IsaInfo, kRowCount> t{};
  for (size_t i = 0; i < kRowCount; ++i) {
    t[i] = kRows[i];
    t[i].required = kRows[i].features;
  }
  for (size_t pass = 0; pass < kRowCount; ++pass) {
    for (size_t i = 0; i < kRowCount; ++i) {
      FeatureSet r = t[i].required;
      r = r | t[isa_with_unit(t[i].transpose_unit)].required;
      r = r | t[isa_with_unit(t[i].eltwise_unit)].required;
      r = r | t[isa_with_unit(t[i].dequant_unit)].required;
      std::string_view inc = t[i].includes;
      while (!inc.empty()) {
        const size_t sp = inc.find(' ');
        const std::string_view tok = inc.substr(0, sp);
        if (!tok.empty()) r = r | t[isa_named(tok)].required;
        if (sp == std::string_view::npos) break;
        inc.remove_prefix(sp + 1);
      }
      for (const FeatureInfo& f : kFeatures)
        if (r.has(f.id)) r = r | parse_features(f.needs);
      t[i].required = r;
    }
  }
  return t;
}

constexpr bool table_is_well_formed() {
  for (size_t i = 0; i < kRowCount; ++i) {
    if (static_cast<size_t>(kRows[i].id) != i) return false;      // enum order = row order
    if (std::string_view(kRows[i].name) == "auto") return false;  // reserved by Context
    for (size_t j = 0; j < i; ++j) {
      if (std::string_view(kRows[i].name) == kRows[j].name) return false;
      if (std::string_view(kRows[i].unit) == kRows[j].unit) return false;
    }
  }
  for (int i = 0; i < kFeatureCount; ++i) {
    if (static_cast<int>(kFeatures[i].id) != i) return false;
    for (int j = 0; j < i; ++j)
      if (std::string_view(kFeatures[i].name) == kFeatures[j].name) return false;
  }
  return kRowCount > 0 && kRows[0].features.empty();  // the oracle runs everywhere
}
static_assert(table_is_well_formed(),
              "isa_table.def: duplicate or reserved name, or the first ISA needs features");

}  // namespace isa_detail

// The table, requirements closed. Indexed by static_cast<int>(Isa).
inline constexpr std::array<IsaInfo, isa_detail::kRowCount> kIsas =
    isa_detail::close_requirements();
inline constexpr int kIsaCount = static_cast<int>(isa_detail::kRowCount);

constexpr const IsaInfo& isa_info(Isa isa) { return kIsas[static_cast<size_t>(isa)]; }
// The ISA whose own code lives in `unit` (a bundle's transpose / eltwise /
// dequant unit names one); throws std::logic_error for a unit not in the table.
constexpr const IsaInfo& isa_with_unit(std::string_view unit) {
  return kIsas[isa_detail::isa_with_unit(unit)];
}
constexpr const char* isa_name(Isa isa) { return isa_info(isa).name; }
constexpr const FeatureInfo& feature_info(Feature f) { return kFeatures[static_cast<int>(f)]; }

// True iff a CPU with exactly `available` runs every instruction of the ISA's bundle.
constexpr bool isa_runnable(Isa isa, FeatureSet available) {
  return available.contains(isa_info(isa).required);
}
// The last (fastest) ISA of the table that `available` runs; the first ISA
// needs nothing, so there always is one.
constexpr Isa best_runnable_isa(FeatureSet available) {
  Isa best = kIsas[0].id;
  for (const IsaInfo& i : kIsas)
    if (isa_runnable(i.id, available)) best = i.id;
  return best;
}

// The features whose source bits are all set in `raw`. Pure: cpu.cc calls it
// on the real registers, tests on made-up ones.
constexpr FeatureSet decode_features(const RawCpu& raw) {
  FeatureSet s;
  for (const FeatureInfo& f : kFeatures)
    if ((raw[f.source] & f.mask) == f.mask) s = s.with(f.id);
  return s;
}

// The names of the features in the set, in table order; and the same space
// separated ("" if none).
std::vector<std::string> feature_list(FeatureSet s);
std::string feature_names(FeatureSet s);
// The compiler flags of an ISA's own units (from its features' flags).
std::vector<std::string> isa_compile_flags(Isa isa);
// "auto, scalar, avx2, ..." (the values Context accepts).
std::string isa_choices();
// "auto" -> nullopt (let the CPU decide), an ISA name -> that ISA; anything
// else throws std::invalid_argument listing the choices.
std::optional<Isa> parse_isa(std::string_view s);

}  // namespace moetune::kernels
