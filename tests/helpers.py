"""Small helpers shared by the tests: free ports, polling with a deadline, process bookkeeping."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import httpx
import psutil

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parent.parent


def free_ports(n: int = 1) -> list[int]:
    """n distinct ports that were free a moment ago (all bound at once, so no duplicates)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """A server could listen on it now. SO_REUSEADDR, as servers set it: connections in TIME_WAIT (left by
    a server that just stopped) do not count, a listening socket does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def is_gone(pid: int) -> bool:
    """True when no live process has this pid (a zombie waiting to be reaped counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def alive(pids: Iterable[int]) -> list[int]:
    return [p for p in pids if not is_gone(p)]


def describe(pids: Iterable[int]) -> str:
    out = []
    for pid in pids:
        try:
            out.append(f"{pid}: {' '.join(psutil.Process(pid).cmdline())[:160]}")
        except psutil.Error:
            out.append(f"{pid}: (gone)")
    return "; ".join(out)


def kill_all(pids: Iterable[int]) -> None:
    """Last-resort cleanup of processes a test started (by pid, never by name)."""
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


# ----- running `python app.py` as a person would (used by the lifecycle, reliability and bad-input tests) ----

def app_env(**extra: str) -> dict[str, str]:
    """This process's environment without KVDEMO_* / SPACE_ID (they would change the app's flags), offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVDEMO_") and k != "SPACE_ID"}
    env.update(PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def start_app(args: list[str], output: Path, env: dict[str, str] | None = None,
              stderr: Path | None = None) -> subprocess.Popen:
    """`python app.py ARGS` in its own session (a test runner's signals do not reach it), stdout and stderr
    to the file `output` (stderr to its own file if `stderr` is given). SIGINT acts as Ctrl-C even when this
    process ignores it (e.g. a background job, whose SIG_IGN a child would inherit; handled signals are
    reset to the default on exec)."""
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with open(output, "wb") as out, open(stderr or os.devnull, "wb") as err:
            return subprocess.Popen([sys.executable, "app.py", *args], cwd=REPO_ROOT, env=env or app_env(),
                                    stdout=out, stderr=err if stderr else subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def ui_answers(url: str) -> bool:
    """The UI's HTTP server answers 200 at `url`. Cheap to poll: an HTTP request (~25 ms of CPU for httpx's
    client) is only made once the port accepts connections, so polling does not slow a starting app."""
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=1).close()
    except OSError:
        return False
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop_app(proc: subprocess.Popen, pids: set[int], output: Callable[[], str] = lambda: "") -> None:
    """Ctrl-C the app and wait until it and every process it started (``pids``) exit; kill and fail otherwise."""
    import pytest

    if proc.poll() is None:
        pids |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the app stops its engines
    try:
        proc.wait(timeout=60)
        wait_until(lambda: not alive(pids), 30, "every process of the app to exit")
    except (AssertionError, subprocess.TimeoutExpired):
        left = alive(pids)
        kill_all(left)
        pytest.fail(f"the app did not stop on SIGINT; left running: {describe(left)}\n{output()[-3000:]}")


def fake_module(monkeypatch, name: str, **attrs: object) -> types.ModuleType:
    """A module named ``name`` holding ``attrs``, in sys.modules for this test (stands in for vLLM/LMCache)."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, module)
    return module

