#include "engine/thread_pool.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <climits>
#include <stdexcept>
#include <string>
#include <system_error>

namespace moetune {
namespace {

void pin_to(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

// Every id a core this process may run on (pinning to another one fails
// silently in pthread_setaffinity_np, or is not even representable).
std::vector<int> checked_cpus(std::vector<int> cpus) {
  for (int c : cpus) check_allowed_cpu(c, "cpus");
  return cpus;
}

// The CPUs of plain pinning: `cpus`, or the one partition's CPUs.
std::vector<int> pool_cpus(std::vector<int> cpus, const CpuSets& partitions, int num_threads) {
  if (!partitions.empty() && !cpus.empty())
    throw std::invalid_argument(
        "moetune: give either cpus or NUMA partitions, not both (partitions pin the workers)");
  check_partitions(partitions, num_threads);
  return partitions.size() == 1 ? partitions[0] : checked_cpus(std::move(cpus));
}

constexpr int kSpinIterations = 20000;

// Sleeps while *word == expected (spurious returns are fine: callers loop).
void futex_wait(std::atomic<uint32_t>* word, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected, nullptr,
          nullptr, 0);
}
void futex_wake(std::atomic<uint32_t>* word, int n) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, n, nullptr, nullptr, 0);
}

// Spins (with pause) until done() or for kSpinIterations: phases of a layer
// follow each other within microseconds, a futex sleep costs a wake-up IPI
// (~0.1 ms on a VM's idle vCPU).
template <typename Done>
void spin_until(Done done) {
  for (int spins = 0; !done() && spins < kSpinIterations; ++spins) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
}

}  // namespace

ThreadPool::ThreadPool(int num_threads, std::vector<int> cpus, CpuSets partitions)
    : num_threads_(num_threads),
      pid_(getpid()),
      cpus_(pool_cpus(std::move(cpus), partitions, num_threads)),
      part_cpus_(std::move(partitions)),
      num_parts_(part_cpus_.size() >= 2 ? static_cast<int>(part_cpus_.size()) : 1),
      part_workers_(partition_workers(num_threads, num_parts_)),
      part_queues_(new PartQueue[num_parts_]) {
  if (num_threads < 1) throw std::invalid_argument("moetune: num_threads must be >= 1");
  threads_.reserve(num_threads_ - 1);
  try {
    for (int w = 1; w < num_threads_; ++w) threads_.emplace_back([this, w] { worker_loop(w); });
  } catch (const std::system_error& e) {
    // The destructor does not run for a throwing constructor: stop the
    // workers started so far here (a joinable std::thread would abort).
    const size_t started = threads_.size();
    stop_and_join();
    throw std::runtime_error("moetune: could not start engine worker thread " +
                             std::to_string(started + 1) + " of " + std::to_string(num_threads_) +
                             " (" + e.what() + "); use fewer threads or raise the process limits");
  }
}

ThreadPool::~ThreadPool() {
  if (getpid() != pid_) {
    // Forked child: the workers do not exist here; leak their handles.
    new std::vector<std::thread>(std::move(threads_));
    return;
  }
  stop_and_join();
}

void ThreadPool::stop_and_join() {
  stop_.store(true, std::memory_order_relaxed);
  generation_.fetch_add(1, std::memory_order_release);
  futex_wake(&generation_, INT_MAX);
  for (std::thread& t : threads_) t.join();
}

int ThreadPool::partition_of(int worker) const {
  int p = 0;
  while (worker >= part_workers_[p + 1]) ++p;
  return p;
}

int ThreadPool::cpu_of(int worker) const {
  if (num_parts_ > 1) {
    const int p = partition_of(worker);
    const std::vector<int>& set = part_cpus_[p];
    return set[(worker - part_workers_[p]) % set.size()];
  }
  return cpus_.empty() ? -1 : cpus_[worker % cpus_.size()];
}

void ThreadPool::pin_caller() const {
  if (const int c = cpu_of(0); c >= 0) pin_to(c);
}

