"""Task and exec ids: containerd's identifier rule, so no id can name a path outside the bundle."""

from __future__ import annotations

import pytest

from shim.common.errors import InvalidArgument
from shim.daemon.service import MAX_ID_LENGTH, check_id


@pytest.mark.parametrize("value", ["a", "exec-1", "a.b_c-d", "0123456789abcdef" * 4, "x" * MAX_ID_LENGTH])
def test_containerd_identifiers_pass(value: str) -> None:
    check_id("exec id", value)


@pytest.mark.parametrize("value", ["", "/x", "../x", "..", ".", "a/b", "a..b", "-a", "a-", "a b", "é",
                                   "x" * (MAX_ID_LENGTH + 1), "a\x00b"])
def test_anything_else_is_invalid_argument(value: str) -> None:
    with pytest.raises(InvalidArgument, match="exec id"):
        check_id("exec id", value)
