// moetune engine: NUMA partitions of one Context — which worker and which
// expert belongs to which partition (one partition per NUMA node, or per
// virtual node in tests). Pure functions, no threads, no sysfs: the Python
// layer (moetune.topology, the one reader of the host's nodes) passes the
// partitions down as CPU sets.
//
// Why partitions: on a 2-socket host a single process whose workers take any
// task reads every expert's weights across the socket link half the time.
// With partitions, each expert lives in the memory of one node (first-touched
// by a worker of that node, see MoeExperts) and every GEMM task of it runs on
// a worker of that node, so weights never cross sockets; token rows do, which
// is the cheap direction (T*H activations vs E*3*H*I weights per layer).
//
// Assignments (each computed here and nowhere else):
//   workers: partition p owns workers [n*p/P, n*(p+1)/P) of n (balanced,
//            contiguous; worker 0, the dispatcher, is in partition 0);
//            worker j of a partition is pinned to cpus[p][j % |cpus[p]|].
//   experts: partition p owns experts [E*p/P, E*(p+1)/P) (balanced,
//            contiguous, so a partition's share of each weight buffer is one
//            byte range); partitions beyond E own none.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moetune {

using CpuSets = std::vector<std::vector<int>>;

// Checks partitions for a pool of num_threads workers: each non-empty, every
// CPU one this process may run on (sched_getaffinity), no CPU in two
// partitions, at most num_threads partitions. std::invalid_argument naming
// the partition and CPU otherwise. Zero partitions are valid (no
// partitioning).
void check_partitions(const CpuSets& partitions, int num_threads);

// [P + 1] first worker of each partition (see the header comment), P >= 1.
std::vector<int> partition_workers(int num_threads, int P);

// [P + 1] first expert of each partition, P >= 1.
std::vector<int> partition_experts(int E, int P);
// The partition owning expert e (of E, P partitions).
int expert_partition(int e, int E, int P);

// Throws std::invalid_argument "moetune: <what>: core c is not one this
// process may run on (allowed: ...)" unless c is in the process's affinity mask.
void check_allowed_cpu(int c, const std::string& what);

// "0-3,8" (a Linux cpulist) for messages and Context::info.
std::string cpulist(const std::vector<int>& cpus);

}  // namespace moetune
