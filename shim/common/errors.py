"""Domain errors, each carrying the containerd/gRPC status code it maps to.

The domain (process, container, runc_client) raises these without knowing
about ttrpc; ``shim.daemon.service`` turns them into ttrpc statuses. The codes are the
gRPC ones containerd's errdefs understands.
"""

from __future__ import annotations


class ShimError(Exception):
    code = 2  # Unknown

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ShimError):
    code = 3


class NotFound(ShimError):
    code = 5


class AlreadyExists(ShimError):
    code = 6


class FailedPrecondition(ShimError):
    code = 9


class Unavailable(ShimError):
    code = 14


class ResourceExhausted(ShimError):
    """Out of fds (or another per-process resource): the shim serves on, the caller may retry."""

    code = 8
