#include "engine/partitions.h"

#include <sched.h>

#include <set>
#include <stdexcept>

namespace moetune {

std::string cpulist(const std::vector<int>& cpus) {
  std::set<int> s(cpus.begin(), cpus.end());
  std::vector<int> v(s.begin(), s.end());
  std::string out;
  for (size_t i = 0; i < v.size();) {
    size_t j = i;
    while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
    out += (out.empty() ? "" : ",") + std::to_string(v[i]);
    if (j > i) out += "-" + std::to_string(v[j]);
    i = j + 1;
  }
  return out;
}

void check_allowed_cpu(int c, const std::string& what) {
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0)
    throw std::runtime_error("moetune: sched_getaffinity failed");
  if (c >= 0 && c < CPU_SETSIZE && CPU_ISSET(c, &allowed)) return;
  std::vector<int> ok;
  for (int i = 0; i < CPU_SETSIZE; ++i)
    if (CPU_ISSET(i, &allowed)) ok.push_back(i);
  throw std::invalid_argument("moetune: " + what + ": core " + std::to_string(c) +
                              " is not one this process may run on (allowed: " + cpulist(ok) + ")");
}

void check_partitions(const CpuSets& partitions, int num_threads) {
  const int P = static_cast<int>(partitions.size());
  if (P > num_threads) {
    throw std::invalid_argument("moetune: partitions: " + std::to_string(P) +
                                " NUMA partitions need at least as many threads, got num_threads=" +
                                std::to_string(num_threads));
  }
  std::set<int> seen;
  for (int p = 0; p < P; ++p) {
    const std::string what = "partitions[" + std::to_string(p) + "]";
    if (partitions[p].empty())
      throw std::invalid_argument("moetune: " + what + " is empty (every partition needs a CPU)");
    for (int c : partitions[p]) {
      check_allowed_cpu(c, what);
      if (!seen.insert(c).second) {
        throw std::invalid_argument("moetune: " + what + ": core " + std::to_string(c) +
                                    " is also in an earlier partition (partitions are disjoint)");
      }
    }
  }
}

std::vector<int> partition_workers(int num_threads, int P) {
  std::vector<int> b(P + 1);
  for (int p = 0; p <= P; ++p) b[p] = static_cast<int>(int64_t(num_threads) * p / P);
  return b;
}

std::vector<int> partition_experts(int E, int P) {
  std::vector<int> b(P + 1);
  for (int p = 0; p <= P; ++p) b[p] = static_cast<int>(int64_t(E) * p / P);
  return b;
}

int expert_partition(int e, int E, int P) {
  // The largest p with E*p/P <= e, i.e. floor(((e+1)*P - 1) / E).
  return static_cast<int>((int64_t(e + 1) * P - 1) / E);
}

}  // namespace moetune
