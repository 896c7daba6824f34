"""The shim's log goes to the bundle's ``log`` fifo, which containerd reads.

Lines are logrus-style text (``time=... level=... msg=...``), which is what
containerd expects from shims. The fifo is opened non-blocking and a line that
would block is dropped: a shim must never hang because nobody reads its log.
stderr is pointed at the same fifo so a crash's traceback reaches containerd.
"""

from __future__ import annotations

import errno
import logging
import os
import time

from shim.common.bundle import LOG_FIFO

OPEN_TRIES = 20


class FifoHandler(logging.Handler):
    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            os.write(self.fd, line.encode(errors="replace") + b"\n")
        except (BlockingIOError, BrokenPipeError):
            pass
        except Exception:  # noqa: BLE001 - logging.Handler convention: handleError reports it
            self.handleError(record)


class LogrusFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        level = {"WARNING": "warning", "CRITICAL": "fatal"}.get(record.levelname, record.levelname.lower())
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        msg = msg.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        micros = int((record.created % 1) * 1_000_000)  # µs: the bench's timeline reads phases from debug lines
        return f'time="{ts}.{micros:06d}Z" level={level} msg="{msg}" logger={record.name}'


def open_log_fifo(bundle: str) -> int | None:
    """Open <bundle>/log for writing without blocking; None if nobody reads it."""
    path = os.path.join(bundle, LOG_FIFO)
    for _ in range(OPEN_TRIES):
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ENXIO:  # fifo exists, reader not there yet
                time.sleep(0.005)
                continue
            return None
    return None


def setup_logging(bundle: str, debug: bool) -> None:
    fd = open_log_fifo(bundle)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if fd is None:
        root.addHandler(logging.NullHandler())
        return
    os.dup2(fd, 2, inheritable=False)
    handler = FifoHandler(fd)
    handler.setFormatter(LogrusFormatter())
    root.addHandler(handler)
