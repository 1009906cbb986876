// moetune engine: an owning, 64-byte aligned, uninitialised array. Used for
// the per-call expert-major activations (they are always fully written before
// being read, so zero-filling them would be a wasted pass over memory).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

namespace moetune {

template <typename T>
class Buf {
 public:
  Buf() = default;
  explicit Buf(size_t n) { resize(n); }
  void resize(size_t n) {
    n_ = n;
    if (n == 0) {
      p_.reset();
      return;
    }
    const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
    void* mem = std::aligned_alloc(64, bytes);
    if (!mem) throw std::bad_alloc();
    p_.reset(static_cast<T*>(mem));
  }
  void clear() { resize(0); }
  T* data() { return p_.get(); }
  const T* data() const { return p_.get(); }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> p_;
  size_t n_ = 0;
};

}  // namespace moetune
