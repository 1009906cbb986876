#include "isa.h"

namespace moetune::kernels {

std::vector<std::string> feature_list(FeatureSet s) {
  std::vector<std::string> out;
  for (const FeatureInfo& f : kFeatures)
    if (s.has(f.id)) out.emplace_back(f.name);
  return out;
}

std::string feature_names(FeatureSet s) {
  std::string out;
  for (const std::string& name : feature_list(s)) out += (out.empty() ? "" : " ") + name;
  return out;
}

std::vector<std::string> isa_compile_flags(Isa isa) {
  std::vector<std::string> flags;
  for (const FeatureInfo& f : kFeatures)
    if (isa_info(isa).features.has(f.id) && *f.flag) flags.emplace_back(f.flag);
  return flags;
}

std::string isa_choices() {
  std::string s = "auto";
  for (const IsaInfo& i : kIsas) s += std::string(", ") + i.name;
  return s;
}

std::optional<Isa> parse_isa(std::string_view s) {
  if (s == "auto") return std::nullopt;
  for (const IsaInfo& i : kIsas)
    if (s == i.name) return i.id;
  throw std::invalid_argument("isa must be one of " + isa_choices() + "; got '" + std::string(s) +
                              "'");
}

}  // namespace moetune::kernels
