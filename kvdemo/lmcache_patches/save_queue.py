"""The host side of the plugin's asynchronous store (fix ``async_save``): copies already enqueued on the GPU,
their puts run by one worker thread, and the fence that vLLM's next steps wait on.

This module knows nothing of LMCache or torch: a :class:`SaveJob` carries its copy's completion event
(anything with ``synchronize()``), the put and the release, so the ordering, fence and shutdown rules are
tested on CPU with fakes (``tests/test_async_save.py``); :mod:`.async_save` enqueues the copies and builds
the jobs.

Contract: a job's ``put`` runs on the worker thread only after its ``done.synchronize()`` returned, puts run
in submission order, each job ends with exactly one of ``put`` (copy complete) or ``release`` (copy failed),
and the tensors in ``keep`` stay referenced until the copy is complete.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, Protocol

logger = logging.getLogger("kvdemo.vllm_plugin")


class Waitable(Protocol):
    def synchronize(self) -> None:
        """Block until the work it marks is complete (a CUDA event recorded after the copies)."""


@dataclass(eq=False)
class SaveJob:
    """One store call: its chunks' GPU→CPU copies are enqueued; ``done`` completes when they have landed."""

    req_id: str
    done: Waitable
    put: Callable[[], None]  # hands the copied chunks to LMCache's backends (runs on the worker thread)
    release: Callable[[], None]  # gives the chunks back unsaved (the copy failed)
    keep: tuple[Any, ...] = ()  # device tensors the copies read (the slot mapping): alive until they are done
    enqueued_at: float = field(default_factory=time.perf_counter)
    copied_at: float | None = None  # when the worker saw ``done`` complete


class SaveQueue:
    """Pending saves of one cache engine, by request id, and the thread that puts them."""

    def __init__(self, name: str = "kvdemo-kv-save", initializer: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, list[SaveJob]] = {}
        self._futures: set[Future] = set()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=initializer)
        self.closed = False

    def submit(self, job: SaveJob) -> None:
        """Hand over a job whose copies are enqueued; its put follows on the worker thread."""
        with self._lock:
            if self.closed:
                raise RuntimeError("kvdemo async_save: the save queue is closed")
            self._pending.setdefault(job.req_id, []).append(job)
            future = self._executor.submit(self._complete, job)
            self._futures.add(future)
        future.add_done_callback(self._forget_future)

    def pending_requests(self) -> set[str]:
        with self._lock:
            return set(self._pending)

    def fence(self, req_ids: Iterable[str] | None) -> int:
        """Block until the copies of these requests (None: of every request) are complete; returns how many
        jobs it waited for. Their puts may still be running: once copied, the GPU blocks are free to reuse."""
        with self._lock:
            names = list(self._pending) if req_ids is None else [r for r in req_ids if r in self._pending]
            jobs = [job for name in names for job in self._pending[name]]
        for job in jobs:
            job.done.synchronize()
        return len(jobs)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has been put or released; False if ``timeout`` ran out first."""
        with self._lock:
            futures = list(self._futures)
        _, not_done = wait_futures(futures, timeout=timeout)
        return not not_done

    def close(self, timeout: float | None = None) -> bool:
        """Drain, then stop the worker thread (idempotent); False if jobs still ran at ``timeout``."""
        drained = self.drain(timeout)
        with self._lock:
            self.closed = True
        self._executor.shutdown(wait=drained)
        return drained

    def _complete(self, job: SaveJob) -> None:
        try:
            try:
                job.done.synchronize()
            except BaseException as exc:  # noqa: BLE001 - a failed copy stores nothing, and says so
                logger.warning("kvdemo async_save: [req_id=%s] the copy off the GPU failed (%s: %s); "
                               "not stored", job.req_id, type(exc).__name__, exc)
                job.release()
                return
            job.copied_at = time.perf_counter()
            job.keep = ()
            try:
                job.put()
            except Exception as exc:  # noqa: BLE001 - a failed put loses this store only
                logger.warning("kvdemo async_save: [req_id=%s] storing the copied KV failed (%s: %s)",
                               job.req_id, type(exc).__name__, exc)
        finally:
            with self._lock:
                jobs = self._pending.get(job.req_id, [])
                if job in jobs:
                    jobs.remove(job)
                if not jobs:
                    self._pending.pop(job.req_id, None)

    def _forget_future(self, future: Future) -> None:
        with self._lock:
            self._futures.discard(future)
