"""The host's transparent-huge-page policy: set it for a round, always put it back."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def read(path: Path = ENABLED) -> tuple[str | None, list[str]]:
    """(selected mode, available modes): ``always [madvise] never`` -> ("madvise", [...])."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None, []
    m = re.search(r"\[(\w+)\]", text)
    return (m.group(1) if m else None), text.replace("[", "").replace("]", "").split()


class ThpGuard:
    """Remembers the original policy at construction; ``restore()`` is idempotent.

    Use it in a ``try/finally`` (``__main__`` does) so that a failed or
    interrupted run never leaves the host at ``always``.
    """

    def __init__(self, path: Path = ENABLED) -> None:
        self.path = path
        self.original, self.modes = read(path)
        self.changed = False

    @property
    def current(self) -> str | None:
        return read(self.path)[0]

    def can_set(self) -> bool:
        if self.original is None:
            return False
        try:
            with open(self.path, "r+"):
                return True
        except OSError:
            return False

    def set(self, mode: str) -> None:
        if mode not in self.modes:
            raise ValueError(f"THP mode {mode!r} not offered by {self.path} ({self.modes})")
        if self.current == mode:
            return
        self.changed = True
        self.path.write_text(mode)
        if self.current != mode:
            raise RuntimeError(f"could not set {self.path} to {mode}")

    def restore(self) -> bool:
        """Put the original policy back; True if the host is at it afterwards."""
        if self.original is None:
            return True
        if self.changed and self.current != self.original:
            try:
                self.path.write_text(self.original)
            except OSError as e:
                print(f"bench: could not restore {self.path} to {self.original}: {e}", file=sys.stderr)
        ok = self.current == self.original
        if ok:
            self.changed = False
        return ok
