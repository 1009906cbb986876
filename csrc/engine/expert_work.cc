#include "engine/expert_work.h"

#include "engine/partitions.h"

namespace moetune {
namespace {

// Stable grouping of items by partition; returns the [P + 1] group offsets.
template <typename T, typename ExpertOf>
std::vector<int64_t> group(std::vector<T>& items, int E, int P, ExpertOf expert_of) {
  std::vector<int64_t> begin(P + 1, 0);
  if (P == 1) {
    begin[1] = static_cast<int64_t>(items.size());
    return begin;
  }
  for (const T& it : items) ++begin[expert_partition(expert_of(it), E, P) + 1];
  for (int p = 0; p < P; ++p) begin[p + 1] += begin[p];
  std::vector<int64_t> fill(begin.begin(), begin.end() - 1);
  std::vector<T> out(items.size());
  for (const T& it : items) out[fill[expert_partition(expert_of(it), E, P)]++] = it;
  items.swap(out);
  return begin;
}

}  // namespace

ExpertWork group_work(std::vector<RowBlock> blocks, std::vector<int32_t> active, int E, int P) {
  ExpertWork w;
  w.blocks = std::move(blocks);
  w.active = std::move(active);
  w.block_begin = group(w.blocks, E, P, [](const RowBlock& b) { return b.e; });
  w.active_begin = group(w.active, E, P, [](int32_t e) { return static_cast<int>(e); });
  return w;
}

}  // namespace moetune
