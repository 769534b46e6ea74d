"""The package layering of docs/architecture.md holds: no import circle, no module importing from above."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_circle_and_no_upward_import():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_imports.py")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 upward, 0 circles" in proc.stdout
