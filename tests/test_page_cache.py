"""kvdemo.page_cache: the cold-store step of the share bench (fsync + POSIX_FADV_DONTNEED per file)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from kvdemo import page_cache


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="Linux only")
def test_drop_directory_reports_every_file(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "k1.bin").write_bytes(b"x" * 5000)
    (tmp_path / "k2.bin").write_bytes(b"y" * 3000)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nCached:   2000000 kB\n")
    report = page_cache.drop_directory(tmp_path / "a", meminfo)
    assert (report.files, report.bytes) == (1, 5000)
    assert report.cached_before_gb == report.cached_after_gb == 2.048 and report.dropped_gb == 0.0
    assert page_cache.drop_directory(tmp_path).as_dict()["files"] == 3  # meminfo itself is a file here


def test_cached_gb_without_meminfo(tmp_path: Path) -> None:
    assert page_cache.cached_gb(tmp_path / "missing") is None
    assert page_cache.DropReport(1, 1, None, 1.0).dropped_gb is None


def test_wait_until_settled_waits_for_a_writer(tmp_path: Path) -> None:
    def writer() -> None:
        for i in range(4):
            (tmp_path / f"chunk{i}").write_bytes(b"z" * 1000)
            time.sleep(0.1)

    thread = threading.Thread(target=writer)
    thread.start()
    size = page_cache.wait_until_settled(lambda: sum(p.stat().st_size for p in tmp_path.iterdir()), quiet_s=0.3,
                                         timeout_s=5)
    thread.join()
    assert size == 4000
