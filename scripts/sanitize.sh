#!/usr/bin/env bash
# Sanitizer builds of the C++ suite (run by scripts/test.sh, so by CI):
#   1. ASan + UBSan (MOETUNE_SANITIZE): every C++ test (kernels + engine). Out-of-bounds,
#      use-after-free, leaks and undefined behaviour fail the run.
#   2. ThreadSanitizer (MOETUNE_TSAN): the engine's threading tests: the Context's job queue,
#      the futex thread pool, object lifetimes across threads, re-entrant / interleaved jobs,
#      the thread-count invariants and the NUMA-partitioned pool.
# No suppressions: none is needed (a report fails the run). Each build has its own folder
# (build/asan, build/tsan), so later runs rebuild only what changed.
# Kernels of ISAs this CPU lacks (AVX-512, AMX on an AVX2 machine) skip here; run this script on a
# machine that has them to cover those under ASan too.
set -euo pipefail
cd "$(dirname "$0")/.."
J=$(nproc)

echo "[sanitize] ASan + UBSan build of the C++ suite"
cmake -S . -B build/asan -DCMAKE_BUILD_TYPE=Release -DMOETUNE_BUILD_TESTS=ON -DMOETUNE_SANITIZE=ON >/dev/null
cmake --build build/asan -j "$J" --target moetune_tests
ASAN_OPTIONS=detect_leaks=1:strict_string_checks=1:check_initialization_order=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build/asan --output-on-failure -j "$J"

echo "[sanitize] ThreadSanitizer build of the engine's threading tests"
cmake -S . -B build/tsan -DCMAKE_BUILD_TYPE=Release -DMOETUNE_BUILD_TESTS=ON -DMOETUNE_TSAN=ON >/dev/null
cmake --build build/tsan -j "$J" --target moetune_tests
# The fork test skips itself here (TSan does not support threads in a forked child); it runs in
# the plain and ASan builds.
TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
  ctest --test-dir build/tsan --output-on-failure -j "$J" \
  -R '^(ContextTest|ContextJobs|EngineLifetimes|EngineReentrancy|EngineInterleaved|EngineInvariants|EngineErrors|EngineEdge|NumaThreadPool|NumaEngine)\.'
echo "[sanitize] clean"
