"""runc's exec step (shim/thp/thp_exec.c) and how the shim builds a runc command line.

The step must give the program the THP policy it is told (the shim's own is
disabled), kill it when the shim dies, refuse to run it when the shim is
already gone, and leave errors about a missing or non-executable runtime as
subprocess would raise them.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shim import thp

HELPER = thp.exec_helper()
needs_helper = pytest.mark.skipif(HELPER is None, reason=f"{thp.EXEC_HELPER} not built (make venv builds it)")
needs_thp_field = pytest.mark.skipif(
    "THP_enabled:" not in Path("/proc/self/status").read_text(), reason="kernel has no THP_enabled in status"
)

# A child that disables THP for itself, as the launcher does for the shim, then runs the
# helper with the policy given in argv[1] and prints what the program saw.
DISABLED_PARENT = """
import os, subprocess, sys
from shim import thp
thp.set_thp_disable(1)
out = subprocess.run([sys.argv[2], sys.argv[1], str(os.getpid()), "cat", "/proc/self/status"],
                     capture_output=True, text=True, check=True).stdout
print(next(l for l in out.splitlines() if l.startswith("THP_enabled:")).split()[1])
print(thp.get_thp_disable())
"""


def _run_disabled_parent(value: str) -> tuple[str, str]:
    assert HELPER is not None
    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", DISABLED_PARENT, value, HELPER], capture_output=True, text=True,
                         check=True, cwd=root).stdout.split()
    return out[0], out[1]


@needs_helper
@needs_thp_field
@pytest.mark.parametrize(("original", "program_sees"), [("0", "1"), ("1", "0")])
def test_the_program_gets_the_policy_it_is_given_and_the_parent_keeps_its_own(original, program_sees):
    # THP_enabled: 1 means THP allowed (not disabled); the parent stays disabled (get -> 1)
    assert _run_disabled_parent(original) == (program_sees, "1")


@needs_helper
def test_the_program_is_killed_when_its_parent_dies():
    # an intermediate parent starts `sleep` through the helper, reports its pid, then waits
    parent = subprocess.Popen(
        [sys.executable, "-c", (
            "import os, subprocess, sys, time\n"
            "p = subprocess.Popen([sys.argv[1], '0', str(os.getpid()), 'sleep', '300'])\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(300)\n"
        ), HELPER],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert parent.stdout is not None
        sleeper = int(parent.stdout.readline())
        fd = os.pidfd_open(sleeper)
    finally:
        parent.kill()
        parent.wait()
    try:
        # readable once the sleeper is dead; without PR_SET_PDEATHSIG it would sleep on for 300 s
        assert select.select([fd], [], [], 30)[0] == [fd], "sleep outlived its parent"
    finally:
        os.close(fd)
        try:
            os.kill(sleeper, signal.SIGKILL)
        except ProcessLookupError:
            pass


@needs_helper
def test_nothing_runs_when_the_parent_is_already_gone(tmp_path):
    marker = tmp_path / "ran"
    assert HELPER is not None
    # pid 1 is not our parent: as if the shim had died before the prctl
    result = subprocess.run([HELPER, "0", "1", "touch", str(marker)], capture_output=True, text=True)
    assert result.returncode == 127
    assert "exited before" in result.stderr
    assert not marker.exists()


@needs_helper
@pytest.mark.parametrize("argv", [["2"], ["0"], ["x", "1", "true"], ["0", "-3", "true"], ["0", "12ab", "true"]])
def test_bad_arguments_are_refused(argv):
    assert HELPER is not None
    result = subprocess.run([HELPER, *argv], capture_output=True, text=True)
    assert result.returncode == 127
    assert result.stderr.startswith("thp-exec: ")


def test_find_program_raises_what_subprocess_would(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(FileNotFoundError) as missing:
        thp.find_program("no-runc")
    assert missing.value.filename == "no-runc"
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(PermissionError):
        thp.find_program(str(plain))
    with pytest.raises(PermissionError):
        thp.find_program("not-executable")
    assert thp.find_program("sh") in ("/usr/bin/sh", "/bin/sh")
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert thp.find_program("tool") == str(tool)  # PATH order, as execvp
    assert thp.find_program(str(tool)) == str(tool)


def test_runc_command_goes_through_the_helper_when_built(monkeypatch):
    monkeypatch.setattr(thp, "exec_helper", lambda: "/x/thp-exec")
    argv, preexec = thp.runc_command(["sh", "--root", "/r", "state", "id"], 0)
    assert preexec is None
    assert argv[:3] == ["/x/thp-exec", "0", str(os.getpid())]
    assert argv[3] in ("/usr/bin/sh", "/bin/sh")
    assert argv[4:] == ["--root", "/r", "state", "id"]
    assert thp.runc_command(["sh"], 1)[0][1] == "1"


def test_runc_command_falls_back_to_a_preexec_fn(monkeypatch):
    monkeypatch.setattr(thp, "exec_helper", lambda: None)
    argv, preexec = thp.runc_command(["runc", "state", "id"], 0)
    assert argv == ["runc", "state", "id"]
    assert callable(preexec)
