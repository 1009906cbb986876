// moetune engine: per-worker scratch memory. A task takes what it needs with
// alloc<T>(n) and the arena is reset at the start of the next task; blocks
// are kept and reused, so steady-state training does no heap allocation in
// the hot loops. Not thread-safe: one arena per worker.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>
#include <vector>

namespace moetune {

class Arena {
 public:
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  Arena(Arena&&) = default;

  template <typename T>
  T* alloc(size_t n) {
    return static_cast<T*>(alloc_bytes(n * sizeof(T)));
  }
  void reset();
  size_t capacity() const;

 private:
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  struct Block {
    std::unique_ptr<char, Free> mem;
    size_t size = 0;
    size_t used = 0;
  };
  void* alloc_bytes(size_t bytes);
  std::vector<Block> blocks_;
};

}  // namespace moetune
