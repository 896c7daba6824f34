"""bench: a peer shim left alive is a finding for its column, our own is a failure."""

from __future__ import annotations

import pytest

from bench import procs, tasks


class FakeContainerd:
    address = "/run/fake.sock"


def fake_world(monkeypatch, alive: dict[str, list[int]]) -> list[int]:
    killed: list[int] = []

    def family_pids(address, templates=True):
        return {f: [p for p in pids if p not in killed] for f, pids in alive.items()}

    monkeypatch.setattr(procs, "family_pids", family_pids)
    monkeypatch.setattr(procs, "kill_pids", killed.extend)
    monkeypatch.setattr(tasks, "PEER_LEFTOVERS", [])
    return killed


def test_a_peers_leftover_shim_is_recorded_killed_and_the_run_goes_on(monkeypatch):
    killed = fake_world(monkeypatch, {"python": [], "go": [], "rust": [41, 42]})
    tasks.wait_no_shims(FakeContainerd(), timeout=5, peer_grace=0.2)
    assert killed == [41, 42]
    assert [(x["family"], x["pids"]) for x in tasks.PEER_LEFTOVERS] == [("rust", [41, 42])]


def test_our_own_leftover_shim_fails_the_run(monkeypatch):
    killed = fake_world(monkeypatch, {"python": [7], "go": []})
    with pytest.raises(TimeoutError):
        tasks.wait_no_shims(FakeContainerd(), timeout=0.5, peer_grace=0.1)
    assert killed == []


def test_nothing_left_records_nothing(monkeypatch):
    killed = fake_world(monkeypatch, {"python": [], "go": []})
    tasks.wait_no_shims(FakeContainerd(), timeout=5, peer_grace=5)
    assert killed == [] and tasks.PEER_LEFTOVERS == []
