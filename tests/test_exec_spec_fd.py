"""The exec's process spec as runc reads it: a memfd named by /proc/self/fd/N (pure, no root)."""

from __future__ import annotations

import os

from shim.daemon.container import spec_memfd


def test_the_memfd_holds_the_whole_spec_opened_by_its_proc_path() -> None:
    spec = b'{"args": ["/bin/true"], "env": ["' + b"x" * 300_000 + b'"]}'  # beyond a pipe's buffer
    fd = spec_memfd(spec)
    try:
        assert fd > 2  # never one of runc's stdio
        assert not os.get_inheritable(fd)  # only the runc it is passed to gets it
        with open(f"/proc/self/fd/{fd}", "rb") as f:  # as runc opens it: a new open file, from byte 0
            assert f.read() == spec
    finally:
        os.close(fd)


def test_a_memfd_is_never_given_fd_0_to_2() -> None:
    saved = os.dup(0)
    os.close(0)
    try:
        fd = spec_memfd(b"{}")
        try:
            assert fd > 2
            assert not _open(0)  # the low fd it got first is closed again
        finally:
            os.close(fd)
    finally:
        os.dup2(saved, 0)
        os.close(saved)


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
