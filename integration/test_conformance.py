"""Behaviour containerd's own test suites expect of a runc shim (issue 8), each
reproduced here: driven over ttrpc as containerd does (integration/shim_driver.py),
through a private containerd with ``ctr``, or by running the binary as
containerd 2.x runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import trio
from google.protobuf import any_pb2

from integration.harness import (
    PROJECT_ROOT,
    PY_RUNTIME,
    RUNC_BINARY_ENV,
    oci_runtime_binary,
    pid_alive,
    read_cmdline,
    wait_for,
)
from integration.shim_driver import EVENTUALLY, Lab, wait_until
from integration.test_task_api_direct import (
    delete_exec,
    exec_,
    finish,
    process_spec,
    running_task,
    start_exec,
    wait_exec,
)
from shim.proto import introspection_pb2, runc_options_pb2, shim_pb2

SHIM = PROJECT_ROOT / "bin" / "containerd-shim-runc-v2-py"
RUNC_OPTIONS_URL = "containerd.runc.v1.Options"


def runc_options(binary: str) -> any_pb2.Any:
    return any_pb2.Any(type_url=RUNC_OPTIONS_URL,
                       value=runc_options_pb2.Options(binary_name=binary).SerializeToString())


# -- 1. an exec's terminal comes from the request ---------------------------------------------

TTY_EXECS = 100
SEQ_TAIL = b"999999 1000000"


async def _read_until_tail(fd: int, into: bytearray) -> None:
    """Read a tty exec's output from the stdout fifo until seq's last numbers arrive."""
    while SEQ_TAIL not in into[-64:]:
        await trio.lowlevel.wait_readable(fd)
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            continue
        into += chunk


async def test_exec_terminal_comes_from_the_request_not_the_spec(lab: Lab) -> None:
    """containerd's cio.WithTerminal sets ExecProcessRequest.terminal and leaves the spec's
    "terminal" false; the Go shim makes the request win. 100 large tty execs, each intact."""
    await lab.start_sink()
    shim, cid, bundle, _ = await running_task(lab, "tty")
    spec = process_spec(bundle, ["seq", "-s", " ", "1000000"])
    assert json.loads(spec.value).get("terminal", False) is False
    for n in range(TTY_EXECS):
        exec_id = f"tty{n}"
        fifo = lab.tmp / f"{exec_id}-stdout"
        os.mkfifo(fifo)
        fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            await shim.call("Exec", shim_pb2.ExecProcessRequest(
                id=cid, exec_id=exec_id, spec=spec, stdout=str(fifo), terminal=True))
            output = bytearray()
            with trio.fail_after(EVENTUALLY):  # a lost tail fails, it does not hang the suite
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_read_until_tail, fd, output)
                    await start_exec(shim, cid, exec_id)
                    waited = await wait_exec(shim, cid, exec_id)
            assert waited.exit_status == 0, (n, bytes(output[-200:]))
            assert output.rstrip().endswith(SEQ_TAIL), (n, bytes(output[-200:]))
            assert output.startswith(b"1 2 3 4 5 "), (n, bytes(output[:40]))
            await delete_exec(shim, cid, exec_id)
        finally:
            os.close(fd)
            fifo.unlink()
    await finish(shim, cid)


# -- 2. -info ----------------------------------------------------------------------------------

def run_info(options: any_pb2.Any | None) -> subprocess.CompletedProcess:
    """As containerd 2.x runs it: the usual leading flags, then -info; the options on stdin."""
    argv = [str(SHIM), "-namespace", "default", "-address", "/run/containerd/containerd.sock",
            "-publish-binary", "/usr/bin/containerd", "-id", "info", "-info"]
    stdin = options.SerializeToString() if options is not None else b""
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=60, cwd="/")


def runtime_features(binary: str) -> dict | None:
    done = subprocess.run([binary, "features"], capture_output=True, timeout=60)
    return json.loads(done.stdout) if done.returncode == 0 else None


@pytest.mark.parametrize("binary", ["runc", "crun"])
def test_info_prints_runtime_info_with_the_runtimes_features(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} not installed")
    options = runc_options(binary) if binary != "runc" else None
    done = run_info(options)
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""
    info = introspection_pb2.RuntimeInfo.FromString(done.stdout)
    assert info.name == PY_RUNTIME
    assert info.version.version
    expected = runtime_features(binary)
    if expected is None:  # crun 1.8 has no `features`: no field, as with the Go shim
        assert not info.HasField("features")
    else:
        assert info.features.type_url == "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
        assert json.loads(info.features.value) == expected
    if options is not None:
        assert info.options == options


def test_info_with_a_missing_runtime_fails_with_a_message() -> None:
    done = run_info(runc_options("no-such-oci-runtime"))
    assert done.returncode != 0
    assert b"no-such-oci-runtime" in done.stderr


# -- 3. an exec that is still starting holds back the init's exit -----------------------------

PAUSING_RUNTIME = """#!/bin/sh
# The OCI runtime under test, paused inside `exec` until the test says go.
for arg in "$@"; do
    if [ "$arg" = exec ]; then
        : > {dir}/exec-entered
        while [ ! -e {dir}/release ]; do sleep 0.02; done
        break
    fi
