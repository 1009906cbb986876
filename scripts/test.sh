#!/usr/bin/env bash
# Runs the style checks (scripts/lint.sh) and every test suite: the C++
# GoogleTest suite (kernels + engine, via ctest) and the Python suite (pytest). Installs what is missing first, so it
# works on a fresh machine. Fails on the first failing suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# GoogleTest; SIMDe (portable AVX-512, for the emulated AVX512-BF16 dequant test on CPUs without it).
if ! { [ -f /usr/include/gtest/gtest.h ] || [ -f /usr/local/include/gtest/gtest.h ]; } ||
   ! [ -f /usr/include/simde/x86/avx512.h ]; then
  echo "[test] installing GoogleTest and SIMDe (Debian libgtest-dev libsimde-dev)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq libgtest-dev libsimde-dev >/dev/null
fi
bash scripts/install.sh

echo "[test] style (ruff, clang-format)"
bash scripts/lint.sh

echo "[test] C++ suite"
cmake -S . -B build/tests -DCMAKE_BUILD_TYPE=Release -DMOETUNE_BUILD_TESTS=ON >/dev/null
cmake --build build/tests -j "$(nproc)"
ctest --test-dir build/tests --output-on-failure -j "$(nproc)"

echo "[test] C++ suite under sanitizers (ASan+UBSan; TSan for the threading tests)"
bash scripts/sanitize.sh

echo "[test] Python suite"
"$PY" -m pytest -q tests/python
