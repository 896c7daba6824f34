"""What the launcher hands to the long-lived shim process.

Plain data, serialisable to one Python literal, so a shim can be started by
exec (a literal in the environment) or, later, forked from a warm template that
receives the same JSON over a socket.
"""

from __future__ import annotations

from .record import as_dict, record

#: What ``ps``/``pgrep containerd-shim`` show for every process of this runtime.
PROCESS_NAME = "containerd-shim-runc-v2-py"

#: Environment variable carrying the config from launcher to shim.
CONFIG_ENV = "SHIM_CONFIG"
#: The allocator a spawned namespace shim runs on (shim.launch.launcher.spawn); not for its children.
MALLOC_ENV = "PYTHONMALLOC"

#: Where shims' sockets live (the Go shim's default; containerd 2.3+ may name another
#: in BootstrapParams.socket_dir). The template's socket goes beside them.
SOCKET_DIR = "/run/containerd/s"

#: Where the cgroup filesystem is mounted (the launcher joins ShimCgroup there; the shim reads stats).
CGROUP_ROOT = "/sys/fs/cgroup"

#: The fd a new shim finds its listening socket on, however it was started (exec or fork).
LISTEN_FD = 3


@record
class ShimConfig:
    namespace: str
    id: str
    bundle: str
    address: str = ""  # containerd's gRPC socket (-address)
    publish_binary: str = ""
    ttrpc_address: str = ""  # where events go (env TTRPC_ADDRESS)
    socket_path: str = ""  # the shim's own listening socket
    listen_fd: int = LISTEN_FD
    debug: bool = False
    thp_original: int = 0
    nofile_original: int = 0  # the soft RLIMIT_NOFILE containerd gave the launcher (shim.common.nofile)

    def title(self) -> str:
        """How the shim shows in ps: as the Go shim's re-exec does (its binary name and flags)."""
        return f"{PROCESS_NAME} -namespace {self.namespace} -id {self.id} -address {self.address}"

    def encode(self) -> str:
        """A Python literal: the launcher writes it without importing json (~7 ms)."""
        return repr(as_dict(self))

    @classmethod
    def decode(cls, text: str) -> ShimConfig:
        import ast

        return cls(**ast.literal_eval(text))
