"""The soak's pure logic (no containerd): event-sequence rules, the exit-code plan, growth slopes, verdicts."""

from __future__ import annotations

from integration.ctr_events import Event
from soak.churn import growth_per_1000, plan
from soak.events import check_all, check_exec, check_task
from soak.report import ratio, verdict


def ev(topic: str, **body) -> Event:
    return Event("soak", topic, body)


def task_events(name: str, status: int = 0) -> list[Event]:
    exit_body = {"container_id": name, "id": name, "pid": 7} | ({"exit_status": status} if status else {})
    return [ev("/tasks/create", container_id=name), ev("/tasks/start", container_id=name, pid=7),
            ev("/tasks/exit", **exit_body), ev("/tasks/delete", **exit_body)]


def test_a_task_sequence_in_order_with_its_status_passes() -> None:
    assert check_task(task_events("a", 3), "a", 3) == []
    assert check_task(task_events("a"), "a", 0) == []  # ctr events omits a zero status


def test_missing_duplicated_or_reordered_task_events_are_reported() -> None:
    evs = task_events("a")
    assert check_task(evs[:3], "a", 0)
    assert check_task(evs + evs[2:3], "a", 0)
    assert check_task([evs[1], evs[0], *evs[2:]], "a", 0)
    assert check_task(evs, "a", 137) == ["/tasks/exit exit_status 0, expected 137",
                                         "/tasks/delete exit_status 0, expected 137"]


def test_exec_sequence_and_the_index_keep_execs_apart_from_their_task() -> None:
    execs = [ev("/tasks/exec-added", container_id="a", exec_id="x1"),
             ev("/tasks/exec-started", container_id="a", exec_id="x1", pid=9),
             ev("/tasks/exit", container_id="a", id="x1", pid=9, exit_status=143)]
    assert check_exec(execs, "x1", 143) == []
    assert check_exec(execs[1:], "x1", 143) == ["exec events ['/tasks/exec-started', '/tasks/exit']"]
    index = {("a", None): task_events("a"), ("a", "x1"): execs}
    assert check_all(index, {("a", None): 0, ("a", "x1"): 143}) == {}
    assert check_all(index, {("a", "x2"): 0}) == {"a/x2": ["exec events []"]}


def test_the_plan_mixes_exit_codes_and_both_kill_signals() -> None:
    kinds = [plan(i, 10) for i in range(20)]
    assert kinds.count(("term", 143)) == 2 and kinds.count(("kill", 137)) == 2
    assert all(0 <= status <= 125 for kind, status in kinds if kind == "exit")


def test_growth_is_the_slope_after_the_first_window() -> None:
    samples = [{"execs": 0, "uss": 999}] + [{"execs": n, "uss": 100 + n // 10} for n in (1000, 2000, 3000)]
    assert growth_per_1000(samples, "uss") == 100
    assert growth_per_1000(samples[:2], "uss") is None


def test_verdicts_fail_the_run_only_for_python() -> None:
    assert verdict(True, True) == "both pass"
    assert verdict(False, True) == "Go fails, Python passes"
    assert "FAIL (Python)" in verdict(True, False)
    assert verdict(None, True) == "pass"
    assert ratio(2.0, 3.0) == "1.50× Go" and ratio(None, 1.0) == "—"
