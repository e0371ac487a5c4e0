"""Optional profiling (``KVDEMO_PROFILE=1``): one ``kvdemo-profile: ...`` line per engine step with LMCache work.

CUDA-synchronized per-phase times: adds synchronizations, so use it for a breakdown, never for TTFT numbers.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from . import quiet
from .hooks import logger, when_imported, wrap_method
from .targets import MOD_ADAPTER, MOD_BLENDER, MOD_CACHE_ENGINE, MOD_MODEL_BASE, MOD_WORKER

# Phases in log order. Times are inclusive and nested: step > load > blend > {retrieve, compute};
# step > save > store; wait_save may also run store steps. lookup is the scheduler-side hit lookup
# (CPU only, not synchronized).
PROFILE_PHASES: tuple[str, ...] = ("step", "lookup", "load", "blend", "retrieve", "compute", "save", "store",
                                   "wait_save")
# A step is logged only when one of these ran in it (decode steps stay silent).
_PROFILE_TRIGGERS = frozenset({"lookup", "blend", "retrieve", "store"})


class Profiler:
    """Accumulates CUDA-synchronized phase times for one engine step and logs them as one line."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self._sync: Callable[[], None] | None = None
        self._unpin_mark = 0

    def sync(self) -> None:
        if self._sync is None:
            self._sync = _cuda_synchronizer()
        self._sync()

    @contextmanager
    def phase(self, name: str, synchronize: bool = True) -> Iterator[None]:
        if synchronize:
            self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if synchronize:
                self.sync()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3
            self.calls[name] = self.calls.get(name, 0) + 1

    def count(self, name: str, value: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + value

    def line(self) -> str | None:
        if not _PROFILE_TRIGGERS.intersection(self.calls):
            return None
        parts = [f"{name}={self.ms[name]:.1f}ms" for name in PROFILE_PHASES if name in self.ms]
        parts += [f"{name}={value}" for name, value in sorted(self.counts.items())]
        unpin = quiet.current_filter()
        if unpin is not None:
            parts.append(f"double_unpin_suppressed={unpin.suppressed - self._unpin_mark}")
        return "kvdemo-profile: " + " ".join(parts)

    def flush(self) -> None:
        text = self.line()
        if text is not None:
            logger.info("%s", text)
        self.ms.clear()
        self.calls.clear()
        self.counts.clear()
        unpin = quiet.current_filter()
        if unpin is not None:
            self._unpin_mark = unpin.suppressed


def _cuda_synchronizer() -> Callable[[], None]:
    try:
        import torch
    except ImportError:
        return lambda: None
    if not torch.cuda.is_available():
        return lambda: None
    return torch.cuda.synchronize


PROFILER = Profiler()


def _timed(original: Callable[..., Any], phase: str, *, synchronize: bool = True,
           flush: bool = False, count_tokens: str | None = None) -> Callable[..., Any]:
    """Wrap a method so its calls are timed as ``phase`` (and the step is logged when ``flush``)."""

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if count_tokens is not None and args:
            try:
                PROFILER.count(count_tokens, len(args[0]))
            except TypeError:
                pass
        try:
            with PROFILER.phase(phase, synchronize):
                return original(self, *args, **kwargs)
        finally:
            if flush:
                PROFILER.flush()

    return wrapper


def _timed_generator(original: Callable[..., Any], phase: str) -> Callable[..., Any]:
    """Wrap a generator method so the time spent in each of its steps is added to ``phase``."""

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        gen = original(self, *args, **kwargs)
        sent: Any = None
        try:
            while True:
                with PROFILER.phase(phase):
                    try:
                        item = gen.send(sent)
                    except StopIteration as stop:
                        return stop.value
                sent = yield item
        finally:
            gen.close()

    return wrapper


def _profile_methods(module: ModuleType, cls_name: str, plan: dict[str, Callable[[Any], Any]]) -> None:
    done = [method for method, make in plan.items()
            if wrap_method(module, f"{cls_name}.{method}", "profile", make)]
    if done:
        logger.info("kvdemo plugin: applied profile (%s.%s: %s)", module.__name__, cls_name, ", ".join(done))


def arm_profiling() -> None:
    """Time the phases of a blended request (vllm 0.22.0 / lmcache 0.5.3 function names)."""
    when_imported(MOD_WORKER, functools.partial(_profile_methods, cls_name="Worker", plan={
        "execute_model": lambda f: _timed(f, "step", flush=True),
    }))
    when_imported(MOD_ADAPTER, functools.partial(_profile_methods, cls_name="LMCacheConnectorV1Impl", plan={
        "get_num_new_matched_tokens": lambda f: _timed(f, "lookup", synchronize=False),
        "start_load_kv": lambda f: _timed(f, "load"),
        "save_kv_layer": lambda f: _timed(f, "save"),
        "wait_for_save": lambda f: _timed(f, "wait_save"),
    }))
    when_imported(MOD_BLENDER, functools.partial(_profile_methods, cls_name="LMCBlender", plan={
        "blend": lambda f: _timed(f, "blend", count_tokens="blend_tokens"),
    }))
    when_imported(MOD_CACHE_ENGINE, functools.partial(_profile_methods, cls_name="LMCacheEngine", plan={
        "retrieve_layer": lambda f: _timed_generator(f, "retrieve"),
        "store_layer": lambda f: _timed_generator(f, "store"),
    }))
    when_imported(MOD_MODEL_BASE, functools.partial(_profile_methods, cls_name="LMCBaseModel", plan={
        "compute_layer": lambda f: _timed_generator(f, "compute"),
    }))
