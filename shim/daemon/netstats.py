"""Per-interface network counters of a task's network namespace.

No other shim reports these. /proc/<pid>/net/dev shows the interfaces of
the network namespace that <pid> lives in, so reading it through the task's
init pid gives the pod's counters without entering the namespace (no setns,
no helper process, no netlink library loaded into every shim), and it keeps
working for as long as the init is alive.
"""

from __future__ import annotations

from shim.proto import cgroups_v1_metrics_pb2 as v1

from .cgroups import PROC

_FIELDS = ("rx_bytes", "rx_packets", "rx_errors", "rx_dropped", "tx_bytes", "tx_packets", "tx_errors", "tx_dropped")
# /proc/net/dev columns: rx bytes packets errs drop fifo frame compressed multicast, tx bytes packets errs drop ...
_COLUMNS = (0, 1, 2, 3, 8, 9, 10, 11)


def parse_net_dev(text: str) -> list[v1.NetworkStat]:
    stats = []
    for line in text.splitlines()[2:]:  # two header lines
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        values = rest.split()
        if len(values) < 16:
            continue
        stat = v1.NetworkStat(name=name.strip())
        for field, column in zip(_FIELDS, _COLUMNS, strict=True):
            setattr(stat, field, int(values[column]))
        stats.append(stat)
    return stats


def network_stats(pid: int, proc: str = PROC) -> list[v1.NetworkStat]:
    """The counters of every interface in pid's network namespace ([] if it is gone)."""
    try:
        with open(f"{proc}/{pid}/net/dev") as f:
            return parse_net_dev(f.read())
    except OSError:
        return []
