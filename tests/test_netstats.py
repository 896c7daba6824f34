"""shim.daemon.netstats: /proc/<pid>/net/dev parsing into cgroup v1 NetworkStat."""

from __future__ import annotations

import os
from pathlib import Path

from shim.daemon.netstats import network_stats, parse_net_dev

NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     140       2    0    0    0     0          0         0      140       2    0    0    0     0       0          0
  eth0: 1234567     890    1    2    0     0          0         3   765432     321    4    5    0     0       0          0
"""


def test_parse_net_dev_columns() -> None:
    lo, eth0 = parse_net_dev(NET_DEV)
    assert (lo.name, lo.rx_bytes, lo.tx_packets) == ("lo", 140, 2)
    assert eth0.name == "eth0"
    assert (eth0.rx_bytes, eth0.rx_packets, eth0.rx_errors, eth0.rx_dropped) == (1234567, 890, 1, 2)
    assert (eth0.tx_bytes, eth0.tx_packets, eth0.tx_errors, eth0.tx_dropped) == (765432, 321, 4, 5)


def test_garbage_lines_are_skipped() -> None:
    assert parse_net_dev("h1\nh2\nnot an interface line\n  x: 1 2 3\n") == []


def test_network_stats_reads_the_pids_namespace(tmp_path: Path) -> None:
    (tmp_path / "42" / "net").mkdir(parents=True)
    (tmp_path / "42" / "net" / "dev").write_text(NET_DEV)
    assert [s.name for s in network_stats(42, proc=str(tmp_path))] == ["lo", "eth0"]
    assert network_stats(43, proc=str(tmp_path)) == []


def test_own_process_has_loopback() -> None:
    assert "lo" in [s.name for s in network_stats(os.getpid())]
