#!/usr/bin/env bash
# What the GPU test machine (H100 + 16-core AMX Xeon) proves, rerunnable with
#   bash benchmarks/device_run.sh tests     # build, ctest (AMX kernels included), pytest (CUDA included)
#   bash benchmarks/device_run.sh kernels   # C++ only: gtest (AMX included), ceilings, bench_gemm at 16 and 8 threads
#   bash benchmarks/device_run.sh engine    # engine options (phase profile), bf16/int8/int4 vs the measured
#                                           # ceilings (Qwen3), MoE layer vs PyTorch at T=4096
#   bash benchmarks/device_run.sh options   # engine options benchmark: AMX vs AVX512-BF16, 16 threads
#   bash benchmarks/device_run.sh layer     # MoE layer benchmark vs PyTorch baselines, 16 threads
#   bash benchmarks/device_run.sh peft      # the transformers + PEFT path at T=1024
#   bash benchmarks/device_run.sh ceiling   # measured AMX / AVX512-BF16 peaks and DRAM read bandwidth
#   bash benchmarks/device_run.sh quant     # bf16 / int8 / int4 fwd+bwd times, Qwen3 + DeepSeek shapes
#   bash benchmarks/device_run.sh dequant   # C++ suite + dequantization throughput per format and ISA
#   bash benchmarks/device_run.sh formats qwen3|deepseek  # published formats vs bf16, fwd+bwd of one layer
#   bash benchmarks/device_run.sh load      # load_model: CUDA family tests + load RSS/throughput (Qwen3-30B-shaped, 8 layers)
#   bash benchmarks/device_run.sh load-cache  # load_model's packed-experts cache: int4 load without / cold / warm cache (4 layers)
#   bash benchmarks/device_run.sh gtest     # C++ suite only (AMX included)
#   bash benchmarks/device_run.sh sanitize  # scripts/sanitize.sh (ASan+UBSan, TSan) with the AVX-512/AMX kernels
#   bash benchmarks/device_run.sh placement-tests  # CUDA tests of the placement layer (GPU path, scheduler, wiring)
#   bash benchmarks/device_run.sh placement-layer qwen3|deepseek  # one layer placed 4 ways + scheduler timing
#   bash benchmarks/device_run.sh train-step qwen3|deepseek       # end-to-end training steps: cpu / auto / peft
#   bash benchmarks/device_run.sh ep-one-host  # expert parallelism on one host: 1 process on 16 cores vs 2 pinned
#                                           # ranks (gloo) on 8 + 8, Qwen3-30B-A3B layer shapes; non-expert part on
#                                           # the one GPU (shared by both ranks: not a multi-GPU test), then on the CPU
#   bash benchmarks/device_run.sh ktkernel qwen3|deepseek   # vs kt-kernel's SFT backend (carry .ktk:
#                                           # benchmarks/make_ktk.sh; python 3.12 only)
# Through the device tool, carry .dev (a libgtest-dev .deb from Debian, for
# the C++ tests: that machine has no package index). Builds against the
# machine's own torch/nanobind/scikit-build-core. Logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
mode=${1:-tests}

{
  echo "== machine"; lscpu | grep -E "Model name|^CPU\(s\)"
  grep -o 'amx[a-z_0-9]*\|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} >"$OUT/machine.txt" 2>&1

if [ "$mode" != kernels ] && [ "$mode" != sanitize ] && [ "$mode" != dequant ]; then
  python3 -m pip install -q --no-build-isolation --no-deps . >"$OUT/build-$mode.log" 2>&1 || { tail -40 "$OUT/build-$mode.log"; exit 1; }
  python3 -c "import moetune; print(moetune.Context(16).info())" | tee -a "$OUT/machine.txt"
fi

run_gtest() {
  if ls .dev/libgtest-dev_*.deb >/dev/null 2>&1; then
    mkdir -p /tmp/gtest && dpkg -x .dev/libgtest-dev_*.deb /tmp/gtest
    cmake -S . -B /tmp/build-tests -DCMAKE_BUILD_TYPE=Release -DMOETUNE_BUILD_TESTS=ON \
      -DGTest_DIR=/tmp/gtest/usr/lib/x86_64-linux-gnu/cmake/GTest >"$OUT/ctest.log" 2>&1 &&
      cmake --build /tmp/build-tests -j 16 >>"$OUT/ctest.log" 2>&1 &&
      /tmp/build-tests/moetune_tests --gtest_brief=1 >>"$OUT/ctest.log" 2>&1
    echo "gtest rc=$?"; grep -E "tests ran|PASSED|FAILED" "$OUT/ctest.log" | tail -5
    grep -c "amx_bf16" "$OUT/ctest.log" | sed 's/^/lines mentioning amx_bf16: /'
  else
    echo "no .dev/libgtest-dev_*.deb carried: C++ tests not run"
  fi
}

# The C++ suite and micro-benchmarks in /tmp/build-k, then the whole suite (AMX included).
build_kernels_and_gtest() {
  mkdir -p /tmp/gtest && dpkg -x .dev/libgtest-dev_*.deb /tmp/gtest
  cmake -S . -B /tmp/build-k -DCMAKE_BUILD_TYPE=Release -DMOETUNE_BUILD_TESTS=ON -DMOETUNE_BUILD_BENCHMARKS=ON \
    -DGTest_DIR=/tmp/gtest/usr/lib/x86_64-linux-gnu/cmake/GTest >"$OUT/kbuild.log" 2>&1 &&
    cmake --build /tmp/build-k -j 16 >>"$OUT/kbuild.log" 2>&1 || { tail -30 "$OUT/kbuild.log"; exit 1; }
  /tmp/build-k/moetune_tests --gtest_brief=1 >"$OUT/gtest.log" 2>&1
  echo "gtest rc=$?"; grep -E "tests ran|PASSED|FAILED" "$OUT/gtest.log" | tail -8
}

case "$mode" in
tests)
  run_gtest
  python3 -m pytest -q tests/python -p no:cacheprovider 2>&1 | tail -6 | tee "$OUT/pytest.txt"
  ;;
