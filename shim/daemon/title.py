"""The process title ps and pgrep show for the shim and the template.

Its own module (not shim.common.config, where the title's text is made) because
it imports setproctitle, a third-party package the per-start launcher must not
load; the template and the shim both reach it.
"""

from __future__ import annotations


def set_title(title: str) -> None:
    """Set argv as ps shows it and the 15-byte name pgrep matches ("containerd-shim").

    Call before the environment changes: setproctitle reuses the memory of the
    original argv and environment block.
    """
    try:
        from setproctitle import setproctitle
    except ImportError:  # the title is cosmetic
        return
    setproctitle(title)
