#!/usr/bin/env bash
# Installs moetune and what it needs into the current Python environment:
# torch (the CPU build, only if no torch is installed yet), the build tools,
# and the package itself (compiles the C++ engine via scikit-build-core).
# Idempotent; safe to run again after a code change (it rebuilds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] torch not found: installing torch==2.13.0 (CPU build)"
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q "nanobind==3.1.0" "scikit-build-core>=0.11" numpy "pytest>=8" \
  "transformers>=5.0" "peft>=0.17" "accelerate>=1.0" safetensors \
  "datasets>=3.0" pyyaml tqdm "tensorboardX>=2.6" "matplotlib>=3.7" "trl>=1.16" "hypothesis>=6.100"
# (datasets .. matplotlib: moetune train / demo; trl: its SFTTrainer path, checked
# with trl 1.16 + transformers 5.23; hypothesis: the fuzz tests, which skip where it is absent.)
# compressed-tensors: only tests use it (the independent INT4 decoder the engine's int4 is checked
# against); without an index (the GPU machine) those tests skip.
"$PY" -m pip install -q "compressed-tensors>=0.20" loguru 2>/dev/null \
  || echo "[install] compressed-tensors not installed: its comparison tests will skip"
# wandb / mlflow (skinny + its sqlite backend): optional trackers of --report-to, installed so their
# offline-mode tests run in CI; without an index (the GPU machine) those tests skip.
"$PY" -m pip install -q "wandb>=0.31" "mlflow-skinny>=3.18" "sqlalchemy>=2" alembic 2>/dev/null \
  || echo "[install] wandb / mlflow not installed: their tracker tests will skip"
# nanobind pinned: the committed extension stub (tests/python/test_stub.py) is its output.
# No build isolation: build against the nanobind/scikit-build-core above (the
# GPU test machine has no package index), no dependency resolution (torch is
# handled above and must not be swapped for a different build).
"$PY" -m pip install -q --no-build-isolation --no-deps .
"$PY" -c "import moetune; print('[install] moetune', moetune.__version__, moetune.Context(1).info())"
