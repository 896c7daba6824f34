"""Nothing a shim imports lazily may be left for after fork: the template imports it first.

A module imported in a forked shim is private memory in every shim; imported
in the template, it is shared. This finds the shim's modules the daemon
imports, lists their function-level imports and checks each is already loaded
once the template's warm-up ran.
"""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: In a fresh interpreter: the shim's modules the daemon imports, then every module loaded once
#: the template's own warm-up (server._warm_up, as the template runs it) is done.
PROBE = (
    "import sys; sys.path.insert(0, sys.argv[1]); import shim.daemon.main; "
    "imported = sorted(m for m in sys.modules if m == 'shim' or m.startswith('shim.')); "
    "from shim.template.server import _warm_up; _warm_up(); print(repr((imported, sorted(sys.modules))))"
)


def probe() -> tuple[list[str], set[str]]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], capture_output=True, text=True, check=True)
    imported, loaded = ast.literal_eval(out.stdout)
    return imported, set(loaded)


def source(module: str) -> Path:
    path = ROOT / module.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def lazy_imports(modules: list[str]) -> dict[str, set[str]]:
    """The function-level imports of each module (relative ones resolved), by module.

    The modules are the shim's own, as the daemon imports them (derived, not listed: a
    module added to the shim is covered without editing this test)."""
    found: dict[str, set[str]] = {}
    for module in modules:
        path = source(module)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        names: set[str] = set()
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    names |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom):
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
                    names.add(".".join(base + ([node.module] if node.module else [])))
        found[module] = names
    return found


def test_the_daemon_side_is_derived_from_what_the_shim_imports() -> None:
    imported, _ = probe()
    assert "shim.daemon.service" in imported and "shim.common.options" in imported
    assert not any(m.startswith(("shim.launch", "shim.template")) for m in imported)  # other processes' code


def test_template_warm_up_loads_every_lazy_import() -> None:
    imported, loaded = probe()
    missing = {module: names - loaded for module, names in lazy_imports(imported).items() if names - loaded}
    assert missing == {}


def test_warm_up_drives_a_whole_task_lifecycle_through_the_service() -> None:
    """The template's warm-up runs the code a real shim runs around runc (create, start, an exec
    and its pty resize, state, pids, pause/resume, update, kill, the exit, wait, delete), each
    request answered without error, so the interpreter specialises that code before any fork."""
    import shim.daemon.main  # noqa: F401
    from shim.template.warmup import ROUNDS, warm_up

    answers = warm_up(rounds=2)
    assert ROUNDS >= 2
    ok = {method for method, error in answers if not error}
    assert {"Create", "Start", "Exec", "ResizePty", "CloseIO", "State", "Pids", "Pause", "Resume", "Update",
            "Kill", "Wait", "Delete"} <= ok, answers
    assert answers.count(("Create", "")) == 2
    errors = {(m, e) for m, e in answers if e}
    # the fake pids have no cgroup, an exec's pid cannot be signalled, and "gone" was never created
    assert errors <= {("Stats", "NOT_FOUND"), ("Kill", "NOT_FOUND"), ("State", "NOT_FOUND")}, errors


def test_warm_up_leaves_no_thread_behind() -> None:
    """The template forks right after its warm-up: a thread alive then (trio keeps an idle worker
    for 10 s after a to_thread job) could hold a lock the forked shim would wait on forever."""
    code = ("import sys, os; sys.path.insert(0, sys.argv[1]); import shim.daemon.main; "
            "from shim.template.warmup import warm_up; warm_up(); print(len(os.listdir('/proc/self/task')))")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(ROOT)], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "1"


def test_template_imports_the_launcher_a_relayed_start_runs() -> None:
    """A start relayed to the template runs the launcher in a forked child that then forks the
    shim: whatever that child imports stays private in the shim, so the template imports it."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from shim.template import server; server._warm_up(); "
            "print(' '.join(m for m in ('shim.launch.cli', 'shim.launch.launcher') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(ROOT)], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["shim.launch.cli", "shim.launch.launcher"]


def test_warm_up_runs_what_a_shim_runs_around_the_service() -> None:
    """Beyond the service: the real runc client spawning a process (``true`` as the binary,
    through subprocess and the reaper), a trio worker thread (a shim's first Create mounts in
    one), reading a process's cgroups, accepting a connection on a listening socket, and the
    events' connection to containerd. Code first run after fork is written in every shim."""
    import shim.daemon.main  # noqa: F401
    from shim.template.warmup import code_run_by, warm_up

    ran = {code.co_qualname for code in code_run_by(lambda: warm_up(rounds=1))}
    expected = {"Runc.run", "Runc._popen", "Popen._execute_child", "Reaper.reap", "to_thread_run_sync",
                "WorkerThread._handle_job", "container_cgroup", "ContainerCgroup.metrics_any", "Server.serve",
                "open_client", "EventPublisher._send_queued"}
    assert expected <= ran, expected - ran


