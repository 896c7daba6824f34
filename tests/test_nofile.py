"""shim.nofile: the shim raises its soft open-file limit, its children get the original back."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap

from shim.common import nofile

# Run in a child interpreter started under a soft limit of 64 (as containerd 2.x's
# systemd unit leaves it at 1024): the test process's own limit is not touched.
CHILD = textwrap.dedent("""
    import os, resource, subprocess
    from shim.common import nofile
    from shim.thp import exec_helper, runc_command, runc_preexec
    original = nofile.raise_soft_limit()
    nofile.remember(original)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    via_preexec = subprocess.run(["sh", "-c", "ulimit -Sn"], capture_output=True, text=True,
                                 preexec_fn=runc_preexec(0)).stdout.strip()
    argv, preexec = runc_command(["sh", "-c", "ulimit -Sn"], 0)
    assert exec_helper() is None or argv[0] == exec_helper(), argv
    via_helper = subprocess.run(argv, capture_output=True, text=True, preexec_fn=preexec).stdout.strip()
    r, w = os.pipe()
    pid = os.posix_spawn("/bin/sh", ["sh", "-c", "read x"], os.environ,
                         file_actions=[(os.POSIX_SPAWN_DUP2, r, 0)])
    nofile.restore_for(pid)
    os.close(r)
    out = subprocess.check_output(["cat", f"/proc/{pid}/limits"], text=True)
    os.write(w, b"go\\n")
    os.waitpid(pid, 0)
    spawned = [line.split()[3] for line in out.splitlines() if line.startswith("Max open files")][0]
    print(original, soft, hard, via_preexec, via_helper, spawned)
""")


def _lower_soft(limit: int):
    def preexec() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

    return preexec


def test_raised_for_the_shim_restored_for_children() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard > 64, "needs a hard limit above 64"
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True,
                         preexec_fn=_lower_soft(64)).stdout.split()
    original, soft, shim_hard, via_preexec, via_helper, spawned = (int(x) for x in out)
    assert (original, soft, shim_hard) == (64, hard, hard)  # the shim: raised to the hard limit
    assert via_preexec == 64  # runc (preexec_fn) gets what the shim was started with
    assert via_helper == 64  # runc through thp-exec (vfork) too
    assert spawned == 64  # a posix_spawn'ed child (a logger binary) too


def test_nothing_restored_when_nothing_recorded() -> None:
    from shim.common import nofile

    nofile.remember(0)
    assert nofile.original() is None
    nofile.restore_in_child()  # a no-op in this process
    assert nofile.current() == resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _in_a_fork(check) -> int:
    """Run ``check()`` in a forked child; its exit code (what it returned; 99 if it raised)."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = check()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _names(fds: list[int]) -> set[str]:
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in fds}


def test_a_reserve_filled_before_a_fork_is_forgotten_in_the_child_not_closed() -> None:
    """What a shim forked from the template goes through: the template's reserve object comes
    along, its fds do not (the fork path closes them), and their numbers go to other files."""
    reserve = nofile.Reserve(size=4)
    assert reserve.refill() and reserve.held == 4
    inherited = list(reserve._fds)

    def child() -> int:
        zero = os.open("/dev/zero", os.O_RDONLY)
        for fd in inherited:
            os.close(fd)  # what every fork path to a shim does
            os.dup2(zero, fd)  # and the number goes to another file
        if reserve.held != 0 or reserve.release():
            return 1  # it still counted the inherited numbers as its own
        if _names(inherited) != {"/dev/zero"}:
            return 2  # it closed files that are not the reserve's
        if not reserve.refill() or reserve.held != 4 or _names(reserve._fds) != {"/dev/null"}:
            return 3  # it did not open a reserve of its own
        return 0

    try:
        assert _in_a_fork(child) == 0
        assert reserve.held == 4 and _names(inherited) == {"/dev/null"}  # the parent's stays as it was
    finally:
        reserve.release()
    assert reserve.held == 0
