"""The command line flags containerd passes a shim (parsed by ``shim.launch.cli``).

A module of its own so that the actions (launcher, cleanup, bootstrap) can take
a ``Flags`` without importing the cli module that dispatches to them.
"""

from __future__ import annotations

from shim.common.record import record


@record
class Flags:
    namespace: str = ""
    address: str = ""
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    debug: bool = False
    version: bool = False
    info: bool = False
    action: str = ""
