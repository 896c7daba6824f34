"""The OCI runtime as the container logic sees it: a small protocol, passed in.

``Container`` never names runc: it asks ``Context.runtime`` (a factory) for an
``OCIRuntime`` and calls the operations below, each of which raises
``RuncError`` with the runtime's own words on failure. The shim passes
``runc_client.Runc`` (runc or crun through subprocesses, reaped by the shim's
reaper); unit tests pass a fake that writes pid files and lets the test decide
when each call returns and when each process exits, so the interleavings of
concurrent requests on one process can be tested deterministically
(rust-extensions' ``ProcessLifecycle`` plays the same part).
"""

from __future__ import annotations

from typing import Protocol

from shim.runc_client.config import RuncConfig, Stdio

from .reaper import ExitRouter


class OCIRuntime(Protocol):
    async def create(
        self,
        id: str,
        bundle: str,
        pid_file: str,
        stdio: Stdio,
        *,
        no_pivot: bool = False,
        no_new_keyring: bool = False,
        console_socket: str | None = None,
    ) -> None: ...

    async def start(self, id: str) -> None: ...

    async def exec(
        self,
        id: str,
        process_spec: str,
        pid_file: str,
        stdio: Stdio,
        *,
        console_socket: str | None = None,
        keep_fds: tuple[int, ...] = (),
    ) -> None: ...

    async def kill(self, id: str, signal: int, *, all: bool = False) -> None: ...

    async def delete(self, id: str, *, force: bool = False) -> None: ...

    async def pause(self, id: str) -> None: ...

    async def resume(self, id: str) -> None: ...

    async def update(self, id: str, resources_json: bytes) -> None: ...

    async def ps(self, id: str) -> list[int]: ...

    async def checkpoint(self, id: str, image_path: str, work_path: str, flags: list[str]) -> None: ...

    async def restore(
        self,
        id: str,
        bundle: str,
        image_path: str,
        work_path: str,
        pid_file: str,
        stdio: Stdio,
        *,
        parent_path: str = "",
        no_pivot: bool = False,
        console_socket: str | None = None,
    ) -> None: ...


class RuntimeFactory(Protocol):
    """Makes the OCI runtime of one container (its binary, root, log and flags in config)."""

    def __call__(self, config: RuncConfig, reaper: ExitRouter, /) -> OCIRuntime: ...
