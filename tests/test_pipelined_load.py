"""kvdemo.pipelined_load: group reads and GPU copies overlap, the loaded prefix and every release are right."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from kvdemo.lmcache_patches.pipelined_load import group_chunks, load_in_groups

CHUNK = 256


class Obj:
    def __init__(self, key: str) -> None:
        self.key = key


class FakeIO:
    """Store of chunk objects keyed by name; records reads, copies and releases."""

    def __init__(self, missing: set[str] = frozenset(), fail_fetch: set[str] = frozenset(),
                 fail_copy_at: int | None = None) -> None:
        self.missing, self.fail_fetch, self.fail_copy_at = missing, fail_fetch, fail_copy_at
        self.lock = threading.Lock()
        self.fetched: list[Obj] = []
        self.copies: list[tuple[list[str], list[int], list[int]]] = []
        self.released: Counter[int] = Counter()
        self.released_copied: list[str] = []
        self.released_unused: list[str] = []
        self.hooks: dict[str, Any] = {}  # key of a group's first chunk -> callable run before reading it

    def fetch(self, keys: list[str], location: str) -> list[Obj | None]:
        if keys[0] in self.hooks:
            self.hooks[keys[0]]()
        if set(keys) & self.fail_fetch:
            raise OSError("disk gone")
        objs = [None if k in self.missing else Obj(k) for k in keys]
        with self.lock:
            self.fetched += [o for o in objs if o is not None]
        return objs

    def to_gpu(self, objs: list[Obj], starts: list[int], ends: list[int]) -> None:
        self.copies.append(([o.key for o in objs], starts, ends))
        if self.fail_copy_at is not None and len(self.copies) - 1 == self.fail_copy_at:
            raise RuntimeError("CUDA error: out of memory")

    def size(self, obj: Obj) -> int:
        return 10

    def release_copied(self, obj: Obj) -> None:
        self.released[id(obj)] += 1
        self.released_copied.append(obj.key)

    def release_unused(self, obj: Obj) -> None:
        self.released[id(obj)] += 1
        self.released_unused.append(obj.key)

    def assert_each_read_released_once(self) -> None:
        assert sorted(self.released.values()) == [1] * len(self.fetched)
        assert set(self.released) == {id(o) for o in self.fetched}


def chunks(n: int, first: int = 0, prefix: str = "k") -> list[tuple[str, int, int]]:
    return [(f"{prefix}{i}", i * CHUNK, (i + 1) * CHUNK) for i in range(first, first + n)]


@pytest.fixture
def readers() -> ThreadPoolExecutor:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def test_groups_keep_token_order_within_and_across_locations() -> None:
    mapping = [("LocalCPUBackend", chunks(3)), ("RemoteBackend", chunks(5, first=3))]
    groups = group_chunks(mapping, 2)
    assert [(loc, [k for k, _, _ in c]) for loc, c in groups] == [
        ("LocalCPUBackend", ["k0", "k1"]), ("LocalCPUBackend", ["k2"]),
        ("RemoteBackend", ["k3", "k4"]), ("RemoteBackend", ["k5", "k6"]), ("RemoteBackend", ["k7"])]
    with pytest.raises(ValueError):
        group_chunks(mapping, 0)


def test_all_chunks_copied_in_order_and_released(readers: ThreadPoolExecutor) -> None:
    io = FakeIO()
    report = load_in_groups([("RemoteBackend", chunks(19))], io, readers, group_size=8)
    assert [keys for keys, _, _ in io.copies] == [[f"k{i}" for i in range(8)], [f"k{i}" for i in range(8, 16)],
                                                 ["k16", "k17", "k18"]]
    assert io.copies[2][1:] == ([16 * CHUNK, 17 * CHUNK, 18 * CHUNK], [17 * CHUNK, 18 * CHUNK, 19 * CHUNK])
    assert report.loaded == chunks(19) and report.failed_start is None
    assert report.groups == 3 and report.bytes_loaded == 190
    assert io.released_copied == [f"k{i}" for i in range(19)] and io.released_unused == []
    io.assert_each_read_released_once()


def test_first_group_is_copied_while_later_groups_are_still_being_read(readers: ThreadPoolExecutor) -> None:
    """The read of group 2 waits until the copy of group 0 has begun. Reading everything before copying
    anything (LMCache's order) never lets that happen, and the read gives up after its timeout."""
    first_copy_started = threading.Event()
    seen_by_third_read: list[bool] = []
    io = FakeIO()
    io.hooks["k4"] = lambda: seen_by_third_read.append(first_copy_started.wait(timeout=5))
    copy = io.to_gpu

    def to_gpu(objs: list[Obj], starts: list[int], ends: list[int]) -> None:
        first_copy_started.set()
        copy(objs, starts, ends)

    io.to_gpu = to_gpu  # type: ignore[method-assign]
    load_in_groups([("RemoteBackend", chunks(6))], io, readers, group_size=2)
    assert seen_by_third_read == [True]
    assert len(io.copies) == 3


def test_unreadable_chunk_stops_the_load_there(readers: ThreadPoolExecutor) -> None:
    io = FakeIO(missing={"k5"})
    report = load_in_groups([("RemoteBackend", chunks(12))], io, readers, group_size=4)
    assert report.loaded == chunks(5)
    assert report.failed_start == 5 * CHUNK
    assert [keys for keys, _, _ in io.copies] == [["k0", "k1", "k2", "k3"], ["k4"]]
    assert sorted(io.released_unused) == sorted(["k6", "k7", "k8", "k9", "k10", "k11"])
    io.assert_each_read_released_once()


def test_a_read_that_raises_counts_as_unreadable(readers: ThreadPoolExecutor,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    io = FakeIO(fail_fetch={"k4"})
    report = load_in_groups([("RemoteBackend", chunks(10))], io, readers, group_size=4)
    assert report.loaded == chunks(4) and report.failed_start == 4 * CHUNK
    assert "recomputing from there" in caplog.text
    io.assert_each_read_released_once()


def test_later_location_is_not_copied_after_a_failure(readers: ThreadPoolExecutor) -> None:
    io = FakeIO(missing={"k1"})
    report = load_in_groups([("LocalCPUBackend", chunks(3)), ("RemoteBackend", chunks(4, first=3))], io, readers,
                            group_size=8)
    assert report.loaded == chunks(1)
    assert [keys for keys, _, _ in io.copies] == [["k0"]]
    io.assert_each_read_released_once()


def test_failed_copy_raises_and_releases_everything_read(readers: ThreadPoolExecutor) -> None:
    io = FakeIO(fail_copy_at=1)
    with pytest.raises(RuntimeError, match="out of memory"):
        load_in_groups([("RemoteBackend", chunks(16))], io, readers, group_size=2)
    readers.shutdown(wait=True)
    io.assert_each_read_released_once()
    assert io.released_copied[:4] == ["k0", "k1", "k2", "k3"]


def test_nothing_to_load(readers: ThreadPoolExecutor) -> None:
    io = FakeIO()
    report = load_in_groups([], io, readers)
    assert report.loaded == [] and report.groups == 0 and io.copies == []
