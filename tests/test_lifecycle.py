"""Start and stop the whole app 20 times: no engine may outlive it, however it is stopped.

Each cycle runs `python app.py --simulate` (real engine subprocesses, each in its own process group, and the
watchdog), waits for the UI, records every process of the app's tree and the engines' process groups, then
sends one signal to the app's pid only: Ctrl-C (SIGINT), SIGTERM, or SIGKILL (no cleanup can run: the
watchdog must stop the engines). Afterwards no recorded process and no process of an engine's group may be
left, and the UI and engine ports must be free again. The same three signals are also sent while the engines
are still starting (made slow to start here, as vLLM is for minutes): the app must stop them at once.

"Gone" means reaped, not a zombie. This machine's init (pid 1) does not reap orphans, so for the length of
this module the test process is a child subreaper (prctl PR_SET_CHILD_SUBREAPER): orphans of a SIGKILLed app
are re-parented to it, and it reaps them as init would on a normal system.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from helpers import app_env, describe, free_ports, start_app, ui_answers, wait_until

from kvdemo.errors import UserFacingError
from kvdemo.preflight import check_port_free

pytestmark = pytest.mark.slow  # every test starts and stops the app (20 cycles)
CYCLES = 20
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)  # rotated: 7 SIGINT, 7 SIGTERM, 6 SIGKILL
START_TIMEOUT_S = 60
STOP_DEADLINE_S = 20
PR_SET_CHILD_SUBREAPER = 36
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGKILL: -signal.SIGKILL}


@pytest.fixture(scope="module", autouse=True)
def subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@dataclass
class Cycle:
    proc: subprocess.Popen
    ports: list[int]
    output: Path
    procs: list[psutil.Process] = field(default_factory=list)  # app, watchdog, engines (pid + start time)
    engine_pgids: set[int] = field(default_factory=set)

    def text(self) -> str:
        return self.output.read_text(errors="replace")


def _reap(c: Cycle) -> None:
    """Reap recorded processes that were re-parented to this (subreaper) process and have exited."""
    me = os.getpid()
    for p in c.procs:
        if p.pid == c.proc.pid:
            continue  # the app is reaped by its Popen
        try:
            if p.ppid() == me and p.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(p.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            pass


def _left(c: Cycle) -> list[psutil.Process]:
    """Recorded processes still in the process table (zombies included), and anything in an engine's group."""
    _reap(c)
    left = [p for p in c.procs if p.is_running()]  # is_running() compares start times: a reused pid is not ours
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in c.engine_pgids and p not in left:
                left.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return left


def _ports_free(ports: list[int]) -> bool:
    try:
        for port in ports:
            check_port_free(port)
    except UserFacingError:
        return False
    return True


def _tree_complete(c: Cycle) -> bool:
    """The app's tree has the watchdog and both engines (started before the UI); records it and their groups."""
    try:
        c.procs = [psutil.Process(c.proc.pid), *psutil.Process(c.proc.pid).children(recursive=True)]
        cmdlines = [" ".join(p.cmdline()) for p in c.procs]
    except psutil.Error:
        return False
    engines = [p for p, cmd in zip(c.procs, cmdlines) if "kvdemo.simulate" in cmd]
    if len(engines) != 2 or not any("kvdemo.watchdog" in cmd for cmd in cmdlines):
        return False
    c.engine_pgids = {os.getpgid(p.pid) for p in engines}
    return True


def _launch(tmp_path: Path, env: dict[str, str] | None = None) -> Cycle:
    ui_port, lm_port, plain_port = ports = free_ports(3)
    output = tmp_path / "app.out"
    proc = start_app(["--simulate", "--sim-speed", "20", "--port", str(ui_port), "--engine-ports",
                      f"{lm_port},{plain_port}", "--log-dir", str(tmp_path / "logs")], output, env=env)
    return Cycle(proc, ports, output)


