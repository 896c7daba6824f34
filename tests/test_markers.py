"""The markers that make each pass selectable: ``-m unit`` is tests/, ``-m integration`` is integration/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def collected(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode in (0, 5), out.stdout + out.stderr  # 5: nothing selected
    return [line.split("::")[0] for line in out.stdout.splitlines() if "::" in line]


def test_unit_marker_selects_exactly_tests() -> None:
    files = collected("-m", "unit")
    assert files and all(f.startswith("tests/") for f in files)
    assert "tests/test_markers.py" in files


def test_integration_and_cri_markers_select_their_folders() -> None:
    files = collected("-m", "integration", "integration/test_core.py", "integration/cri", "tests/test_cli.py")
    assert "integration/test_core.py" in files and not any(f.startswith("tests/") for f in files)
    cri = collected("-m", "cri", "integration/test_core.py", "integration/cri")
    assert cri and all(f.startswith("integration/cri/") for f in cri)
