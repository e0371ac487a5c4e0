"""Small helpers shared by the tests: free ports, polling with a deadline, process bookkeeping."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import psutil

T = TypeVar("T")


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
