"""Load stored KV chunks onto the GPU in groups, reading the next groups while the current one is copied.

WHY: LMCache 0.5.3's non-layerwise ``retrieve`` first reads *every* chunk of a request from its store
(``StorageManager.batched_get``: for the file-system connector one file per 256-token chunk, 2 GB at 16K
tokens of Mistral-7B) and only then starts the host→device copy of all of them. Reading and copying use
different hardware (CPU memory bandwidth / PCIe), so doing them one after the other wastes the shorter of
the two. Here the reads are split into groups that reader threads fetch in order, and each group is
copied as soon as it has arrived, while later groups are still being read.

This module knows nothing of LMCache or torch: :class:`ChunkIO` says how to fetch, copy and release, so the
ordering, failure and release rules are tested on CPU with fakes (``tests/test_pipelined_load.py``); the
plugin (``kvdemo.vllm_plugin``, fix ``pipeline``) plugs LMCache's storage manager and GPU connector in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# 8 chunks of 256 tokens = 2,048 tokens, 268 MB of Mistral-7B KV per group: small enough that the copy of
# the first group starts early, big enough that each read keeps several file reads in flight.
DEFAULT_GROUP_CHUNKS = 8
# Reader threads: two groups are read at once, so the next group is ready when a copy ends.
DEFAULT_READERS = 2

# A chunk as LMCache's retrieve handles it: (key, start token, end token).
Chunk = tuple[Any, int, int]


class ChunkIO(Protocol):
    """What the pipeline needs from the cache engine."""

    def fetch(self, keys: list[Any], location: str) -> list[Any | None]:
        """Read these chunks from one storage location (blocking; runs on a reader thread)."""

    def to_gpu(self, objs: list[Any], starts: list[int], ends: list[int]) -> None:
        """Copy chunks into the engine's paged KV cache; returns once the copy is complete."""

    def size(self, obj: Any) -> int:
        """Bytes of one chunk."""

    def release_copied(self, obj: Any) -> None:
        """Give back a chunk that was copied to the GPU."""

    def release_unused(self, obj: Any) -> None:
        """Give back a chunk that was read but will not be copied."""


@dataclass
class LoadReport:
    """What one pipelined load did, for the engine log and LMCache's retrieve stats."""

    loaded: list[Chunk] = field(default_factory=list)
    bytes_loaded: int = 0
    groups: int = 0
    wait_s: float = 0.0  # time the copying thread waited for reads
    copy_s: float = 0.0  # time spent in to_gpu
    total_s: float = 0.0
    failed_start: int | None = None  # first token whose chunk could not be read (nothing after it is loaded)


def group_chunks(block_mapping: Sequence[tuple[str, Sequence[Chunk]]], group_size: int) -> list[tuple[str, list[Chunk]]]:
    """Split each location's chunks, in token order, into groups of at most ``group_size`` chunks."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    groups: list[tuple[str, list[Chunk]]] = []
    for location, chunks in block_mapping:
        chunks = list(chunks)
        groups += [(location, chunks[i:i + group_size]) for i in range(0, len(chunks), group_size)]
    return groups


def load_in_groups(block_mapping: Sequence[tuple[str, Sequence[Chunk]]], io: ChunkIO, readers: Executor,
                   group_size: int = DEFAULT_GROUP_CHUNKS) -> LoadReport:
    """Read every group on ``readers`` (all submitted at once, in token order) and copy each group to the GPU
    as soon as it is read, in token order.

    Same result as LMCache's retrieve: the loaded chunks are the longest readable prefix; a chunk that
    cannot be read stops the load there, and every chunk read after it is released unused. Every chunk
    read is released exactly once, also when a copy raises (the exception is re-raised).
    """
    started = time.perf_counter()
    report = LoadReport()
    groups = group_chunks(block_mapping, group_size)
    report.groups = len(groups)
    futures: list[Future] = [readers.submit(io.fetch, [key for key, _, _ in chunks], location)
                             for location, chunks in groups]
    index = 0
    try:
        for index, ((location, chunks), future) in enumerate(zip(groups, futures)):
            objs = _wait_for(future, len(chunks), location, report)
            if report.failed_start is not None:
                _release_all(io.release_unused, objs)
                continue
            usable = _readable_prefix(objs)
            _release_all(io.release_unused, objs[usable:])
            if usable < len(chunks):
                report.failed_start = chunks[usable][1]
            if usable:
                _copy(io, chunks[:usable], objs[:usable], report)
    except BaseException:
        _drain(futures[index + 1:], io)
        raise
    finally:
        report.total_s = time.perf_counter() - started
    return report


def _wait_for(future: Future, n_chunks: int, location: str, report: LoadReport) -> list[Any | None]:
    """The group's chunks, or all None when its read raised (LMCache logs and recomputes in that case too)."""
    waited = time.perf_counter()
    try:
        objs = list(future.result())
    except Exception as exc:  # noqa: BLE001 - a failed read means "recompute from here", as in LMCache
        logger.warning("kvdemo pipeline: reading %d chunks from %s failed (%s: %s); recomputing from there",
                       n_chunks, location, type(exc).__name__, exc)
        objs = []
    finally:
        report.wait_s += time.perf_counter() - waited
    return (objs + [None] * n_chunks)[:n_chunks]


def _readable_prefix(objs: Sequence[Any | None]) -> int:
    for i, obj in enumerate(objs):
        if obj is None:
            return i
    return len(objs)


def _copy(io: ChunkIO, chunks: list[Chunk], objs: list[Any], report: LoadReport) -> None:
    """Copy one group and release it right after (to_gpu returns when the copy is complete)."""
    copying = time.perf_counter()
    try:
        io.to_gpu(objs, [start for _, start, _ in chunks], [end for _, _, end in chunks])
    finally:
        report.copy_s += time.perf_counter() - copying
        sizes = [io.size(obj) for obj in objs]
        _release_all(io.release_copied, objs)
    report.loaded += chunks
    report.bytes_loaded += sum(sizes)


def _release_all(release: Any, objs: Sequence[Any | None]) -> None:
    for obj in objs:
        if obj is not None:
            release(obj)


def _drain(futures: Sequence[Future], io: ChunkIO) -> None:
    """After a failed copy: cancel reads not started yet, release what the others read."""
    for future in futures:
        if future.cancel():
            continue
        if future.exception() is None:  # a read that raised left nothing to release
            _release_all(io.release_unused, future.result())
