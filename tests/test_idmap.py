"""shim.common.idmap's pure part: the uidmap/gidmap mount options containerd 2.x sends for
user-namespace pods (``uidmap=0:65536:65536``, ranges separated by ``,``)."""

from __future__ import annotations

import pytest

from shim.common.errors import InvalidArgument
from shim.common.idmap import IdMapping, IdRange, map_lines, parse_ranges, take_mapping


def test_one_range() -> None:
    assert parse_ranges("0:65536:65536", "uidmap") == [IdRange(0, 65536, 65536)]


def test_several_ranges() -> None:
    ranges = parse_ranges("0:1000:1,1:100000:65535", "gidmap")
    assert ranges == [IdRange(0, 1000, 1), IdRange(1, 100000, 65535)]
    assert map_lines(ranges) == "0 1000 1\n1 100000 65535\n"


def test_options_are_taken_off_and_the_rest_kept_in_order() -> None:
    mapping, rest = take_mapping(
        ["index=off", "uidmap=0:65536:65536", "workdir=/w", "gidmap=0:65536:65536", "upperdir=/u", "lowerdir=/l"]
    )
    assert mapping == IdMapping([IdRange(0, 65536, 65536)], [IdRange(0, 65536, 65536)])
    assert rest == ["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l"]


def test_no_mapping_leaves_the_options_alone() -> None:
    options = ["rbind", "ro"]
    assert take_mapping(options) == (None, options)


@pytest.mark.parametrize(
    "value",
    [
        "", "0:65536", "0:65536:65536:1", "a:b:c", "-1:0:10", "0:-1:10", "0:65536:0", " 0:1:1", "0:1:1,",
        "0:1:+1", "0:4294967295:2", "0:0x10:1", "0:65536:10,5:70000:10", "0:65536:10,20:65540:10",
        "٣:1:1",  # a non-ASCII digit int() would take
    ],
)
def test_malformed_mappings_are_invalid_argument(value: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        take_mapping([f"uidmap={value}", "gidmap=0:65536:65536"])
    assert info.value.code == 3
    assert "uidmap" in info.value.message


def test_too_many_ranges() -> None:
    value = ",".join(f"{i}:{100000 + i}:1" for i in range(341))
    with pytest.raises(InvalidArgument, match="341 ranges"):
        parse_ranges(value, "uidmap")


@pytest.mark.parametrize("options", [["uidmap=0:1:1"], ["gidmap=0:1:1", "ro"]])
def test_one_without_the_other_is_invalid_argument(options: list[str]) -> None:
    with pytest.raises(InvalidArgument, match="needs both uidmap and gidmap"):
        take_mapping(options)
