"""shim.nofile: the shim raises its soft open-file limit, its children get the original back."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap

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
