"""The committed type stub of the engine extension matches the built extension
(regenerate with `python scripts/gen_stub.py` after changing csrc/bindings/)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUB = ROOT / "python" / "moetune" / "_moetune_ext.pyi"


def test_extension_stub_is_current(tmp_path):
    nanobind = pytest.importorskip("nanobind")
    first = STUB.read_text().splitlines()[0]
    made_with = re.search(r"nanobind (\S+);", first)
    assert made_with, f"{STUB} has no generator header: {first!r}"
    if made_with.group(1) != nanobind.__version__:
        pytest.skip(
            f"the stub was generated with nanobind {made_with.group(1)}, this is {nanobind.__version__} "
            "(stubgen output differs between versions)"
        )
    out = tmp_path / "ext.pyi"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_stub.py"), "-o", str(out)], check=True)
    assert out.read_text() == STUB.read_text(), (
        "python/moetune/_moetune_ext.pyi is out of date with the extension: run `python scripts/gen_stub.py`"
    )
