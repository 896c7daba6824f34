"""The shim's socket file: removed at shutdown only while the name is still the shim's own."""

from __future__ import annotations

import socket
from pathlib import Path

from shim.daemon import _inode, _remove_socket


def test_an_exiting_shim_leaves_a_successors_socket_alone(tmp_path: Path) -> None:
    path = tmp_path / "shim.sock"
    ours = socket.socket(socket.AF_UNIX)
    ours.bind(str(path))
    inode = _inode(str(path))
    # a start of the same group, after we began to shut down, took the name for a new shim
    path.unlink()
    successor = socket.socket(socket.AF_UNIX)
    successor.bind(str(path))
    try:
        _remove_socket(str(path), inode)
        assert path.exists() and _inode(str(path)) != inode
        _remove_socket(str(path), _inode(str(path)))  # the successor's own removal works
        assert not path.exists()
    finally:
        ours.close()
        successor.close()


def test_nothing_to_remove_is_fine(tmp_path: Path) -> None:
    _remove_socket(str(tmp_path / "gone.sock"), 12345)
    _remove_socket("", 0)
