#!/usr/bin/env bash
# Everything the GPU test machine proves, in one command (see BENCHMARKS.md):
#   bash benchmarks/device_run.sh            (through the device tool: carry .dev)
# Builds and installs moetune against the machine's own torch/nanobind (no
# network there), builds the C++ tests against a carried libgtest-dev .deb,
# runs ctest, pytest (CUDA tests included), and the MoE layer benchmark.
# Logs go to $OUT (or ./device-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  echo "== machine"; lscpu | grep -E "Model name|^CPU\(s\)"; grep -o 'amx[a-z_0-9]*\|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"

echo "== build + install" | tee "$OUT/build.log"
python3 -m pip install -q --no-build-isolation --no-deps . >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import moetune; print(moetune.Context(16).info())" 2>&1 | tee -a "$OUT/build.log"

echo "== C++ tests"
if ls .dev/libgtest-dev_*.deb >/dev/null 2>&1; then
  mkdir -p /tmp/gtest && dpkg -x .dev/libgtest-dev_*.deb /tmp/gtest
  cmake -S . -B /tmp/build-tests -DCMAKE_BUILD_TYPE=Release -DMOETUNE_BUILD_TESTS=ON \
    -DCMAKE_PREFIX_PATH=/tmp/gtest/usr -DGTest_DIR=/tmp/gtest/usr/lib/x86_64-linux-gnu/cmake/GTest >/dev/null &&
  cmake --build /tmp/build-tests -j 16 >/dev/null 2>&1 &&
  ctest --test-dir /tmp/build-tests -j 16 2>&1 | tail -5 | tee "$OUT/ctest.txt"
else
  echo "no .dev/libgtest-dev_*.deb carried: C++ tests not run" | tee "$OUT/ctest.txt"
fi

echo "== Python tests (CUDA included)"
python3 -m pytest -q tests/python 2>&1 | tail -15 | tee "$OUT/pytest.txt"

echo "== benchmark"
python3 benchmarks/bench_moe_layer.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt"
