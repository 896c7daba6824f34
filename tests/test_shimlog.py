"""shim.daemon.shimlog.LogrusFormatter: logrus text lines, one per record."""

from __future__ import annotations

import logging
import re
import sys

import pytest

from shim.daemon.shimlog import LogrusFormatter

CREATED = 1700000000.25  # 2023-11-14T22:13:20.250Z


def record(msg: str, level: int = logging.INFO, args: tuple = (), exc_info=None) -> logging.LogRecord:
    r = logging.LogRecord("shim.test", level, __file__, 1, msg, args, exc_info)
    r.created = CREATED
    r.msecs = 250.0
    return r


def test_shape() -> None:
    out = LogrusFormatter().format(record("hello %s", args=("world",)))
    assert out == 'time="2023-11-14T22:13:20.250000Z" level=info msg="hello world" logger=shim.test'


@pytest.mark.parametrize(
    "level, name",
    [
        (logging.DEBUG, "debug"),
        (logging.INFO, "info"),
        (logging.WARNING, "warning"),
        (logging.ERROR, "error"),
        (logging.CRITICAL, "fatal"),
    ],
)
def test_levels(level: int, name: str) -> None:
    out = LogrusFormatter().format(record("m", level))
    assert f" level={name} " in out


def test_quotes_backslashes_newlines_escaped() -> None:
    out = LogrusFormatter().format(record('say "hi"\nC:\\dir'))
    assert out.endswith(r'msg="say \"hi\"\nC:\\dir" logger=shim.test')
    assert "\n" not in out


def test_exception_in_one_line() -> None:
    try:
        raise ValueError('bad "value"')
    except ValueError:
        exc_info = sys.exc_info()
    out = LogrusFormatter().format(record("failed", logging.ERROR, exc_info=exc_info))
    assert "\n" not in out
    m = re.fullmatch(r'time="[^"]+" level=error msg="(.*)" logger=shim\.test', out)
    assert m is not None
    msg = m.group(1)
    assert msg.startswith(r"failed\nTraceback (most recent call last):")
    assert r'ValueError: bad \"value\"' in msg


def test_time_is_utc_with_micros() -> None:
    out = LogrusFormatter().format(record("x"))
    assert re.match(r'time="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z" ', out)
