#include "engine/routing.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace moetune {

Routing build_routing(const void* topk_ids, DType ids_dtype, int64_t T, int k, int E,
                      const uint8_t* expert_mask) {
  if (ids_dtype != DType::kI32 && ids_dtype != DType::kI64) {
    throw std::invalid_argument(std::string("topk_ids must be int32 or int64, got ") +
                                dtype_name(ids_dtype));
  }
  Routing r;
  r.T = T;
  r.k = k;
  r.E = E;
  const int64_t slots = T * k;
  std::vector<int32_t> ids(slots);
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t id = ids_dtype == DType::kI64 ? static_cast<const int64_t*>(topk_ids)[s]
                                                : static_cast<const int32_t*>(topk_ids)[s];
    if (id < 0 || id >= E) {
      throw std::invalid_argument("topk_ids contains expert id " + std::to_string(id) + " at [" +
                                  std::to_string(s / k) + ", " + std::to_string(s % k) +
                                  "], outside [0, " + std::to_string(E) + ")");
    }
    ids[s] = static_cast<int32_t>(id);
  }
  std::vector<int64_t> count(E, 0);
  for (int64_t s = 0; s < slots; ++s) {
    if (!expert_mask || expert_mask[ids[s]]) ++count[ids[s]];
  }
  r.offsets.assign(E + 1, 0);
  for (int e = 0; e < E; ++e) r.offsets[e + 1] = r.offsets[e] + count[e];
  r.slot_of.resize(r.offsets[E]);
  r.row_of.assign(slots, -1);
  std::vector<int64_t> fill(r.offsets.begin(), r.offsets.end() - 1);
  for (int64_t s = 0; s < slots; ++s) {
    const int e = ids[s];
    if (expert_mask && !expert_mask[e]) continue;
    const int64_t row = fill[e]++;
    r.slot_of[row] = static_cast<int32_t>(s);
    r.row_of[s] = static_cast<int32_t>(row);
  }
  for (int e = 0; e < E; ++e)
    if (count[e] > 0) r.active.push_back(e);
  std::stable_sort(r.active.begin(), r.active.end(),
                   [&](int a, int b) { return count[a] > count[b]; });
  for (int e : r.active) {
    // Equal-sized blocks (not kRowBlock + remainder) keep tasks balanced.
    const int64_t n = count[e], nb = (n + kRowBlock - 1) / kRowBlock;
    for (int64_t b = 0; b < nb; ++b) {
      r.blocks.push_back(RowBlock{e, r.offsets[e] + n * b / nb, r.offsets[e] + n * (b + 1) / nb});
    }
  }
  std::stable_sort(r.blocks.begin(), r.blocks.end(),
                   [](const RowBlock& a, const RowBlock& b) { return a.r1 - a.r0 > b.r1 - b.r0; });
  return r;
}

}  // namespace moetune
