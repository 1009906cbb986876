// moetune engine: from topk_ids to per-expert token lists.
//
// The T*k (token, slot) pairs are counting-sorted by expert id, stable in
// (t, j) order, so expert e owns rows [offsets[e], offsets[e+1]) of every
// expert-major buffer and row i is the flat slot slot_of[i] = t*k + j.
// Ids are validated here (the only engine check that needs the data):
// anything outside [0, E) throws std::invalid_argument naming topk_ids, the
// value and its position. Masked experts (expert_mask[e] == 0) get no rows.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/moe_types.h"

namespace moetune {

// A block of at most kRowBlock consecutive rows of one expert: the unit of
// row-parallel work, so one hot expert (skewed routing, or every token on one
// expert) still spreads over all workers.
struct RowBlock {
  int e;
  int64_t r0, r1;  // absolute expert-major rows [r0, r1)
};
inline constexpr int64_t kRowBlock = 192;

struct Routing {
  int64_t T = 0;
  int k = 0;
  int E = 0;
  std::vector<int64_t> offsets;  // [E + 1]
  std::vector<int32_t> slot_of;  // [rows] flat slot of each expert-major row
  std::vector<int32_t> row_of;   // [T * k] expert-major row of each slot, -1 if not routed
  std::vector<int32_t> active;   // experts with rows, most rows first (load balance)
  std::vector<RowBlock> blocks;  // rows of the active experts in blocks, largest first

  int64_t rows() const { return offsets.empty() ? 0 : offsets.back(); }
  int64_t count(int e) const { return offsets[e + 1] - offsets[e]; }
};

Routing build_routing(const void* topk_ids, DType ids_dtype, int64_t T, int k, int E,
                      const uint8_t* expert_mask);

}  // namespace moetune
