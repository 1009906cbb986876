// moetune engine: the Context, which owns everything stateful the engine
// needs — options, the worker pool, per-worker scratch, the selected kernel
// bundle, and the job queue. No globals: two Contexts are fully independent (tests
// use several with different ISAs and thread counts side by side).
//
// Jobs (one layer's forward or backward) are executed one at a time, in
// submission order, by the Context's dispatcher thread, which drives the pool.
// submit() returns at once with a Job to wait on, so the caller (GPU work,
// the next layer's setup) overlaps with the CPU experts. An exception thrown
// inside a job surfaces from Job::wait() with its message intact.
//
// Lifetimes: a job's callable (and everything it captured) is destroyed on the
// dispatcher as soon as it has run, before its Job becomes ready, so a Job kept
// alive (e.g. by a Python exception between submit and wait) holds only its
// result, never the objects the work used; Jobs, their Context and the objects
// that queued them may be destroyed in any order.
//
// Fork: the worker threads do not exist in a forked child. A Context records
// the process that created it; in another process submit() and Job::wait()
// throw std::runtime_error (instead of waiting forever), and the destructor
// leaks the dead threads' handles instead of joining them.
//
// NUMA partitions (ContextOptions::partitions, engine/partitions.h): the
// workers split into one group per node, pinned to its CPUs;
// parallel_for_partitioned runs each partition's tasks only on its workers
// (MoeExperts gives each expert's tasks to the partition holding its weights).
// Without partitions (or with one) every loop is the plain parallel_for.
//
// Sharing cores with PyTorch: the engine uses num_threads threads (the
// dispatcher is worker 0). Give torch the other cores (torch.set_num_threads)
// or pin the engine with `cpus` to cores torch does not use; never let both
// claim all cores, or each slows the other down by oversubscription.
#pragma once

#include <sys/types.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "engine/arena.h"
#include "engine/buffer.h"
#include "engine/thread_pool.h"
#include "kernels/kernel_bundle.h"

namespace moetune {

struct ContextOptions {
  int num_threads = 1;
  std::vector<int> cpus;            // optional pinning, worker i -> cpus[i % n]
  std::optional<kernels::Isa> isa;  // force an ISA (error if the CPU lacks it); else the fastest
  // Optional NUMA partitions, one CPU set per node (engine/partitions.h): the
  // workers split per partition, each expert's weights and GEMM tasks on one
  // partition. Empty = none; not together with cpus.
  CpuSets partitions;
};

class Job {
 public:
  Job() = default;
  Job(std::shared_future<void> f, pid_t owner_pid) : f_(std::move(f)), pid_(owner_pid) {}
  // Rethrows the job's exception, if any; throws std::runtime_error in a
  // forked child (the job can never run there).
  void wait() const;
  bool ready() const;
  bool valid() const { return f_.valid(); }

 private:
  std::shared_future<void> f_;
  pid_t pid_ = 0;
};

class Context {
 public:
  explicit Context(ContextOptions options);
  ~Context();  // waits for queued jobs
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  const ContextOptions& options() const { return options_; }
  // True in a process forked from the one that created this Context (its
  // worker threads do not exist there).
  bool forked() const;
  // The kernels of the ISA chosen at construction, for code running jobs.
  const kernels::KernelBundle& kernels() const { return *kernels_; }

  // Per-call scratch that outlives one phase but not one job (expert-major
  // activations of a forward or backward). Grow-only and reused by the next
  // job, which the serial dispatcher makes safe; only for code inside a job.
  template <typename T>
  struct Scratch {
    T* ptr;
    T* data() const { return ptr; }
  };
  template <typename T>
  Scratch<T> workspace(int slot, size_t n) {
    if (slot >= static_cast<int>(workspace_.size())) workspace_.resize(slot + 1);
    return Scratch<T>{
        reinterpret_cast<T*>(workspace_[slot].reserve((n * sizeof(T) + 63) / 64 * 64))};
  }
  int num_threads() const { return pool_.size(); }
  // NUMA partitions (1 without partitioning) and their CPU sets.
  int num_partitions() const { return pool_.partitions(); }
  const CpuSets& partition_cpus() const { return pool_.partition_cpus(); }
  // Tasks run by each partition's workers in partitioned loops (profiling, tests).
  std::vector<int64_t> partition_task_counts() const { return pool_.partition_task_counts(); }
  std::string info() const;

  // Enqueue work; it runs on the dispatcher thread, which may call
  // parallel_for. Only code running inside a job may use the pool/arenas.
  Job submit(std::function<void()> work);
  void run(std::function<void()> work) { submit(std::move(work)).wait(); }

  // For code running inside a job: parallel loop with a fresh arena per task.
  // `phase` names the loop in the phase profile (a string literal).
  void parallel_for(const char* phase, int64_t n,
                    const std::function<void(int64_t task, Arena& scratch)>& fn);
  // The same with tasks [begin[p], begin[p+1]) run only by workers of NUMA
  // partition p (begin: num_partitions() + 1 offsets); with one partition it
  // is parallel_for(phase, begin.back(), fn).
  void parallel_for_partitioned(const char* phase, const std::vector<int64_t>& begin,
                                const std::function<void(int64_t task, Arena& scratch)>& fn);

  // Wall time spent in each named phase since the last reset, in seconds,
  // and the number of calls. Cheap (two clock reads per phase), always on.
  std::vector<std::tuple<std::string, double, int64_t>> phase_profile() const;
  void reset_phase_profile();

 private:
  void dispatcher_loop();
  void record_phase(const char* phase, double seconds);

  ContextOptions options_;
  const kernels::KernelBundle* kernels_;
  std::vector<Buf<unsigned char>> workspace_;
  ThreadPool pool_;
  std::vector<Arena> arenas_;

  struct PhaseStat {
    const char* name;
    double seconds;
    int64_t calls;
  };
  mutable std::mutex profile_mu_;
  std::vector<PhaseStat> profile_;

  std::mutex mu_;
  // On the heap so a forked child can leak it: the dispatcher waited on it at
  // the fork, and glibc's condvar destructor waits for its waiters to leave.
  std::unique_ptr<std::condition_variable> cv_ = std::make_unique<std::condition_variable>();
  struct Queued {
    std::function<void()> work;
    std::promise<void> done;
  };
  std::deque<Queued> queue_;
  pid_t pid_;  // the creating process
  bool stop_ = false;
  std::thread dispatcher_;
};

}  // namespace moetune
