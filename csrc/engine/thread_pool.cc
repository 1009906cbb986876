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
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0)
    throw std::runtime_error("moetune: sched_getaffinity failed");
  for (int c : cpus) {
    if (c < 0 || c >= CPU_SETSIZE || !CPU_ISSET(c, &allowed)) {
      std::string ok;
      for (int i = 0; i < CPU_SETSIZE; ++i)
        if (CPU_ISSET(i, &allowed)) ok += (ok.empty() ? "" : ",") + std::to_string(i);
      throw std::invalid_argument("moetune: cpus: core " + std::to_string(c) +
                                  " is not one this process may run on (allowed: " + ok + ")");
    }
  }
  return cpus;
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

ThreadPool::ThreadPool(int num_threads, std::vector<int> cpus)
    : num_threads_(num_threads), pid_(getpid()), cpus_(checked_cpus(std::move(cpus))) {
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

void ThreadPool::pin_caller() const {
  if (!cpus_.empty()) pin_to(cpus_[0]);
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

void ThreadPool::worker_loop(int worker) {
  if (!cpus_.empty()) pin_to(cpus_[worker % cpus_.size()]);
  uint32_t seen = 0;
  for (;;) {
    spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
    uint32_t g;
    while ((g = generation_.load(std::memory_order_acquire)) == seen)
      futex_wait(&generation_, seen);
    seen = g;
    if (stop_.load(std::memory_order_relaxed)) return;
    run_tasks(worker);
    if (busy_workers_.fetch_sub(1, std::memory_order_acq_rel) == 1) futex_wake(&busy_workers_, 1);
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int)>& fn) {
  if (n <= 0) return;
  if (num_threads_ == 1 || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  fn_ = &fn;
  n_tasks_ = n;
  next_.store(0, std::memory_order_relaxed);
  failed_.store(false, std::memory_order_relaxed);
  error_ = nullptr;
  busy_workers_.store(static_cast<uint32_t>(num_threads_ - 1), std::memory_order_relaxed);
  generation_.fetch_add(1, std::memory_order_release);  // publishes the stores above
  futex_wake(&generation_, INT_MAX);
  run_tasks(0);
  // The others finish within about one task of this thread.
  spin_until([&] { return busy_workers_.load(std::memory_order_acquire) == 0; });
  for (uint32_t b; (b = busy_workers_.load(std::memory_order_acquire)) != 0;)
    futex_wait(&busy_workers_, b);
  fn_ = nullptr;
  if (error_) std::rethrow_exception(error_);
}

}  // namespace moetune
