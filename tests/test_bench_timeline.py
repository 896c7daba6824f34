"""The bench timeline's log reader (pure): inner phases of one Create from a -debug shim's log."""

from bench.timeline import inner_phases

LINES = [
    'time="2026-12-07T07:00:00.100000Z" level=debug msg="other: create" logger=shim.service',
    'time="2026-12-07T07:00:01.000000Z" level=debug msg="t1: create" logger=shim.service',
    'time="2026-12-07T07:00:01.002500Z" level=debug msg="t1: rootfs mounted" logger=shim.container',
    'time="2026-12-07T07:00:01.002750Z" level=debug msg="t1: stdio opened" logger=shim.container',
    'time="2026-12-07T07:00:01.003000Z" level=debug msg="t1: options written" logger=shim.container',
    'time="2026-12-07T07:00:01.003100Z" level=debug msg="t1: runc create" logger=shim.container',
    'time="2026-12-07T07:00:01.040000Z" level=debug msg="runc create: 36.50 ms (spawn 0.90 ms)" logger=shim.runc',
    'time="2026-12-07T07:00:01.041000Z" level=debug msg="t1: runc create returned, pid file read" logger=shim.container',
    'time="2026-12-07T07:00:01.041200Z" level=debug msg="t1: stdio copiers started" logger=shim.container',
    'time="2026-12-07T07:00:01.041300Z" level=debug msg="t1: created, init pid 42" logger=shim.container',
    'time="2026-12-07T07:00:01.050000Z" level=info msg="t1: not debug" logger=shim.container',
]
LOG = "\n".join(LINES)


def test_inner_phases_follow_each_other_from_the_create_rpc():
    p = inner_phases(LOG, "t1")
    assert round(p["mount"] * 1e6) == 2500
    assert round(p["stdio"] * 1e6) == 250
    assert round(p["options"] * 1e6) == 250
    assert round(p["runc_create"] * 1e6) == 38000
    assert round(p["copiers"] * 1e6) == 200
    assert round(p["created"] * 1e6) == 100
    assert p["runc create (wall)"] == 0.0365
    assert p["runc create (spawn)"] == 0.0009


def test_a_log_without_the_create_mark_gives_only_runc_figures():
    p = inner_phases(LOG, "t2")
    assert set(p) == {"runc create (wall)", "runc create (spawn)"}
