"""Watchdog process: reads engine pids from stdin; on EOF (the app exited or was killed) kills them all.

Run by kvdemo.engines.Watchdog in its own session, so a Ctrl-C in the app's terminal does not reach it
before the app has had its chance to stop engines cleanly.
"""

from __future__ import annotations

import signal
import sys
from concurrent.futures import ThreadPoolExecutor

from .engines import kill_tree


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only EOF on stdin ends the watch
    pids: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if line.isdigit():
            pids.add(int(line))
        elif line.startswith("-") and line[1:].isdigit():
            pids.discard(int(line[1:]))
    with ThreadPoolExecutor(max(1, len(pids))) as pool:  # all at once: each may take its grace period
        list(pool.map(lambda pid: kill_tree(pid, grace_s=5.0), pids))


if __name__ == "__main__":
    main()
