"""Markers by where a test lives, so each pass is selectable with ``-m`` (README "Tests").

``unit``: tests/ (no root, no containerd; a fake OCI runtime at most).
``integration``: integration/ (root, a private containerd, real runc/crun).
``cri``: integration/cri/ (pods through the CRI plugin; also ``integration``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent
_MARKS = (("tests", "unit"), ("integration", "integration"), ("integration/cri", "cri"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = item.path.resolve()
        for folder, mark in _MARKS:
            if path.is_relative_to(_ROOT / folder):
                item.add_marker(mark)