gtest)
  run_gtest
  ;;
sanitize)
  mkdir -p /tmp/gtest && dpkg -x .dev/libgtest-dev_*.deb /tmp/gtest
  CMAKE_PREFIX_PATH=/tmp/gtest/usr bash scripts/sanitize.sh >"$OUT/sanitize.log" 2>&1
  echo "sanitize rc=$?"; grep -E "tests passed|tests failed|ERROR|runtime error|clean" "$OUT/sanitize.log" | tail -12
  ;;
placement-tests)
  python3 -m pytest -q -rs tests/python -p no:cacheprovider -k "cuda or placement" 2>&1 | tee "$OUT/placement-tests.txt" | tail -30
  ;;
placement-layer)
  python3 benchmarks/bench_scheduler.py 2>&1 | tee "$OUT/scheduler.txt"
  python3 benchmarks/bench_placement.py --shapes "${2:-qwen3}" --tokens 1024,4096,16384 --reps 3 \
    --json "$OUT/placement-${2:-qwen3}.json" 2>&1 | tee "$OUT/placement-${2:-qwen3}.txt"
  ;;
train-step)
  if [ "${2:-qwen3}" = deepseek ]; then args="--shape deepseek --layers 2 --seq 4096,16384 --methods cpu,auto,gpu --steps 2 --warmup 1"; else args="--shape qwen3 --layers 8 --seq 1024,4096,16384"; fi
  python3 benchmarks/bench_train_step.py $args --threads 14 --torch-threads 2 --trace "$OUT" \
    --json "$OUT/train-step-${2:-qwen3}.json" 2>&1 | tee "$OUT/train-step-${2:-qwen3}.txt"
  ;;
kernels)
  build_kernels_and_gtest
  g++ -O2 -pthread -std=c++17 benchmarks/ceiling/ceiling.cc -o /tmp/ceiling && /tmp/ceiling 16 2>&1 | tee "$OUT/ceiling.txt"
  /tmp/build-k/bench_gemm ${2:-16 8} 2>&1 | tee "$OUT/bench-gemm.txt"
  ;;
engine)
  python3 benchmarks/bench_engine_options.py --threads 16 --tokens 256 4096 16384 --reps 3 2>&1 | tee "$OUT/options.txt"
  python3 benchmarks/bench_quant.py --threads 16 --configs qwen3 --tokens 256 1024 4096 16384 \
    --formats bf16 int8 int4 --groups 128 --reps 3 --peak-tflops 14.48 --peak-gbs 87.4 2>&1 | tee "$OUT/quant-qwen3.txt"
  python3 benchmarks/bench_moe_layer.py --threads 16 --configs qwen3 --tokens 4096 \
    --routing uniform,skewed --skip-peft --reps 2 2>&1 | tee "$OUT/layer-qwen3.txt"
  ;;
options)
  python3 benchmarks/bench_engine_options.py --threads 16 --tokens 128 1024 4096 2>&1 | tee "$OUT/options-amx.txt"
  python3 benchmarks/bench_engine_options.py --threads 16 --isa avx512_bf16 --tokens 1024 4096 2>&1 | tee "$OUT/options-avx512.txt"
  ;;