def test_code_run_by_lists_code_in_the_order_it_first_ran() -> None:
    from shim.template.warmup import code_run_by

    def first() -> None:
        second()
        second()

    def second() -> None:
        pass

    ran = code_run_by(first)
    assert [c for c in ran if c in (first.__code__, second.__code__)] == [first.__code__, second.__code__]
    import sys

    assert all(sys.monitoring.get_tool(t) is None or sys.monitoring.get_tool(t) != "shim template" for t in range(6))


def test_code_run_in_child_lists_the_fork_handlers_and_a_shims_start_leaving_this_process_alone() -> None:
    """A forked shim runs the fork handlers and its start-up (logging on the bundle's fifo, ...)
    before it serves, code the warm-up never runs: pack_shim_code packs it with the warm-up's,
    which it learns from a forked child, so the template's own logging and environment stay."""
    import logging
    import os

    import shim.daemon.main  # noqa: F401
    from shim.template.warmup import _shim_start, code_run_in_child

    handlers, environ = list(logging.getLogger().handlers), dict(os.environ)
    ran = {code.co_qualname for code in code_run_in_child(_shim_start)}
    assert {"_after_fork", "Handler._at_fork_reinit", "setup_logging", "Handler.setFormatter",
            "FifoHandler.emit", "raise_soft_limit", "SocketName.__init__"} <= ran, ran
    assert logging.getLogger().handlers == handlers and dict(os.environ) == environ


@functools.cache
def ran_in_fresh_warm_up() -> tuple[frozenset[tuple[str, str]], list[tuple[str, str]]]:
    """(file name, qualified name) of the code one warm-up round runs, and its answers; in a fresh
    interpreter: code_run_by sees each code object once per process. Run once for every test
    that asks (each run is a whole interpreter's warm-up)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import shim.daemon.main; "
            "from shim.template.warmup import code_run_by, warm_up; answers = []; "
            "ran = code_run_by(lambda: answers.extend(warm_up(rounds=1))); "
            "print(repr((sorted({(c.co_filename.rpartition('/')[2], c.co_qualname) for c in ran}), answers)))")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(ROOT)], capture_output=True, text=True,
                         check=True).stdout
    ran, answers = ast.literal_eval(out)
    return frozenset(ran), answers


def test_warm_up_creates_with_the_runtime_options_cri_sends() -> None:
    """Under CRI, every pod shim's first Create carries a runtimeoptions.v1.Options naming the
    handler's TOML (integration/cri/harness.py's ConfigPath): decoding it (shim.common.wire) and
    parsing the TOML (tomllib) was code first run, so written, in every pod shim (bench.memattr on
    a pod shim). The warm-up's Create sends such options, and succeeds with them."""
    ran, answers = ran_in_fresh_warm_up()
    expected = {("options.py", "runtime_options_toml"), ("options.py", "from_toml"), ("wire.py", "fields"),
                ("_parser.py", "loads"), ("_parser.py", "parse_value")}
    assert expected <= ran, expected - ran
    assert ("Create", "") in answers


def test_warm_up_creates_with_output_fifos() -> None:
    """containerd (ctr and CRI alike) gives a task's Create a stdout and a stderr fifo: opening
    them, the output pipes and the copiers that splice into the fifos until EOF ran first in every
    shim. The warm-up's Create names two fifos in its bundle, so that code runs in the template."""
    ran, answers = ran_in_fresh_warm_up()
    expected = {("stdio.py", "ProcessIO._fifo_sink"), ("stdio.py", "_open_fifo"), ("fds.py", "OwnedFds.pipe"),
                ("stdio.py", "ProcessIO._copy_output"), ("stdio.py", "ProcessIO._splice_output")}
    assert expected <= ran, expected - ran
    assert ("Create", "") in answers and ("Delete", "") in answers


def test_warm_up_arms_an_oom_watch() -> None:
    """Every shim arms an OOM watch on each container's memory cgroup at Create (a v1 eventfd
    or a v2 inotify watch): the warm-up's fake pids have no cgroup, so it arms, runs and disarms
    one on the template's own cgroup, and that code runs in the template, not first in each shim."""
    from shim.daemon.cgroups import container_cgroup

    ran, _ = ran_in_fresh_warm_up()
    armed = ("oom.py", "register_v1_oom_eventfd") if container_cgroup(os.getpid()).version == 1 \
        else ("oom.py", "OOMWatcher._inotify_watch")
    expected = {("oom.py", "OOMWatcher.run"), ("oom.py", "OOMWatcher.add"), ("oom.py", "OOMWatcher.add_cgroup"),
                ("oom.py", "OOMWatcher.remove"), armed}
    assert expected <= ran, expected - ran


def test_warm_up_gives_memory_back_as_a_shim_does() -> None:
    """A shim gives memory back (a full collection, glibc's malloc_trim through ctypes) after
    its connections went away, as every pod shim does soon after its start: the warm-up runs that
    pass, so its code (and ctypes' library lookup) is not first run in each shim."""
    ran, _ = ran_in_fresh_warm_up()
    expected = {("giveback.py", "GiveBack.__init__"), ("giveback.py", "GiveBack.give_back"),
                ("giveback.py", "_malloc_trim")}
    assert expected <= ran, expected - ran
