"""The installed ``moodguard`` console script imports ``moodguard.cli:main`` in a fresh
interpreter (nothing else imported first): the dispatcher must import what it uses itself."""
from __future__ import annotations

import subprocess
import sys
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_console_script_entry_point_runs_in_a_fresh_interpreter():
    entry = re.search(r'^moodguard = "([\w.]+):(\w+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    module, func = entry.groups()
    code = f"import sys; from {module} import {func}; sys.exit({func}(['recipes', 'validate', 'recipes/tiny/s.yaml']))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
