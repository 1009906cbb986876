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
#include <mutex>
#include <thread>
#include <vector>

namespace moetune {

class ThreadPool {
 public:
  ThreadPool(int num_threads, std::vector<int> cpus);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return num_threads_; }
  void parallel_for(int64_t n, const std::function<void(int64_t task, int worker)>& fn);
  // Pins the calling thread as worker 0 would be (no-op without cpus).
  void pin_caller() const;

 private:
  void worker_loop(int worker);
  void run_tasks(int worker);

  void stop_and_join();

  const int num_threads_;
  const pid_t pid_;  // the creating process (fork detection)
  const std::vector<int> cpus_;
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
};

}  // namespace moetune
