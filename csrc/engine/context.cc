#include "engine/context.h"

#include <unistd.h>

#include <chrono>
#include <stdexcept>

#include "kernels/cpu.h"

namespace moetune {

namespace {
std::runtime_error forked_error() {
  return std::runtime_error(
      "moetune: this engine Context was created in the parent process and cannot be used after "
      "fork() (its worker threads do not exist in the child); create a new moetune.Context in "
      "the child, or start children with the 'spawn' method");
}
}  // namespace

void Job::wait() const {
  if (!f_.valid()) throw std::logic_error("moetune: waiting on an empty job");
  if (pid_ != 0 && pid_ != getpid() && !ready()) throw forked_error();
  f_.get();
}

bool Job::ready() const {
  return f_.valid() && f_.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
}

namespace {
int checked_threads(int n) {
  if (n < 1)
    throw std::invalid_argument("moetune: num_threads must be >= 1, got " + std::to_string(n));
  return n;
}
}  // namespace

Context::Context(ContextOptions options)
    : options_(std::move(options)),
      kernels_(&kernels::select_kernels(options_.isa)),
      pool_(checked_threads(options_.num_threads), options_.cpus, options_.partitions),
      pid_(getpid()) {
  arenas_.resize(pool_.size());
  try {
    dispatcher_ = std::thread([this] { dispatcher_loop(); });
  } catch (const std::system_error& e) {
    // pool_ is fully built: its destructor stops and joins its workers.
    throw std::runtime_error(
        std::string("moetune: could not start the engine's dispatcher thread: ") + e.what());
  }
}

bool Context::forked() const { return getpid() != pid_; }

Context::~Context() {
  if (forked()) {
    // The dispatcher does not exist in this process and mu_ may have been
    // held at the fork: touch neither. Its handle is leaked (joining a thread
    // of another process never returns; destroying a joinable std::thread
    // aborts). The queue's promises are leaked with it.
    new std::thread(std::move(dispatcher_));
    new std::deque<Queued>(std::move(queue_));
    (void)cv_.release();
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_->notify_all();
  dispatcher_.join();
}

std::string Context::info() const {
  std::string parts;
  if (num_partitions() > 1) {
    parts = " numa_partitions=";
    for (int p = 0; p < num_partitions(); ++p)
      parts += (p ? "|" : "") + cpulist(partition_cpus()[p]);
  }
  return std::string("isa=") + kernels::isa_name(kernels_->isa) + " kernel=" + kernels_->name +
         " threads=" + std::to_string(pool_.size()) + parts + " cpu: " + kernels::cpu_summary();
}

Job Context::submit(std::function<void()> work) {
  if (forked()) throw forked_error();
  Queued q{std::move(work), std::promise<void>()};
  std::shared_future<void> f = q.done.get_future().share();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) throw std::logic_error("moetune: context is shutting down");
    queue_.push_back(std::move(q));
  }
  cv_->notify_one();
  return Job(std::move(f), pid_);
}

void Context::dispatcher_loop() {
  pool_.pin_caller();
  for (;;) {
    Queued q;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_->wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and drained
      q = std::move(queue_.front());
      queue_.pop_front();
    }
    std::exception_ptr error;
    try {
      q.work();
    } catch (...) {
      error = std::current_exception();
    }
    // Release the captures first (e.g. the in-flight guard its owner's
    // destructor waits for), then publish: a ready Job owns nothing else.
    q.work = nullptr;
    if (error)
      q.done.set_exception(error);
    else
      q.done.set_value();
  }
}

void Context::parallel_for(const char* phase, int64_t n,
                           const std::function<void(int64_t, Arena&)>& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  pool_.parallel_for(n, [&](int64_t task, int worker) {
    Arena& a = arenas_[worker];
    a.reset();
    fn(task, a);
  });
  record_phase(phase, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

void Context::parallel_for_partitioned(const char* phase, const std::vector<int64_t>& begin,
                                       const std::function<void(int64_t, Arena&)>& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  pool_.parallel_for_partitioned(begin, [&](int64_t task, int worker) {
    Arena& a = arenas_[worker];
    a.reset();
    fn(task, a);
  });
  record_phase(phase, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

void Context::record_phase(const char* phase, double dt) {
  std::lock_guard<std::mutex> lock(profile_mu_);
  for (PhaseStat& p : profile_) {
    if (p.name == phase) {
      p.seconds += dt;
      ++p.calls;
      return;
    }
  }
  profile_.push_back(PhaseStat{phase, dt, 1});
}

std::vector<std::tuple<std::string, double, int64_t>> Context::phase_profile() const {
  std::lock_guard<std::mutex> lock(profile_mu_);
  std::vector<std::tuple<std::string, double, int64_t>> out;
  for (const PhaseStat& p : profile_) out.emplace_back(p.name, p.seconds, p.calls);
  return out;
}

void Context::reset_phase_profile() {
  std::lock_guard<std::mutex> lock(profile_mu_);
  profile_.clear();
}

}  // namespace moetune
