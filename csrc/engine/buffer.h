// moetune engine: an owning, 64-byte aligned, uninitialised array. Used for
// the per-call expert-major activations (they are always fully written before
// being read, so zero-filling them would be a wasted pass over memory).
#pragma once

#include <sys/mman.h>

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
  // min_align (a power of two >= 64): the allocation starts on a multiple of
  // it and spans a whole number of such units, so it never shares one with
  // another allocation (page-aligned buffers can be page-locked in place).
  void resize(size_t n, size_t min_align = 64) {
    n_ = n;
    if (n == 0) {
      p_.reset();
      return;
    }
    // Large buffers: 2 MiB aligned and advised as huge pages, so first touch
    // costs one fault per 2 MiB instead of per 4 KiB (activations of a layer
    // are hundreds of MB and are allocated every step).
    size_t align = n * sizeof(T) >= (size_t(4) << 20) ? (size_t(2) << 20) : 64;
    if (min_align > align) align = min_align;
    const size_t bytes = (n * sizeof(T) + align - 1) / align * align;
    void* mem = std::aligned_alloc(align, bytes);
    if (!mem) throw std::bad_alloc();
    if (align > 64) madvise(mem, bytes, MADV_HUGEPAGE);
    p_.reset(static_cast<T*>(mem));
  }
  void clear() { resize(0); }
  // Grow-only: keeps the allocation when it is already large enough.
  T* reserve(size_t n) {
    if (n > n_) resize(n);
    return data();
  }
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
