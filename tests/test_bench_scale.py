"""The bench's scale section, its pure parts: /proc/PID/stat ticks, exit-event timing, the
issue-16 verdicts, the report rows and the --only rule (scale only on request)."""

import pytest

from bench import report
from bench.__main__ import SECTIONS, parse_args
from bench.scale import cpu_ticks, exit_times, pss_by_kind, rows, verdict_lines, verdicts

MiB = 1 << 20


def test_cpu_ticks_sums_utime_and_stime_even_with_spaces_and_parens_in_comm() -> None:
    # fields: pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    stat = "4242 (shim (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 3 0 123 4096 300"
    assert cpu_ticks(stat) == 42


def test_exit_times_counts_each_expected_task_once_from_the_first_event() -> None:
    arrivals = [("a", 10.5), ("other", 10.6), ("b", 11.0), ("a", 12.0), ("c", 13.25)]
    r = exit_times(arrivals, {"a", "b", "c", "d"}, t0=10.0)
    assert r["expected"] == 4 and r["delivered"] == 3 and r["duplicates"] == 1
    assert r["missing"] == ["d"]
    assert r["first_s"] == pytest.approx(0.5) and r["last_s"] == pytest.approx(3.25)


def test_exit_times_with_no_event() -> None:
    assert exit_times([], {"a"}, 0.0)["last_s"] is None


def _side(**kw) -> dict:
    base = {"running": 10, "shims": 1, "pss": 50 * MiB, "idle_cpu_s": 0.0, "nofile": ["1048576/1048576"],
            "launcher_soft_nofile": "1024", "fds": 100, "start_rate": 20.0,
            "state_1": {"p90_s": 100e-6}, "state_n": {"p90_s": 150e-6},
            "exec_1": {"median_s": 0.05}, "exec_n": {"median_s": 0.06},
            "exits": {"delivered": 10, "duplicates": 0, "last_s": 1.0}, "left": []}
    return base | kw


def _result(ns: dict, go: dict) -> dict:
    return {"tasks": 10, "idle_window_s": 5.0, "concurrency": 4, "shim_nofile": [1024, 1048576],
            "python-ns": ns, "go": go}


def _oks(r: dict) -> list:
    return [v["ok"] for v in verdicts(r)]


def test_verdicts_all_pass() -> None:
    go = _side(shims=10, pss=3000 * MiB, idle_cpu_s=0.1, exits={"delivered": 10, "duplicates": 0, "last_s": 1.5})
    assert _oks(_result(_side(), go)) == [True] * 6


@pytest.mark.parametrize(("ns", "go", "failed"), [
    (_side(running=9), {}, 0),  # one task did not run
    (_side(shims=2), {}, 0),  # not one shim for all
    (_side(pss=61 * MiB), {}, 1),  # > 0.02 x 3000 MiB
    (_side(idle_cpu_s=0.2), {}, 2),  # busier than Go while idle
    (_side(state_n={"p90_s": 201e-6}), {}, 3),  # State p90 > 2x at N
    (_side(exits={"delivered": 9, "duplicates": 0, "last_s": 1.0}), {}, 4),  # an exit lost
    (_side(exits={"delivered": 10, "duplicates": 1, "last_s": 1.0}), {}, 4),  # an exit twice
    (_side(exits={"delivered": 10, "duplicates": 0, "last_s": 1.6}), {}, 4),  # later than Go's last
    (_side(left=["python shims [7]"]), {}, 5),  # something left after deletion
    (_side(), {"left": ["tasks/containers ['x']"]}, 5),
])
def test_verdicts_each_target_fails_on_its_own(ns: dict, go: dict, failed: int) -> None:
    go = _side(shims=10, pss=3000 * MiB, idle_cpu_s=0.1,
               exits={"delivered": 10, "duplicates": 0, "last_s": 1.5}) | go
    oks = _oks(_result(ns, go))
    assert oks[failed] is False
    assert all(oks[i] for i in range(6) if i != failed)


def test_verdicts_not_measured_is_neither_pass_nor_fail() -> None:
    r = _result({"running": 10, "shims": 1, "left": []}, {"left": []})
    assert _oks(r) == [True, None, None, None, None, True]
    assert any(line.startswith("- n/a: Pss") for line in verdict_lines(r | {"verdicts": verdicts(r)}))


def test_rows_put_both_variants_in_the_report_as_ratios_to_go() -> None:
    r = _result(_side(), _side(shims=10, pss=3000 * MiB))
    got = {metric: vals for metric, vals, _ in rows(r)}
    assert got["scale, 10 tasks: Pss sum"] == {"python-ns": 50 * MiB, "go": 3000 * MiB}
    assert got["scale: ttrpc `Task/State` p90 at 10 tasks"]["python-ns"] == 150e-6
    results = {"environment": {"date": "d", "cpus": 2, "cpu": "c", "kernel": "k", "containerd": "x", "runc": "r",
                               "python": "3", "thp_enabled_original": "madvise"},
               "params": {"quick": False, "tasks": 1, "runs": 1, "burst": 1, "burst_reps": 1, "state_calls": 1,
                          "throughput_mib": 1, "throughput_runs": 1, "concurrency": 4, "settle": 1},
               "duration_s": 1.0, "variants": [{"name": "go", "label": "Go", "runtime": "g"},
                                               {"name": "python-ns", "label": "Python ns", "runtime": "p"}],
               "scale": r | {"verdicts": verdicts(r)}}
    md = report.markdown(results)
    assert "| scale, 10 tasks: Pss sum | 3000.0 MiB | 50.0 MiB | 0.02× |" in md
    assert "- PASS: Pss ≤ 0.02× the 10 Go shims" in md


def test_scale_runs_only_when_asked_for() -> None:
    assert "scale" not in SECTIONS and "scale" not in parse_args([]).only
    args = parse_args(["--only", "scale", "--scale-tasks", "50", "--idle-window", "5"])
    assert args.only == ["scale"] and args.scale_tasks == 50 and args.idle_window == 5.0


def test_a_scale_only_run_leaves_the_full_runs_latest_files_alone(tmp_path) -> None:
    results = {"environment": {"date": "d", "cpus": 2, "cpu": "c", "kernel": "k", "containerd": "x", "runc": "r",
                               "python": "3", "thp_enabled_original": "madvise"},
               "params": {"quick": False, "only": ["scale"], "scale_tasks": 10, "idle_window": 5.0, "tasks": 1, "runs": 1, "burst": 1, "burst_reps": 1,
                          "state_calls": 1, "throughput_mib": 1, "throughput_runs": 1, "concurrency": 4,
                          "settle": 1},
               "duration_s": 1.0}
    paths = report.write(results, tmp_path)
    assert paths["json"].name == "latest-scale.json" and paths["md"].name == "latest-scale.md"
    assert paths["copy"].name.endswith("-scale.json")
    assert not (tmp_path / "latest.json").exists()
    assert "Parameters: 10 tasks, idle window 5.0 s" in paths["md"].read_text()


def test_pss_by_kind_splits_the_template_from_the_shims() -> None:
    got = pss_by_kind([{"kind": "shim", "pss": 5}, {"kind": "template", "pss": 7}, {"kind": "shim", "pss": 1}])
    assert got == {"shim": 6, "template": 7}
