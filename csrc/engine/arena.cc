#include "engine/arena.h"

namespace moetune {

namespace {
constexpr size_t kAlign = 64;
constexpr size_t kMinBlock = size_t(1) << 20;
}  // namespace

void* Arena::alloc_bytes(size_t bytes) {
  bytes = (bytes + kAlign - 1) / kAlign * kAlign;
  if (bytes == 0) bytes = kAlign;
  for (Block& b : blocks_) {
    if (b.size - b.used >= bytes) {
      void* p = b.mem.get() + b.used;
      b.used += bytes;
      return p;
    }
  }
  size_t size = bytes > kMinBlock ? bytes : kMinBlock;
  void* mem = std::aligned_alloc(kAlign, size);
  if (!mem) throw std::bad_alloc();
  Block b;
  b.mem.reset(static_cast<char*>(mem));
  b.size = size;
  b.used = bytes;
  blocks_.push_back(std::move(b));
  return mem;
}

void Arena::reset() {
  // Merge into one block of the total size once fragmentation appears, so the
  // next task of the same shape is served from a single block.
  if (blocks_.size() > 1) {
    const size_t total = capacity();
    blocks_.clear();
    void* mem = std::aligned_alloc(kAlign, total);
    if (!mem) throw std::bad_alloc();
    Block b;
    b.mem.reset(static_cast<char*>(mem));
    b.size = total;
    blocks_.push_back(std::move(b));
  }
  for (Block& b : blocks_) b.used = 0;
}

size_t Arena::capacity() const {
  size_t total = 0;
  for (const Block& b : blocks_) total += b.size;
  return total;
}

}  // namespace moetune
