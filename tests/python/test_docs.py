"""The documents stay true: docs/HARDWARE.md's sizing table is what scripts/gen_sizing.py computes
from the engine's size function now; every `moetune` subcommand the README and docs name exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
PY = os.path.dirname(os.path.dirname(__import__("moetune").__file__))


def test_sizing_table_is_current():
    env = {**os.environ, "PYTHONPATH": PY + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "gen_sizing.py"), "--check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]


def test_documented_subcommands_exist(capsys):
    from moetune import cli

    named = set()
    for doc in ("README.md", "docs/SERVING.md", "docs/HARDWARE.md", "docs/MODELS.md"):
        with open(os.path.join(ROOT, doc)) as f:
            named |= set(re.findall(r"`moetune (\w+)", f.read()))
    assert {"train", "eval", "export", "chat", "env"} <= named
    for cmd in sorted(named):
        try:
            cli.main([cmd, "--help"])
        except SystemExit as e:
            assert e.code == 0, cmd
    capsys.readouterr()
