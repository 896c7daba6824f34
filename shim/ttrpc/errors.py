"""Status codes and exceptions shared by the ttrpc protocol layer and transports.

ttrpc carries gRPC's ``google.rpc.Status`` in every response, so the codes are
gRPC's; containerd maps them back to its errdefs (NotFound, AlreadyExists, ...),
which is why handlers must raise the right code rather than a bare exception.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """gRPC status codes, numbered exactly as on the wire."""

    OK = 0
    CANCELED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def coerce(cls, value: int) -> Code:
        """Map a wire integer to a Code; codes we do not know become UNKNOWN
        (what grpc-go does) instead of crashing the reader."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


class TTRPCError(Exception):
    """A non-OK RPC status. Raised by handlers to choose the status sent back,
    and raised by the client when the server answers with one."""

    code: Code
    message: str

    def __init__(self, code: int, message: str) -> None:
        self.code = Code.coerce(code)
        self.message = message
        super().__init__(self.code, message)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class ProtocolError(Exception):
    """The peer sent bytes that break framing or stream rules; the only safe
    reaction is to drop that connection (other connections are unaffected)."""
