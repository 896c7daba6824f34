"""Transparent-huge-page policy for the shim and the processes it starts.

The shim is small and long-lived: with THP=always a single 2 MiB huge page
can outweigh everything else it touches, so the launcher disables THP for
itself *before* the long-lived shim exists (prctl(PR_SET_THP_DISABLE) is
inherited across fork and exec). runc and the containers it creates must keep
the host's policy, so every runc invocation re-applies the original value in
its ``preexec_fn``.

We call prctl(2) through ctypes rather than the ``prctl`` PyPI package: that
package needs libcap headers to build and imports more than the launcher
wants on a container's start path, while ctypes is in the standard library
and costs a few milliseconds.
"""

from __future__ import annotations

import ctypes
import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable

PR_SET_PDEATHSIG = 1
SIGKILL = 9  # signal.SIGKILL on Linux; the signal module costs ~4 ms to import on the start path
PR_SET_CHILD_SUBREAPER = 36
PR_SET_THP_DISABLE = 41
PR_GET_THP_DISABLE = 42

#: Environment variable that carries the launcher's original THP setting down to the shim.
ENV_ORIGINAL = "SHIM_THP_ORIGINAL"

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def prctl(option: int, arg2: int = 0) -> int:
    """Call prctl(2); raise OSError on failure."""
    result: int = _prctl(option, arg2, 0, 0, 0)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def get_thp_disable() -> int:
    """1 if THP is disabled for this process, else 0."""
    return prctl(PR_GET_THP_DISABLE)


def set_thp_disable(value: int) -> None:
    prctl(PR_SET_THP_DISABLE, 1 if value else 0)


def disable_for_self() -> int:
    """Disable THP for this process (and its future children); return the old value."""
    original = get_thp_disable()
    set_thp_disable(1)
    return original


def set_child_subreaper() -> None:
    """Orphans of our children (container inits after runc exits) are reparented to us."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def runc_preexec(original: int) -> Callable[[], None]:
    """A ``preexec_fn`` for runc: restore the host's THP policy, die with the shim.

    Runs in the forked child before exec, so it must only make syscalls.
    """

    def preexec() -> None:
        _prctl(PR_SET_THP_DISABLE, 1 if original else 0, 0, 0, 0)
        _prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)

    return preexec
