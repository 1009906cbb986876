// ExpertsOptions (csrc/engine/experts_options.h): the one validate() names
// the bad option and its value; every enum value has a distinct name; the
// per-format group size default; equality. MoeExperts and WeightStore::bytes_for
// reject exactly what validate() rejects.
#include <gtest/gtest.h>

#include <set>

#include "engine_test_support.h"

namespace moetune::engine_test {
namespace {

template <typename Enum, size_t N>
void expect_distinct_names(const Enum (&all)[N], const char* what) {
  std::set<std::string> names;
  for (Enum v : all) {
    const std::string n = option_name(v);
    EXPECT_NE(n, "?") << what << " value " << static_cast<int>(v) << " has no name";
    EXPECT_TRUE(names.insert(n).second) << what << " name '" << n << "' used twice";
  }
  EXPECT_EQ(names.size(), N);
}

TEST(ExpertsOptions, EveryEnumValueHasADistinctName) {
  expect_distinct_names(kAllBackwardWeights, "BackwardWeights");
  expect_distinct_names(kAllActivationPolicies, "ActivationPolicy");
  expect_distinct_names(kAllActivations, "Activation");
  expect_distinct_names(kAllWeightFormats, "WeightFormat");
  expect_distinct_names(kAllDequantPaths, "DequantPath");
  // The spellings Python users pass.
  EXPECT_STREQ(option_name(BackwardWeights::kTransposedCopy), "transposed_copy");
  EXPECT_STREQ(option_name(ActivationPolicy::kRecompute), "recompute");
  EXPECT_STREQ(option_name(Activation::kClampedSwiGLU), "gpt_oss");
  EXPECT_STREQ(option_name(WeightFormat::kInt4), "int4");
  EXPECT_STREQ(option_name(WeightFormat::kFp8Block), "fp8_block");
  EXPECT_STREQ(option_name(WeightFormat::kMxfp4), "mxfp4");
  EXPECT_STREQ(option_name(DequantPath::kPanels), "panels");
  EXPECT_STREQ(option_name(DequantPath::kTiles), "tiles");
}

TEST(ExpertsOptions, DefaultsAreValidAndGroupSizeDefaultsPerFormat) {
  ExpertsOptions o;
  EXPECT_NO_THROW(o.validate());
  EXPECT_EQ(default_group_size(WeightFormat::kInt4), kDefaultInt4GroupSize);
  EXPECT_EQ(default_group_size(WeightFormat::kInt8), 0);
  EXPECT_EQ(default_group_size(WeightFormat::kBf16), 0);
  for (WeightFormat f : kAllWeightFormats) {
    o.weight_format = f;
    o.group_size = default_group_size(f);
    EXPECT_NO_THROW(o.validate()) << option_name(f);
  }
}

TEST(ExpertsOptions, ValidateNamesTheBadOptionAndValue) {
  struct Bad {
    const char* what;
    void (*edit)(ExpertsOptions&);
    std::vector<std::string> needles;
  };
  const Bad bads[] = {
      {"backward_weights 7",
       [](ExpertsOptions& o) { o.backward_weights = static_cast<BackwardWeights>(7); },
       {"backward_weights", "7"}},
      {"activations 5",
       [](ExpertsOptions& o) { o.activations = static_cast<ActivationPolicy>(5); },
       {"activations", "5"}},
      {"activation 9",
       [](ExpertsOptions& o) { o.activation = static_cast<Activation>(9); },
       {"activation", "9"}},
      {"weight_format 7",  // past the format table (weight_format.h)
       [](ExpertsOptions& o) { o.weight_format = static_cast<WeightFormat>(7); },
       {"weight format", "7"}},
      {"alpha nan",
       [](ExpertsOptions& o) { o.swiglu_alpha = std::numeric_limits<float>::quiet_NaN(); },
       {"alpha=nan"}},
      {"limit 0", [](ExpertsOptions& o) { o.swiglu_limit = 0.0f; }, {"limit=0"}},
      {"limit inf",
       [](ExpertsOptions& o) { o.swiglu_limit = std::numeric_limits<float>::infinity(); },
       {"limit=inf"}},
      {"int4 group 48",
       [](ExpertsOptions& o) {
         o.weight_format = WeightFormat::kInt4;
         o.group_size = 48;
       },
       {"int4 group_size must be 32, 64 or 128, got 48"}},
      {"bf16 group 32",
       [](ExpertsOptions& o) { o.group_size = 32; },
       {"group_size applies to int4 only", "bf16"}},
      {"row_group -1",
       [](ExpertsOptions& o) { o.row_group = -1; },
       {"row_group must be >= 0", "-1"}},
      {"dequant_path 4",
       [](ExpertsOptions& o) { o.dequant_path = static_cast<DequantPath>(4); },
       {"dequant_path", "4"}},
      {"dequant_cols 24",
       [](ExpertsOptions& o) { o.dequant_cols = 24; },
       {"dequant_cols must be 0 (auto) or a positive multiple of 16", "24"}},
      {"dequant_cols -16",
       [](ExpertsOptions& o) { o.dequant_cols = -16; },
       {"dequant_cols", "-16"}},
  };
  auto ctx = make_context(EngineCfg{});
  for (const Bad& b : bads) {
    ExpertsOptions o;
    b.edit(o);
    expect_invalid_argument(std::string("validate: ") + b.what, [&] { o.validate(); }, b.needles);
    // The engine and the size function refuse the same options with the same message.
    expect_invalid_argument(
        std::string("MoeExperts: ") + b.what, [&] { MoeExperts m(ctx, 2, 8, 8, o); }, b.needles);
    expect_invalid_argument(
        std::string("host_bytes: ") + b.what, [&] { MoeExperts::host_bytes(2, 8, 8, o); },
        b.needles);
  }
}

TEST(ExpertsOptions, EqualityComparesEveryField) {
  const ExpertsOptions base;
  EXPECT_EQ(base, ExpertsOptions{});
  void (*edits[])(ExpertsOptions&) = {
      [](ExpertsOptions& o) { o.backward_weights = BackwardWeights::kTransposedCopy; },
      [](ExpertsOptions& o) { o.activations = ActivationPolicy::kRecompute; },
      [](ExpertsOptions& o) { o.activation = Activation::kClampedSwiGLU; },
      [](ExpertsOptions& o) { o.swiglu_alpha = 1.0f; },
      [](ExpertsOptions& o) { o.swiglu_limit = 1.0f; },
      [](ExpertsOptions& o) { o.weight_format = WeightFormat::kInt8; },
      [](ExpertsOptions& o) { o.group_size = 64; },
      [](ExpertsOptions& o) { o.row_group = 16; },
      [](ExpertsOptions& o) { o.dequant_path = DequantPath::kTiles; },
      [](ExpertsOptions& o) { o.dequant_cols = 64; },
  };
  for (size_t i = 0; i < sizeof(edits) / sizeof(edits[0]); ++i) {
    ExpertsOptions o;
    edits[i](o);
    EXPECT_NE(o, base) << "field " << i << " ignored by operator==";
  }
}

}  // namespace
}  // namespace moetune::engine_test
