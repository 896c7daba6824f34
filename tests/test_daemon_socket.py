"""The shim's socket file: given up once at shutdown, and only while the name is the shim's own."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from shim.daemon.main import SocketName


def _bound(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    return sock


def test_an_exiting_shim_leaves_a_successors_socket_alone(tmp_path: Path) -> None:
    path = tmp_path / "shim.sock"
    ours = _bound(path)
    name = SocketName(str(path))
    # a start of the same group, after we began to shut down, took the name for a new shim
    path.unlink()
    successor = _bound(path)
    try:
        name.release()
        assert path.exists()
        SocketName(str(path)).release()  # the successor's own removal works
        assert not path.exists()
    finally:
        ours.close()
        successor.close()


def test_the_name_is_released_once_even_if_the_inode_comes_back(tmp_path: Path) -> None:
    """ext4 gives a freed inode number to the next file at once: a successor's socket can
    carry the number ours had. The shim frees its name at shutdown start and again on its
    way out; the second time must not remove the successor's (seen: 20 concurrent namespace
    starts split over two shims)."""
    path = tmp_path / "shim.sock"
    keep = tmp_path / "same-inode"
    ours = _bound(path)
    try:
        os.link(path, keep)  # holds the inode (the link changes its ctime: take the name after)
        name = SocketName(str(path))
        name.release()  # shutdown starts: the name is free
        assert not path.exists()
        os.link(keep, path)  # a successor's socket, with the very same inode number
        name.release()  # the exit path
        assert path.exists()
    finally:
        ours.close()


def test_nothing_to_remove_is_fine(tmp_path: Path) -> None:
    SocketName(str(tmp_path / "gone.sock")).release()
    SocketName("").release()
