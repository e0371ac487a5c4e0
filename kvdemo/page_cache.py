"""Drop a directory's files from the OS page cache, so the next read of them comes from the disk.

WHY: a KV store directory on a disk is read from the page cache (memory) right after an engine wrote it,
so "engine B loaded the shared KV at 25 GB/s" measures memory, not the disk. The share bench
measures B once warm and once after this. ``/proc/sys/vm/drop_caches`` drops every cache of the machine
and is read-only in a container; ``posix_fadvise(POSIX_FADV_DONTNEED)`` on each file drops only that
file's clean pages, so each file is ``fsync``-ed first. Linux only (elsewhere: a clear error).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class DropReport:
    files: int
    bytes: int
    cached_before_gb: float | None  # the machine's page cache ("Cached" in /proc/meminfo) before and after
    cached_after_gb: float | None

    @property
    def dropped_gb(self) -> float | None:
        """How much the machine's page cache shrank: evidence the drop worked (other processes add noise).

        Not evidence everywhere: some VMs report the same value before and after every drop; there the read
        rate of the load that follows (the disk's) is the evidence."""
        if self.cached_before_gb is None or self.cached_after_gb is None:
            return None
        return round(self.cached_before_gb - self.cached_after_gb, 3)

    def as_dict(self) -> dict:
        return {"files": self.files, "bytes": self.bytes, "page_cache_before_gb": self.cached_before_gb,
                "page_cache_after_gb": self.cached_after_gb, "page_cache_dropped_gb": self.dropped_gb}


def cached_gb(meminfo: Path = MEMINFO) -> float | None:
    """The page cache's size in GB, or None where /proc/meminfo is not readable."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("Cached:"):
                return round(int(line.split()[1]) * 1024 / 1e9, 3)
    except OSError:
        return None
    return None


def drop_directory(directory: Path, meminfo: Path = MEMINFO) -> DropReport:
    """fsync and drop every regular file under ``directory`` from the page cache."""
    if not hasattr(os, "posix_fadvise"):
        raise OSError("dropping files from the page cache needs posix_fadvise (Linux)")
    before = cached_gb(meminfo)
    files = size = 0
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            size += os.fstat(fd).st_size
            files += 1
        finally:
            os.close(fd)
    return DropReport(files, size, before, cached_gb(meminfo))


def wait_until_settled(size_of: Callable[[], int], quiet_s: float = 0.3, timeout_s: float = 10.0) -> int:
    """Wait until ``size_of()`` (a store's size, e.g. ``KvStore.size_bytes``) stops changing for ``quiet_s``: an
    engine may still be writing what it stored, asynchronously. Returns that size."""
    deadline = time.monotonic() + timeout_s
    last, since = size_of(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = size_of()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last
