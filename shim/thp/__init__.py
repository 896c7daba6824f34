"""Transparent-huge-page policy for the shim and the processes it starts.

The shim is small and long-lived: with THP=always a single 2 MiB huge page
can outweigh everything else it touches, so the launcher disables THP for
itself *before* the long-lived shim exists (prctl(PR_SET_THP_DISABLE) is
inherited across fork and exec). runc and the containers it creates must keep
the host's policy, so every runc invocation re-applies the original value:
through ``thp-exec`` (``thp_exec.c``, built by ``make``), a tiny exec step that
sets the flag and a parent-death signal and execs runc, so that subprocess can
use vfork() and no Python runs in the child; or, where it was not built, in a
``preexec_fn`` (fork() of the whole shim: ~3-4 ms slower per runc call).

We call prctl(2) through ctypes rather than the ``prctl`` PyPI package: that
package needs libcap headers to build and imports more than the launcher
wants on a container's start path, while ctypes is in the standard library
and costs a few milliseconds.
"""

from __future__ import annotations

import ctypes
import os

from shim.common.lean import SIGKILL
from shim.common.nofile import original as original_nofile
from shim.common.nofile import restore_in_child

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable, Sequence

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_THP_DISABLE = 41
PR_GET_THP_DISABLE = 42

#: Environment variable that carries the launcher's original THP setting down to the shim.
ENV_ORIGINAL = "SHIM_THP_ORIGINAL"
#: The exec step (thp_exec.c next to this file, compiled by ``make``).
EXEC_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "thp-exec")

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
    """A ``preexec_fn`` for runc: restore the host's THP policy and the open-file limit
    the shim was started with (shim.common.nofile), die with the shim.

    Runs in the forked child before exec, so it must only make syscalls.
    """

    def preexec() -> None:
        _prctl(PR_SET_THP_DISABLE, 1 if original else 0, 0, 0, 0)
        _prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
        restore_in_child()

    return preexec


def exec_helper() -> str | None:
    """The built ``thp-exec``, or None (no C compiler at install: the preexec_fn path)."""
    return EXEC_HELPER if os.access(EXEC_HELPER, os.X_OK) else None


def find_program(name: str) -> str:
    """``name`` as execvp(3) would find it; raise what subprocess would raise for it
    (FileNotFoundError, PermissionError), so callers see the same errors either way."""
    if "/" in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d or ".", name) for d in os.environ.get("PATH", os.defpath).split(":")]
    denied = None
    for path in candidates:
        if os.path.isfile(path):
            if os.access(path, os.X_OK):
                return path
            denied = path
    if denied is not None:
        raise PermissionError(13, os.strerror(13), denied)  # EACCES
    raise FileNotFoundError(2, os.strerror(2), name)  # ENOENT


def runc_command(argv: Sequence[str], original: int) -> tuple[list[str], Callable[[], None] | None]:
    """The argv and preexec_fn that start ``argv`` (runc) with the host's THP policy, the
    open-file limit the shim was started with (shim.common.nofile) and SIGKILL on the
    shim's death: through thp-exec when it is built (subprocess then uses vfork), else
    argv as is with a preexec_fn."""
    helper = exec_helper()
    if helper is None:
        return list(argv), runc_preexec(original)
    nofile = original_nofile()
    limit = [f"nofile={nofile}"] if nofile is not None else []
    return [helper, "1" if original else "0", str(os.getpid()), *limit, find_program(argv[0]), *argv[1:]], None
