"""Command line of containerd-shim-runc-v2-py, parsed the way Go's flag package does.

containerd runs ``<shim> -namespace NS -address A -publish-binary B -id ID [-debug] start``
and, after a shim died, ``... -id ID -bundle PATH delete``. This module only
parses and dispatches; each action imports what it needs, so ``start`` and
``delete`` stay lean (no trio).
"""

from __future__ import annotations

import sys

from .flags import Flags

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from .launcher import Origin

USAGE = "usage: containerd-shim-runc-v2-py [-namespace NS] [-address A] [-publish-binary B] [-id ID] [-bundle DIR] [-debug] [-info] start|delete"


class UsageError(Exception):
    pass


_VALUE_FLAGS = {"namespace", "address", "publish-binary", "id", "bundle", "socket"}
#: Accepted as the Go shim accepts it (its -socket serves an existing socket), and ignored.
_IGNORED_FLAGS = {"socket"}
_BOOL_FLAGS = {"debug", "v", "info"}


def parse_args(argv: list[str]) -> Flags:
    """Go flag syntax: -f v, --f v, -f=v; bools as -f or -f=true; flags end at the first positional."""
    flags = Flags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in _BOOL_FLAGS:
            on = value.lower() in ("", "1", "t", "true") if eq else True
            if name == "v":
                flags.version = on
            else:
                setattr(flags, name, on)
        elif name in _VALUE_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
            if name not in _IGNORED_FLAGS:
                setattr(flags, name.replace("-", "_"), value)
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    rest = argv[i:]
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
    flags.action = rest[0] if rest else ""
    return flags


def main(argv: list[str] | None = None) -> None:
    try:
        flags = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"{e}\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    if flags.version:
        from shim import __version__

        print(f"containerd-shim-runc-v2-py:\n  Version: {__version__}\n  Python: {sys.version.split()[0]}")
        sys.exit(0)
    if flags.info:
        _exit_now(_info())
    if flags.action == "start":
        _exit_now(run_start(flags))
    if flags.action == "delete":
        from .cleanup import delete

        _exit_now(delete(flags))
    print(f"unknown action {flags.action!r}\n{USAGE}", file=sys.stderr)
    sys.exit(2)


def run_start(flags: Flags, origin: Origin | None = None) -> int:
    """The ``start`` action's exit status (also for a start run in the template: ``origin``)."""
    from .launcher import start

    try:
        return start(flags, origin)
    except (OSError, ValueError) as e:  # containerd shows this text as the start failure
        print(f"start failed: {e}", file=sys.stderr)
        return 1


def _info() -> int:
    """``-info`` (containerd 2.x): RuntimeInfo protobuf on stdout, options on stdin."""
    from .info import InfoError, runtime_info

    try:
        data = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
        sys.stdout.buffer.write(runtime_info(data))
    except (InfoError, OSError) as e:
        print(f"info failed: {e}", file=sys.stderr)
        return 1
    return 0


def _exit_now(code: int) -> None:
    """Exit without interpreter finalisation (~2 ms): containerd waits for start
    and delete to exit, and they have nothing left to clean up."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
