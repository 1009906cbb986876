// Private to the engine: the per-expert work of one forward or backward pass
// (GEMM row blocks, active experts) grouped by NUMA partition, so that every
// task of an expert runs on a worker of the partition holding its weights
// (engine/partitions.h). Grouping only reorders: each group keeps its input
// order (largest first), and the set of tasks, hence every result, is the same
// for any partition count. With one partition the order is the input's.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/routing.h"

namespace moetune {

struct ExpertWork {
  std::vector<RowBlock> blocks;       // grouped by their expert's partition
  std::vector<int64_t> block_begin;   // [P + 1] first block of each partition
  std::vector<int32_t> active;        // active experts, grouped likewise
  std::vector<int64_t> active_begin;  // [P + 1]

  // begin scaled by `per` tasks per item (e.g. column chunks per row block).
  static std::vector<int64_t> tasks(const std::vector<int64_t>& begin, int64_t per) {
    std::vector<int64_t> out(begin);
    for (int64_t& b : out) b *= per;
    return out;
  }
};

// blocks / active as from MoeExperts::work_blocks and Routing::active, for E
// experts and P >= 1 partitions.
ExpertWork group_work(std::vector<RowBlock> blocks, std::vector<int32_t> active, int E, int P);

}  // namespace moetune
