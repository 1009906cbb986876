#!/usr/bin/env bash
# Style checks (run by scripts/test.sh): ruff (lint + format, config in pyproject.toml) over the
# Python, clang-format (.clang-format) over the C++. Pinned versions, installed if missing, so that
# every machine formats alike. `bash scripts/lint.sh --fix` rewrites the files instead of checking.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RUFF_VERSION=0.17.6
CLANG_FORMAT_VERSION=23.1.5
"$PY" -m ruff --version 2>/dev/null | grep -q " $RUFF_VERSION$" || "$PY" -m pip install -q "ruff==$RUFF_VERSION"
clang_format() { "$PY" -c "import clang_format; print(clang_format.get_executable('clang-format'))" 2>/dev/null; }
CF=$(clang_format) || true
if [ -z "$CF" ] || ! "$CF" --version | grep -q "version $CLANG_FORMAT_VERSION"; then
  "$PY" -m pip install -q "clang-format==$CLANG_FORMAT_VERSION"
  CF=$(clang_format)
fi
mapfile -t CXX < <(git ls-files 'csrc/*.cc' 'csrc/*.h' 'tests/cpp/*.cc' 'tests/cpp/*.h' 'benchmarks/*.cc')
if [ "${1:-}" = --fix ]; then
  "$PY" -m ruff check --fix .
  "$PY" -m ruff format .
  "$CF" -i "${CXX[@]}"
else
  "$PY" -m ruff check .
  "$PY" -m ruff format --check .
  "$CF" --dry-run --Werror "${CXX[@]}"
fi
echo "[lint] ruff and clang-format: clean"