std::vector<int64_t> ThreadPool::partition_task_counts() const {
  std::vector<int64_t> out(num_parts_);
  for (int p = 0; p < num_parts_; ++p) out[p] = part_queues_[p].ran.load(std::memory_order_relaxed);
  return out;
}

void ThreadPool::run_tasks(int worker) {
  for (;;) {
    if (failed_.load(std::memory_order_relaxed)) return;
    const int64_t task = next_.fetch_add(1, std::memory_order_relaxed);
    if (task >= n_tasks_) return;
    try {
      (*fn_)(task, worker);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
      failed_.store(true);
    }
  }
}

void ThreadPool::run_partition_tasks(int worker) {
  PartQueue& q = part_queues_[partition_of(worker)];
  int64_t ran = 0;
  for (;;) {
    if (failed_.load(std::memory_order_relaxed)) break;
    const int64_t task = q.next.fetch_add(1, std::memory_order_relaxed);
    if (task >= q.end) break;
    try {
      (*fn_)(task, worker);
      ++ran;
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
      failed_.store(true);
    }
  }
  if (ran) q.ran.fetch_add(ran, std::memory_order_relaxed);
}

void ThreadPool::worker_loop(int worker) {
  if (const int c = cpu_of(worker); c >= 0) pin_to(c);
  uint32_t seen = 0;
  for (;;) {
    spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
    uint32_t g;
    while ((g = generation_.load(std::memory_order_acquire)) == seen)
      futex_wait(&generation_, seen);
    seen = g;
    if (stop_.load(std::memory_order_relaxed)) return;
    run_job(worker);
    if (busy_workers_.fetch_sub(1, std::memory_order_acq_rel) == 1) futex_wake(&busy_workers_, 1);
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int)>& fn) {
  if (n <= 0) return;
  if (num_threads_ == 1 || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  start_job(n, fn, /*partitioned=*/false);
  run_tasks(0);
  finish_job();
}

void ThreadPool::parallel_for_partitioned(const std::vector<int64_t>& begin,
                                          const std::function<void(int64_t, int)>& fn) {
  if (static_cast<int>(begin.size()) != num_parts_ + 1 || begin[0] != 0)
    throw std::logic_error(
        "moetune: parallel_for_partitioned: begin must have partitions() + 1 "
        "offsets starting at 0");
  if (num_parts_ == 1) return parallel_for(begin[1], fn);
  const int64_t n = begin.back();
  if (n <= 0) return;
  for (int p = 0; p < num_parts_; ++p) {
    if (begin[p + 1] < begin[p])
      throw std::logic_error("moetune: parallel_for_partitioned: offsets must not decrease");
    part_queues_[p].next.store(begin[p], std::memory_order_relaxed);
    part_queues_[p].end = begin[p + 1];
  }
  start_job(n, fn, /*partitioned=*/true);
  run_partition_tasks(0);
  finish_job();
}

void ThreadPool::start_job(int64_t n, const std::function<void(int64_t, int)>& fn,
                           bool partitioned) {
  fn_ = &fn;
  n_tasks_ = n;
  partitioned_job_ = partitioned;
  next_.store(0, std::memory_order_relaxed);
  failed_.store(false, std::memory_order_relaxed);
  error_ = nullptr;
  busy_workers_.store(static_cast<uint32_t>(num_threads_ - 1), std::memory_order_relaxed);
  generation_.fetch_add(1, std::memory_order_release);  // publishes the stores above
  futex_wake(&generation_, INT_MAX);
}

void ThreadPool::finish_job() {
  // The others finish within about one task of this thread.
  spin_until([&] { return busy_workers_.load(std::memory_order_acquire) == 0; });
  for (uint32_t b; (b = busy_workers_.load(std::memory_order_acquire)) != 0;)
    futex_wait(&busy_workers_, b);
  fn_ = nullptr;
  if (error_) std::rethrow_exception(error_);
}

}  // namespace moetune