def _wait_for(c: Cycle, predicate, what: str) -> None:
    """Wait for the app to get somewhere; if it exits or times out instead, fail (cleaning up)."""
    try:
        wait_until(lambda: c.proc.poll() is not None or predicate(), START_TIMEOUT_S, what, interval=0.1)
        assert c.proc.poll() is None, f"app exited with {c.proc.returncode}"
    except AssertionError as exc:
        _kill_everything(c)
        pytest.fail(f"{exc}\n--- app output ---\n{c.text()[-3000:]}")


def _kill_everything(c: Cycle) -> None:
    """Last-resort cleanup: the app and every process recorded or still under it (by pid, never by name)."""
    try:
        c.procs += [p for p in psutil.Process(c.proc.pid).children(recursive=True) if p not in c.procs]
    except psutil.Error:
        pass
    if c.proc.poll() is None:
        c.proc.kill()
        c.proc.wait(timeout=10)
    for p in _left(c):
        try:
            p.kill()  # psutil checks that the pid still is the process recorded
        except psutil.Error:
            pass
    _reap(c)


def _signal_and_check(c: Cycle, sig: signal.Signals) -> None:
    """Send `sig` to the app's pid only; within STOP_DEADLINE_S it is reaped, every recorded process and
    every process of an engine's group is gone, and the ports are free. Cleans up whatever is left."""
    try:
        wait_until(lambda: _tree_complete(c), 10, "the watchdog and two engines under the app")
        assert all(pgid not in (c.proc.pid, os.getpgid(0)) for pgid in c.engine_pgids), "engines share a group"
        os.kill(c.proc.pid, sig)  # the app's pid only: its engines and watchdog get nothing from this test
        deadline = time.monotonic() + STOP_DEADLINE_S
        code = c.proc.wait(timeout=STOP_DEADLINE_S)  # reaps the app
        wait_until(lambda: not _left(c), max(1.0, deadline - time.monotonic()),
                   f"every process of the app to be gone after {sig.name}", interval=0.1)
        wait_until(lambda: _ports_free(c.ports), max(1.0, deadline - time.monotonic()),
                   f"ports {c.ports} to be free after {sig.name}", interval=0.1)
    except (AssertionError, subprocess.TimeoutExpired) as exc:
        left = describe(p.pid for p in _left(c))
        pytest.fail(f"{sig.name}: {exc}\nprocesses: {left or 'none'}\n--- app output ---\n{c.text()[-3000:]}")
    finally:
        _kill_everything(c)
    out = c.text()
    assert code == EXIT_CODES[sig], f"exit code {code} after {sig.name}\n{out[-3000:]}"
    if sig != signal.SIGKILL:
        assert "Traceback" not in out, out[-3000:]
    if sig == signal.SIGINT:
        assert "stopping engines" in out, out[-3000:]


@pytest.mark.parametrize("n", range(CYCLES), ids=lambda n: f"cycle{n + 1:02d}-{SIGNALS[n % 3].name}")
def test_start_wait_for_ui_then_stop(n, tmp_path):
    c = _launch(tmp_path)
    url = f"http://127.0.0.1:{c.ports[0]}/"
    _wait_for(c, lambda: ui_answers(url), "the UI to answer")
    _signal_and_check(c, SIGNALS[n % 3])


SLOW_ENGINE_SITECUSTOMIZE = """
import time
if b"kvdemo.simulate" in open("/proc/self/cmdline", "rb").read():
    time.sleep(600)  # an engine still loading (vLLM takes minutes): alive, not listening yet
"""


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_stop_while_engines_are_still_starting(sig, tmp_path):
    """Ctrl-C or SIGTERM before the engines are healthy stops them at once (the app must not first wait
    for them to come up); after SIGKILL the watchdog stops them. Engines are made slow to start by a
    sitecustomize module on their PYTHONPATH."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_ENGINE_SITECUSTOMIZE)
    c = _launch(tmp_path, env=app_env(PYTHONPATH=str(site)))
    _wait_for(c, lambda: "waiting for 2 engines" in c.text(), "the app to wait for its engines")
    _signal_and_check(c, sig)
    assert "ready in" not in c.text()
