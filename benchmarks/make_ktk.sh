#!/usr/bin/env bash
# Builds the trimmed, import-ready copy of kt-kernel that benchmarks/bench_ktkernel.py
# uses on a machine without internet (put it on PYTHONPATH):
#   bash benchmarks/make_ktk.sh KT_KERNEL_WHEEL GGUF_WHEEL DEST      (e.g. DEST=.ktk)
# kt-kernel's wheel (PyPI kt-kernel, cp312 manylinux) carries one extension per ISA
# (~6-9 MB each); only the two the benchmark can use are kept: amx (AMX-BF16 Xeons)
# and avx512_bf16 (the fallback kt-kernel's loader tries next). Its CLI (cli/, needs
# typer/rich/httpx) is dropped: the SFT backend does not import it. gguf (pure
# Python; needs numpy and pyyaml) is added because kt_kernel/utils/loader.py imports
# it at module level, and both `import kt_kernel` and kt_kernel.sft.amx go through it.
set -euo pipefail
whl=$1 gguf=$2 dest=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m zipfile -e "$whl" "$tmp/kt"
python3 -m zipfile -e "$gguf" "$tmp/gguf"
rm -rf "$dest" && mkdir -p "$dest"
cp -r "$tmp/kt/kt_kernel" "$tmp/kt/kt_kernel.libs" "$dest/"
rm -rf "$dest/kt_kernel/cli"
find "$dest/kt_kernel" -name '_kt_kernel_ext_*.so' ! -name '_kt_kernel_ext_amx.*' \
  ! -name '_kt_kernel_ext_avx512_bf16.*' -delete
di=$(cd "$tmp/kt" && ls -d kt_kernel-*.dist-info)
mkdir -p "$dest/$di"
cp "$tmp/kt/$di/METADATA" "$tmp/kt/$di/WHEEL" "$tmp/kt/$di/top_level.txt" "$dest/$di/"  # for importlib.metadata.version
cp -r "$tmp/gguf/gguf" "$dest/"
rm -rf "$dest/gguf/scripts"
{
  echo "kt-kernel trimmed for bench_ktkernel.py (made by benchmarks/make_ktk.sh)"
  echo "from: $(basename "$whl") sha256 $(sha256sum "$whl" | cut -d' ' -f1)"
  echo "and:  $(basename "$gguf") sha256 $(sha256sum "$gguf" | cut -d' ' -f1)"
  echo "use:  export PYTHONPATH=<this folder>:\$PYTHONPATH   (from the repo root: \$PWD/.ktk)"
} >"$dest/PROVENANCE.txt"
du -sh "$dest"
