#include "engine/context.h"

#include <chrono>
#include <stdexcept>

#include "kernels/cpu.h"

namespace moetune {

void Job::wait() const {
  if (!f_.valid()) throw std::logic_error("moetune: waiting on an empty job");
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
      pool_(checked_threads(options_.num_threads), options_.cpus) {
  arenas_.resize(pool_.size());
  dispatcher_ = std::thread([this] { dispatcher_loop(); });
}

Context::~Context() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  dispatcher_.join();
}

std::string Context::info() const {
  return std::string("isa=") + kernels::isa_name(kernels_->isa) + " kernel=" + kernels_->name +
         " threads=" + std::to_string(pool_.size()) + " cpu: " + kernels::cpu_summary();
}

Job Context::submit(std::function<void()> work) {
  std::packaged_task<void()> task(std::move(work));
  std::shared_future<void> f = task.get_future().share();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) throw std::logic_error("moetune: context is shutting down");
    queue_.push_back(std::move(task));
  }
  cv_.notify_one();
  return Job(std::move(f));
}

void Context::dispatcher_loop() {
  pool_.pin_caller();
  for (;;) {
    std::packaged_task<void()> task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and drained
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    task();  // exceptions are stored in the future
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
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
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
