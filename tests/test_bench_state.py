"""bench: the State rows' CPU time and one-CPU pass (latency._cpu_ns, latency._one_cpu, report)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from bench import latency, report


def _spin_until(stop: threading.Event) -> None:
    while not stop.is_set():
        pass


#: A process whose second thread runs 50 ms of CPU, says so, and then waits with the first
#: thread for stdin to close: nothing ends, so nothing takes its time away between two reads.
SPINNER = """
import sys, threading, time
done = threading.Event()
def spin():
    while time.thread_time_ns() < 50_000_000:
        pass
    done.set()
    threading.Event().wait()  # stays, with its time, until the process ends
threading.Thread(target=spin, daemon=True).start()
done.wait()
print("ready", flush=True)
sys.stdin.read()
"""


def _thread_ns(tid: int) -> int:
    with open(f"/proc/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def test_cpu_time_counts_every_thread_of_the_process():
    child = subprocess.Popen([sys.executable, "-c", SPINNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        main_thread = _thread_ns(child.pid)  # the thread whose tid is the pid
        total = latency._cpu_ns([child.pid])
        # The main thread is blocked: the sum can pass its time by 50 ms only through the other
        # thread's (schedstat and thread_time may differ by a tick).
        assert total >= main_thread + 50_000_000 - 10_000_000, (total, main_thread)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    assert latency._cpu_ns([]) == 0


def test_cpu_time_of_a_gone_process_is_zero():
    assert latency._cpu_ns([2**22 + 1]) == 0  # above pid_max's default ceiling: never a live pid


def test_one_cpu_pins_the_caller_and_the_shims_threads_and_gives_their_masks_back():
    original = os.sched_getaffinity(0)
    if len(original) < 2:
        pytest.skip("needs two CPUs")
    stop = threading.Event()
    worker = threading.Thread(target=_spin_until, args=(stop,))  # stands for a shim's thread
    worker.start()
    try:
        tid = worker.native_id
        assert tid is not None
        with latency._one_cpu([os.getpid()]):
            assert os.sched_getaffinity(0) == {min(original)}
            assert os.sched_getaffinity(tid) == {min(original)}
        assert os.sched_getaffinity(0) == original
        assert os.sched_getaffinity(tid) == original
    finally:
        stop.set()
        worker.join()


def _state(median: float, cpu: float | None, one_median: float, one_cpu: float | None) -> dict:
    return {"median_s": median, "p90_s": median, "cpu_per_call_s": cpu,
            "one_cpu": {"median_s": one_median, "cpu_per_call_s": one_cpu}}


def test_the_report_shows_cpu_time_and_the_one_cpu_pass_beside_the_round_trip():
    results = {"latency": {"ttrpc_state": {"go": _state(100e-6, 80e-6, 50e-6, 40e-6),
                                           "python": _state(110e-6, 70e-6, 45e-6, None)}}}
    rows = {name: values for name, values, _ in report.rows(results)}
    assert rows["latency: ttrpc `Task/State`, shim CPU time per call"] == {"go": 80e-6, "python": 70e-6}
    assert rows["latency: ttrpc `Task/State` round trip median, client and shim on one CPU"] == {
        "go": 50e-6, "python": 45e-6}
    assert rows["latency: ttrpc `Task/State`, shim CPU time per call, on one CPU"] == {"go": 40e-6, "python": None}


def test_an_older_result_without_the_one_cpu_pass_still_reports_its_round_trip():
    results = {"latency": {"ttrpc_state": {"go": {"median_s": 1e-4, "p90_s": 2e-4}}}}
    names = [name for name, _, _ in report.rows(results)]
    assert "latency: ttrpc `Task/State` round trip median" in names
    assert not any("one CPU" in n or "CPU time" in n for n in names)
