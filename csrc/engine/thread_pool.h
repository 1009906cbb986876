// moetune engine: a persistent worker pool with dynamic task scheduling.
//
// parallel_for(n, fn) runs fn(task, worker) for every task in [0, n) on the
// calling thread (worker 0) plus size()-1 pool threads, which claim tasks
// from one atomic counter (work stealing by construction: a fast worker takes
// more). Workers spin briefly between jobs (phases of one layer follow each
// other within microseconds), then sleep on a futex, so an idle engine costs
// no CPU. A new job wakes every sleeper with one FUTEX_WAKE and no mutex: a
// condition variable + mutex made woken workers queue on the mutex, one
// wake-up IPI after another (milliseconds per layer on a VM). The caller
// spins, then sleeps, until the last worker is done.
// Optional pinning: worker i runs on cpus[i % cpus.size()]; every id must be a
// core this process may run on (std::invalid_argument naming it otherwise).
// NUMA partitions (engine/partitions.h): with P >= 2 CPU sets the workers are
// split into P contiguous groups, each pinned to its set's CPUs, and
// parallel_for_partitioned runs each partition's tasks only on its workers
// (each partition claims from its own counter, on its own cache line). One
// partition is plain pinning to its CPUs. parallel_for is unchanged by
// partitions: all workers claim from one counter, and the only cost the
// partitioned mode adds to it is one predictable branch per job (not per task).
// Construction either starts every worker or throws std::runtime_error (the
// system refused a thread: limits, memory) after stopping the ones it started.
// Destruction in a forked child (where the workers do not exist) leaks their
// handles instead of joining them.
//
// Thread-safety: parallel_for may be called by one thread at a time (the
// Context's dispatcher). An exception thrown by any task stops the claiming of
// new tasks; the first one is rethrown from parallel_for with its message.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "engine/partitions.h"

namespace moetune {

class ThreadPool {
 public:
  // partitions: none, or P CPU sets (check_partitions); not together with cpus.
  ThreadPool(int num_threads, std::vector<int> cpus, CpuSets partitions = {});
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return num_threads_; }
  void parallel_for(int64_t n, const std::function<void(int64_t task, int worker)>& fn);
  // Pins the calling thread as worker 0 would be (no-op without cpus).
  void pin_caller() const;

  // Partitions of the pool (1 without partitioning) and the one of a worker.
  int partitions() const { return num_parts_; }
  int partition_of(int worker) const;
  // The CPU sets given (empty without partitions).
  const CpuSets& partition_cpus() const { return part_cpus_; }
  // Tasks [begin[p], begin[p+1]) run only on workers of partition p
  // (begin: partitions() + 1 non-decreasing offsets, begin[0] = 0). Same
  // contract as parallel_for otherwise; with one partition it is parallel_for.
  void parallel_for_partitioned(const std::vector<int64_t>& begin,
                                const std::function<void(int64_t task, int worker)>& fn);
  // Tasks each partition's workers ran in parallel_for_partitioned since
  // construction (a profiling / test counter; read between jobs).
  std::vector<int64_t> partition_task_counts() const;

 private:
  void worker_loop(int worker);
  void run_tasks(int worker);
  void run_partition_tasks(int worker);
  void run_job(int worker) {
    if (partitioned_job_)
      run_partition_tasks(worker);
    else
      run_tasks(worker);
  }
  int cpu_of(int worker) const;  // the CPU worker is pinned to, -1 = not pinned
  void start_job(int64_t n, const std::function<void(int64_t, int)>& fn, bool partitioned);
  void finish_job();

  void stop_and_join();

  const int num_threads_;
  const pid_t pid_;  // the creating process (fork detection)
  const std::vector<int> cpus_;
  const CpuSets part_cpus_;
  const int num_parts_;
  const std::vector<int> part_workers_;  // [P + 1] first worker of each partition
  std::vector<std::thread> threads_;

  std::mutex mu_;                        // guards error_
  std::atomic<uint32_t> generation_{0};  // futex word: bumped once per job
  std::atomic<bool> stop_{false};

  const std::function<void(int64_t, int)>* fn_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<uint32_t> busy_workers_{0};  // futex word: workers still in the job
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;

  // Partitioned jobs: one claim counter per partition, on its own cache line.
  struct alignas(64) PartQueue {
    std::atomic<int64_t> next{0};
    int64_t end = 0;
    std::atomic<int64_t> ran{0};  // tasks run (profiling; one add per worker per job)
  };
  bool partitioned_job_ = false;  // published with the job by generation_
  std::unique_ptr<PartQueue[]> part_queues_;
};

}  // namespace moetune