done
exec {binary} "$@"
"""

#: How long a shim with the bug gets to publish the init's exit while the exec is paused.
#: The fixed shim never does, so this is also how long the test waits before releasing it.
EXIT_WINDOW = 5.0


async def test_init_exit_waits_for_an_exec_inside_runc_exec(lab: Lab) -> None:
    gate = lab.tmp / "gate"
    gate.mkdir()
    runtime = lab.tmp / "pausing-runtime"
    runtime.write_text(PAUSING_RUNTIME.format(dir=gate, binary=shutil.which(oci_runtime_binary())))
    runtime.chmod(0o755)
    sink = await lab.start_sink()
    cid = lab.new_id("pending")
    bundle = lab.bundle(cid, ["sleep", "100"])
    shim = await lab.start_shim(cid, bundle)
    init = (await shim.create(cid, bundle, options=runc_options(str(runtime)))).pid
    await shim.start(cid)
    await exec_(shim, cid, "late", process_spec(bundle, ["true"]))

    start_result: list[object] = []

    async def start_late_exec() -> None:
        try:
            start_result.append(await start_exec(shim, cid, "late"))
        except Exception as e:  # noqa: BLE001 - the runtime refuses an exec into a dead container
            start_result.append(e)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(start_late_exec)
        await wait_until(lambda: (gate / "exec-entered").exists(), 30, message="runc exec to begin")
        os.kill(init, signal.SIGKILL)
        await wait_until(lambda: not pid_alive(init), 30, message="init to be reaped")
        # The condition that shows the bug: the init's exit published while the exec is starting.
        with trio.move_on_after(EXIT_WINDOW):
            await wait_until(lambda: "/tasks/exit" in sink.topics(), EXIT_WINDOW + 1)
        assert "/tasks/exit" not in sink.topics(), "init exit published while an exec was starting"
        assert not start_result
        (gate / "release").touch()
    events = await sink.wait_count(5 if isinstance(start_result[0], int) else 4, timeout=30)
    topics = [e.topic for e in events]
    if isinstance(start_result[0], int):  # it started: its exit comes before the init's
        assert topics == ["/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started",
                          "/tasks/exit", "/tasks/exit"][:len(topics)]
        assert [e.event.id for e in events if e.topic == "/tasks/exit"] == ["late", cid]
    else:
        assert topics == ["/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exit"]
        assert (events[-1].event.id, events[-1].event.pid, events[-1].event.exit_status) == (cid, init, 137)
    assert (await shim.wait(cid)).exit_status == 137
    await shim.delete(cid)
    await shim.shutdown(cid)
    await wait_until(lambda: not pid_alive(shim.pid), 30, message=f"shim {shim.pid} to exit")


# -- 4. the installed launcher works wherever it is copied --------------------------------------

def test_installed_launcher_runs_a_task_from_anywhere(containerd, image, cid, tmp_path: Path) -> None:
    bindir = tmp_path / "elsewhere"
    done = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(PROJECT_ROOT), "install",
                           f"BINDIR={bindir}", f"LIBDIR={tmp_path / 'lib'}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for helper in ("shim/thp/thp-exec", "shim/launch/start-relay"):  # built by make: installed with the package
        if (PROJECT_ROOT / helper).exists():
            assert list((tmp_path / "lib").glob(f"lib/python3*/site-packages/{helper}")), helper
    moved = tmp_path / "copied" / "containerd-shim-runc-v2-py"
    moved.parent.mkdir()
    shutil.copy2(bindir / "containerd-shim-runc-v2-py", moved)  # and copied on from there
    extra: list[str] = []
    if os.environ.get(RUNC_BINARY_ENV):
        extra = containerd.runc_binary_args(PY_RUNTIME, oci_runtime_binary())
    try:
        out = containerd.ctr("run", "--rm", "--runtime", str(moved), *extra, image, cid,
                             "sh", "-c", "echo from-anywhere; exit 7", check=False)
    finally:  # the installed shim's template mark (its interpreter is the installed venv's)
        containerd.stop_template(python=str(tmp_path / "lib" / "bin" / "python"))
    assert out.returncode == 7, (out.stdout, out.stderr)
    assert out.stdout.strip() == "from-anywhere"


# -- 5. every process of this runtime carries its name ------------------------------------------

def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


async def test_spawned_shim_is_named_like_the_go_shim(lab: Lab) -> None:
    """Lab starts shims with the template off: the spawned-interpreter path."""
    await lab.start_sink()
    shim, cid, _, _ = await running_task(lab, "named")
    argv = read_cmdline(shim.pid) or []
    assert argv[:1] == ["containerd-shim-runc-v2-py"], argv
    assert argv[1:] == ["-namespace", "ptest", "-id", cid, "-address", lab.containerd_address]
    assert _comm(shim.pid) == "containerd-shim"  # what `pgrep containerd-shim` matches
    await finish(shim, cid)


def test_template_is_named_for_pgrep(containerd, image, cid) -> None:
    # Per-task shims (an explicit group each, so also in the namespace pass, whose one shared
    # shim never needs a template), two of them: a template is there from the second on.
    for i in range(2):
        containerd.ctr("run", "--rm", "--annotation", f"io.containerd.runc.v2.group={cid}-{i}",
                       "--runtime", PY_RUNTIME, image, f"{cid}-{i}", "true")
    pid = wait_for(containerd.template_pid, timeout=60, message="a warm template")
    argv = read_cmdline(pid) or []
    assert argv[:2] == ["containerd-shim-runc-v2-py", "template"], argv
    assert _comm(pid) == "containerd-shim"
    found = subprocess.run(["pgrep", "-x", "containerd-shim"], capture_output=True, text=True).stdout.split()
    assert str(pid) in found


# -- ids never name a path outside the bundle (issue 11 item 8) ---------------------------------

async def test_exec_ids_that_would_escape_the_bundle_are_invalid(lab: Lab) -> None:
    from integration.shim_driver import expect_error
    from shim.ttrpc import Code

    await lab.start_sink()
    shim, cid, bundle, _ = await running_task(lab, "ids")
    outside = lab.tmp / "escaped"
    for exec_id in (str(outside), "../escaped", "a/b", ""):
        await expect_error(Code.INVALID_ARGUMENT, exec_(shim, cid, exec_id, process_spec(bundle, ["true"])))
    assert not list(lab.tmp.glob("escaped*")) and not (bundle.parent / "escaped.pid").exists()
    await exec_(shim, cid, "fine.id-1", process_spec(bundle, ["true"]))  # and the shim goes on serving
    await finish(shim, cid)
