"""The open-file limit: raised for the shim, given back to what it starts.

containerd 2.x's systemd unit sets no LimitNOFILE, so containerd and every shim
it starts get systemd's default soft limit of 1024; a namespace-mode shim holds
~9 fds per task and would stop at ~110 tasks. Go programs (the Go shim among them)
raise their soft limit to the hard limit at start and give children the limit
they were started with (a container must not inherit a limit nobody asked it
for), and so does this shim:

- the launcher raises its soft limit before anything else is started from it
  (the shim, the warm template), and passes the limit containerd gave it in the
  shim's config (``ShimConfig.nofile_original``);
- the shim records that original (``remember``) and raises again (a forked shim
  inherits its template's limit; raising is idempotent);
- every child gets the original back: ``restore_in_child`` in a ``preexec_fn``
  (runc), or ``restore_for(pid)`` right after a ``posix_spawn`` (which has no
  hook in the child).

Only syscalls, no state but the one recorded original: importable from the
launcher (start latency) and callable between fork and exec.
"""

from __future__ import annotations

import resource

_NOFILE = resource.RLIMIT_NOFILE

#: The soft limit this shim was started with, given back to its children (None: unchanged).
_original: int | None = None


def raise_soft_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit before.

    A failure (a seccomp'd or otherwise odd environment) leaves the limit as it
    was: the shim still works, with fewer tasks.
    """
    soft, hard = resource.getrlimit(_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(_NOFILE, (hard, hard))
        except (OSError, ValueError):
            pass
    return soft


def remember(original: int) -> None:
    """Record the limit the shim's children get (the one the launcher was started with)."""
    global _original
    _original = original if original > 0 else None


def original() -> int | None:
    return _original


def current() -> int:
    """The soft limit now."""
    return resource.getrlimit(_NOFILE)[0]


def restore_in_child() -> None:
    """Between fork and exec (a ``preexec_fn``): put the original soft limit back.

    Lowering the soft limit below the fds the child still holds from the shim is
    fine: they are close-on-exec, and the limit only bounds new fds.
    """
    if _original is not None:
        try:
            resource.setrlimit(_NOFILE, (_original, resource.getrlimit(_NOFILE)[1]))
        except (OSError, ValueError):
            pass


def restore_for(pid: int) -> None:
    """Give a child started by ``posix_spawn`` the original soft limit (prlimit(2)).

    The child runs from the spawn on, so its first instructions see the raised
    limit; it cannot have opened more than a handful of fds by then, and what it
    opens later is bounded by the original, as under Go.
    """
    if _original is not None:
        try:
            hard = resource.getrlimit(_NOFILE)[1]
            resource.prlimit(pid, _NOFILE, (_original, hard))
        except (OSError, ValueError):
            pass


# -- running out ------------------------------------------------------------------

#: Fds kept open for the calls that stop or remove a task (Kill, Delete): each runc call
#: takes ~6 at once (two pipes for its output, Popen's own error pipe).
RESERVE = 24
#: What a new task or exec must leave free besides the reserve: ~9 fds a task holds,
#: plus the transient ones of its runc call and its IO setup.
PER_TASK = 16

_EXHAUSTED = frozenset({24, 23})  # errno.EMFILE, errno.ENFILE (errno costs an import on the start path)


def exhausted(error: BaseException) -> bool:
    """True for "too many open files" (the process's or the system's)."""
    return isinstance(error, OSError) and error.errno in _EXHAUSTED


class Reserve:
    """A few fds held open (/dev/null) so that a task can always be stopped and removed.

    Without it, a shim whose tasks took every fd could not run ``runc kill`` or ``runc
    delete`` for any of them (the issue 16 report: every Kill and Delete failed with
    EMFILE until the limit was raised from outside). A call that stops or removes a task
    and finds no fd takes these (``release``); they are taken back once fds are free
    again (``refill``). Calls that add (Create, Exec) first check ``room``: a shim
    near its limit refuses them, so they cannot eat into the reserve.
    """

    def __init__(self, size: int = RESERVE) -> None:
        self.size = size
        self._fds: list[int] = []
        self._owner = 0  # the pid that opened _fds

    def _mine(self) -> list[int]:
        """The fds this process opened for the reserve.

        A shim forked from the template inherits this object with whatever the template had
        put in it, but not those fds: every fork path to a shim closes what it does not pass
        on, and the numbers then go to the shim's own sockets and pipes. So a list filled by
        another process is forgotten, never closed (``release`` would close live fds), and
        ``refill`` opens the shim's own."""
        import os

        if self._fds and self._owner != os.getpid():
            self._fds = []
        return self._fds

    @property
    def held(self) -> int:
        return len(self._mine())

    def refill(self) -> bool:
        """Open what is missing; False if the fds are not there (yet)."""
        import os

        fds = self._mine()
        self._owner = os.getpid()
        while len(fds) < self.size:
            try:
                fds.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return False
        return True

    def release(self) -> bool:
        """Give the reserve up for a call that must not fail; False if it was already gone."""
        import os

        fds, self._fds = self._mine(), []
        for fd in fds:
            os.close(fd)
        return bool(fds)

    def room(self, needed: int = PER_TASK) -> bool:
        """Whether ``needed`` more fds fit below the soft limit with the reserve kept.

        The lowest free fd is a lower bound on the fds open (the kernel hands out the
        lowest free number): cheap (two syscalls) where counting /proc/self/fd costs
        ~25 ms at 9000 fds. Holes left by closed fds make it optimistic; a Create that
        then runs out anyway fails with the same clear error.
        """
        import os

        try:
            probe = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            if exhausted(e):
                return False
            raise
        os.close(probe)
        return current() - probe >= needed + (self.size - self.held)


#: The shim's one reserve, filled at start (shim.daemon).
reserve = Reserve()
