// The machine's ceilings, measured (not quoted), for BENCHMARKS.md:
//   1. AMX-BF16 peak: a register-only tile loop (tdpbf16ps on 4 accumulator
//      tiles, no loads in the loop) on 1 and N threads.
//   2. AVX512-BF16 peak: vdpbf16ps on 16 independent accumulators.
//   3. DRAM read bandwidth: N threads summing disjoint slices of a 4 GiB array.
// Build (any x86-64 compiler; the ISA-specific parts are per-function targets
// and only run after a CPUID/permission check):
//   g++ -O2 -pthread -std=c++17 benchmarks/ceiling/ceiling.cc -o ceiling && ./ceiling [threads]
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <typename F>
double run_threads(int n, F f) {  // returns wall seconds
  std::vector<std::thread> ts;
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  double t0 = 0;
  for (int i = 0; i < n; ++i)
    ts.emplace_back([&, i] {
      ready++;
      while (!go.load()) {
      }
      f(i);
    });
  while (ready.load() < n) {
  }
  t0 = now();
  go = true;
  for (auto& t : ts) t.join();
  return now() - t0;
}

struct alignas(64) TileCfg {
  uint8_t palette, start;
  uint8_t res[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Eight 16 x 64-byte tiles (palette 1), as the GEMM kernel configures them.
__attribute__((target("amx-tile,amx-bf16"))) void load_tile_config() {
  TileCfg c;
  std::memset(&c, 0, sizeof(c));
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

__attribute__((target("amx-tile,amx-bf16"))) void amx_loop(long iters) {
  load_tile_config();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (long i = 0; i < iters; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_release();
}

// The GEMM kernel's inner step (2 A + 2 B tile loads, 4 tdpbf16ps) with all
// operands in L1 (4 KiB): what that register block can reach at best.
// pipelined: each tile's next load issued right after its last use.
__attribute__((target("amx-tile,amx-bf16"))) void amx_loads_loop(long iters, bool pipelined) {
  alignas(64) static thread_local uint16_t buf[4][512];
  for (auto& t : buf)
    for (auto& v : t) v = 0x3f80;  // 1.0
  load_tile_config();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  if (!pipelined) {
    for (long i = 0; i < iters; ++i) {
      _tile_loadd(4, buf[0], 64);
      _tile_loadd(6, buf[2], 64);
      _tile_loadd(5, buf[1], 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(7, buf[3], 64);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  } else {
    _tile_loadd(4, buf[0], 64);
    _tile_loadd(5, buf[1], 64);
    _tile_loadd(6, buf[2], 64);
    _tile_loadd(7, buf[3], 64);
    for (long i = 0; i < iters; ++i) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(4, buf[0], 64);
      _tile_dpbf16ps(2, 5, 6);
      _tile_loadd(6, buf[2], 64);
      _tile_dpbf16ps(3, 5, 7);
      _tile_loadd(5, buf[1], 64);
      _tile_loadd(7, buf[3], 64);
    }
  }
  _tile_release();
}

__attribute__((target("avx512f,avx512bf16"))) float avx512_loop(long iters) {
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), y = x;
  for (long i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], x, y);
  }
  __m512 s = acc[0];
  for (int j = 1; j < 16; ++j) s = _mm512_add_ps(s, acc[j]);
  return _mm512_reduce_add_ps(s);
}

bool amx_ok() {
  if (!__builtin_cpu_supports("avx512f")) return false;
  unsigned a, b, c, d;
  __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  if (!(d & (1u << 22)) || !(d & (1u << 24))) return false;
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  const int n = argc > 1 ? atoi(argv[1]) : static_cast<int>(std::thread::hardware_concurrency());
  if (amx_ok()) {
    const long it = 20000000;  // 4 tdpbf16ps x 16x16x32 x 2 flops each
    const double flop = 4.0 * 16 * 16 * 32 * 2 * it;
    for (int t : {1, n}) {
      const double s = run_threads(t, [&](int) { amx_loop(it); });
      printf("AMX-BF16 tile loop, %2d thread(s): %.2f TFLOPS\n", t, flop * t / s / 1e12);
    }
    for (bool pipelined : {false, true}) {
      for (int t : {1, n}) {
        const double s = run_threads(t, [&](int) { amx_loads_loop(it / 2, pipelined); });
        printf("AMX-BF16 2x2 step with L1 tile loads (%s), %2d thread(s): %.2f TFLOPS\n",
               pipelined ? "pipelined" : "kernel order", t, flop / 2 * t / s / 1e12);
      }
    }
  } else {
    printf("AMX-BF16: not available (CPU or OS)\n");
  }
  if (__builtin_cpu_supports("avx512f")) {
    unsigned a, b, c, d;
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(1));
    if (a & (1u << 5)) {
      const long it = 20000000;
      const double flop = 16.0 * 64 * it;
      for (int t : {1, n}) {
        volatile float sink = 0;
        const double s = run_threads(t, [&](int) { sink = avx512_loop(it); });
        printf("AVX512-BF16 vdpbf16ps loop, %2d thread(s): %.2f TFLOPS\n", t, flop * t / s / 1e12);
      }
    }
  }
  const size_t bytes = size_t(4) << 30;
  std::vector<uint64_t> buf(bytes / 8);
  run_threads(n, [&](int i) {  // first touch spread over the threads
    const size_t per = buf.size() / n;
    std::memset(buf.data() + i * per, 1, per * 8);
  });
  for (int t : {1, n}) {
    std::vector<uint64_t> sums(t);
    double best = 1e9;
    for (int rep = 0; rep < 3; ++rep) {
      const double s = run_threads(t, [&](int i) {
        const size_t per = buf.size() / t;
        const uint64_t* p = buf.data() + i * per;
        uint64_t acc0 = 0, acc1 = 0, acc2 = 0, acc3 = 0;
        for (size_t j = 0; j < per; j += 4) {
          acc0 += p[j];
          acc1 += p[j + 1];
          acc2 += p[j + 2];
          acc3 += p[j + 3];
        }
        sums[i] = acc0 + acc1 + acc2 + acc3;
      });
      if (s < best) best = s;
    }
    printf("DRAM read (4 GiB), %2d thread(s): %.1f GB/s\n", t, bytes / best / 1e9);
  }
  return 0;
}
