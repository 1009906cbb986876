#include "engine/experts_options.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace moetune {

const char* option_name(BackwardWeights v) {
  switch (v) {
    case BackwardWeights::kRepack:
      return "repack";
    case BackwardWeights::kTransposedCopy:
      return "transposed_copy";
  }
  return "?";
}

const char* option_name(ActivationPolicy v) {
  switch (v) {
    case ActivationPolicy::kSave:
      return "save";
    case ActivationPolicy::kRecompute:
      return "recompute";
  }
  return "?";
}

const char* option_name(Activation v) {
  switch (v) {
    case Activation::kSwiGLU:
      return "swiglu";
    case Activation::kClampedSwiGLU:
      return "gpt_oss";
  }
  return "?";
}

const char* option_name(DequantPath v) {
  switch (v) {
    case DequantPath::kPanels:
      return "panels";
    case DequantPath::kTiles:
      return "tiles";
  }
  return "?";
}

namespace {
template <typename Enum, size_t N>
void check_known(Enum v, const Enum (&all)[N], const char* option) {
  for (Enum a : all)
    if (a == v) return;
  throw std::invalid_argument(std::string("moetune: unknown ") + option + " " +
                              std::to_string(static_cast<int>(v)));
}
}  // namespace

void ExpertsOptions::validate() const {
  check_known(backward_weights, kAllBackwardWeights, "backward_weights");
  check_known(activations, kAllActivationPolicies, "activations");
  check_known(activation, kAllActivations, "activation");
  check_known(dequant_path, kAllDequantPaths, "dequant_path");
  if (!(std::isfinite(swiglu_alpha) && std::isfinite(swiglu_limit) && swiglu_limit > 0.0f)) {
    throw std::invalid_argument(
        "moetune: the clamped SwiGLU constants need a finite alpha and a finite limit > 0, got "
        "alpha=" +
        std::to_string(swiglu_alpha) + " limit=" + std::to_string(swiglu_limit));
  }
  kernels::check_quant_spec(quant_spec());  // also rejects an unknown weight format
  if (row_group < 0) {
    throw std::invalid_argument("moetune: row_group must be >= 0 (0 = auto), got " +
                                std::to_string(row_group));
  }
  if (dequant_cols < 0 || dequant_cols % kernels::kPanelN != 0) {
    throw std::invalid_argument(
        "moetune: dequant_cols must be 0 (auto) or a positive multiple of 16, got " +
        std::to_string(dequant_cols));
  }
}

bool ExpertsOptions::operator==(const ExpertsOptions& o) const {
  return backward_weights == o.backward_weights && activations == o.activations &&
         activation == o.activation && swiglu_alpha == o.swiglu_alpha &&
         swiglu_limit == o.swiglu_limit && weight_format == o.weight_format &&
         group_size == o.group_size && row_group == o.row_group && dequant_path == o.dequant_path &&
         dequant_cols == o.dequant_cols;
}

}  // namespace moetune