layer)
  python3 benchmarks/bench_moe_layer.py --threads 16 --configs qwen3 --tokens 128,1024,4096 \
    --routing uniform,skewed --skip-peft --reps 3 2>&1 | tee "$OUT/layer-qwen3.txt"
  python3 benchmarks/bench_moe_layer.py --threads 16 --configs deepseek --deepseek-experts 64 \
    --tokens 1024,4096 --routing uniform --skip-peft --reps 2 2>&1 | tee "$OUT/layer-deepseek.txt"
  ;;
ceiling)
  g++ -O2 -pthread -std=c++17 benchmarks/ceiling/ceiling.cc -o /tmp/ceiling && /tmp/ceiling 16 2>&1 | tee "$OUT/ceiling.txt"
  ;;
dequant)
  # issue 11, kernels: the C++ suite (the AVX512-BF16 / AMX dequant is proven only on such a CPU) and the
  # dequantization throughput per format and ISA (benchmarks/kernels/bench_dequant.cc)
  build_kernels_and_gtest
  /tmp/build-k/bench_dequant ${2:-1 16} 2>&1 | tee "$OUT/bench-dequant.txt"
  ;;
formats)
  # issue 11: the published formats vs bf16, fwd+bwd of one layer
  if [ "${2:-qwen3}" = deepseek ]; then
    python3 benchmarks/bench_quant.py --threads 16 --configs deepseek --deepseek-experts 64 --tokens 256 4096 \
      --formats bf16 int4 fp8_block mxfp4 --groups 32 --reps 1 --peak-tflops 14.48 --peak-gbs 87.4 2>&1 | tee "$OUT/formats-deepseek.txt"
  else
    python3 benchmarks/bench_quant.py --threads 16 --configs qwen3 --tokens 256 4096 --formats bf16 int8 int4 fp8_block mxfp4 \
      --groups 32 --reps 3 --dequant-paths panels tiles --peak-tflops 14.48 --peak-gbs 87.4 2>&1 | tee "$OUT/formats-qwen3.txt"
  fi
  ;;
quant)
  python3 benchmarks/bench_quant.py --threads 16 --configs qwen3 --tokens 256 1024 4096 16384 \
    --formats bf16 int8 int4 --groups 32 128 --reps 2 2>&1 | tee "$OUT/quant-qwen3.txt"
  python3 benchmarks/bench_quant.py --threads 16 --configs deepseek --deepseek-experts 64 \
    --tokens 256 1024 4096 16384 --formats bf16 int8 int4 --groups 128 --reps 1 2>&1 | tee "$OUT/quant-deepseek.txt"
  ;;
load)
  python3 -m pytest -q -s tests/python/test_hf_cuda.py tests/python/test_load_model.py tests/python/test_merge_export.py \
    -p no:cacheprovider 2>&1 | tee "$OUT/load-tests.txt" | tail -40
  python3 benchmarks/bench_load.py --dir /tmp/bench-load-qwen3 --layers 8 --threads 16 --device cuda 2>&1 | tee "$OUT/load-bench.txt"
  ;;
load-cache)
  python3 -m pytest -q tests/python/test_load_model_cache.py -p no:cacheprovider 2>&1 | tee "$OUT/load-cache-tests.txt" | tail -5
  python3 benchmarks/bench_load.py --dir /tmp/bench-load-qwen3-4l --layers 4 --threads 16 --weight-format int4 \
    --cache-dir /tmp/bench-load-cache 2>&1 | tee "$OUT/load-cache-bench.txt"
  ;;
ktkernel)
  export PYTHONPATH=$PWD/.ktk${PYTHONPATH:+:$PYTHONPATH}
  python3 benchmarks/bench_ktkernel.py --threads 16 --tokens 256 1024 4096 16384 --configs "${2:-qwen3}" \
    --json "$OUT/ktkernel-${2:-qwen3}.json" 2>&1 | tee "$OUT/ktkernel-${2:-qwen3}.txt"
  ;;
ep-one-host)
  for dev in cuda cpu; do
    python3 benchmarks/bench_ep_one_host.py --size medium --cores 16 --device $dev --out "$OUT/ep-one-host-$dev" \
      --json "$OUT/ep-one-host-$dev.json" 2>&1 | tee "$OUT/ep-one-host-$dev.txt"
  done
  ;;
peft)
  python3 benchmarks/bench_moe_layer.py --threads 16 --configs qwen3 --tokens 1024 --routing uniform \
    --reps 1 --skip-loop 2>&1 | tee "$OUT/layer-peft.txt"
  ;;
esac
