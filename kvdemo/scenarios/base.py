"""The Scenario interface: what the runtime, the bench, config, main and the UI ask a scenario instead of
comparing its name.

One instance per scenario (``SCENARIO`` in scenarios/blend.py and scenarios/share.py), found by name with
``kvdemo.scenarios.get_scenario``. The runtime holds its scenario as ``runtime.scenario``.

The import graph stays one-way (ui → runtime → scenarios → engines/config): this module names the runtime
and Gradio for type checkers only, and a scenario reaches its page builder and its bench cases through
methods that import them when called.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import gradio as gr

    from ..config import Settings
    from ..engines import EngineSpec
    from ..kvstore import KvStore
    from ..runtime import EngineHandle, Runtime


@dataclass(frozen=True)
class PrecomputePlan:
    """What the runtime sends before the first question (in the background while the page is up)."""

    what: str  # the word of its progress lines: "precompute" or "preheat"
    requests: list[tuple[EngineHandle, list[int], bool]]  # (engine, prompt ids, warm-up only), in order
    cached_sys_prompt: tuple[int, ...] | None = None  # [BOS] + system prompt ids it stores on the LMCache engine


def _no_fields(runtime: Runtime) -> dict:
    return {}


@dataclass(frozen=True)
class BenchCases:
    """A scenario's TTFT benchmark protocol; kvdemo.bench runs it for each context size and repeat."""

    repeat: Callable[[Runtime, int, int, str], Awaitable[dict]]  # (runtime, context, decode tokens, tag) → repeat
    summarize: Callable[[int, list[dict]], dict]  # (context target, repeats) → one case of the result
    ttft_keys: tuple[str, ...]  # of a repeat, printed after each one
    requests: str  # how the requests are sent (after "one at a time; " in the result file)
    case_line: Callable[[dict], str]  # one case of the result, for the terminal
    plot: Callable[[dict, Path, Any], None]  # (result, png, matplotlib.pyplot): the result's figure
    extra_fields: Callable[[Runtime], dict] = field(default=_no_fields)  # more result fields, after the evidence
    traceable: bool = False  # --trace-contexts can trace the LMCache engine's blend


class Scenario(ABC):
    """One way of running the demo: which engines, what is precomputed, what is stored, the page, the bench."""

    name: ClassVar[str]
    n_engines: ClassVar[int]  # engines (and --engine-ports / --attach URLs) it needs, LMCache engines first
    uses_kv_store: ClassVar[bool] = False  # its LMCache engines share the runtime's KV store (prepared at start)

    @abstractmethod
    def engine_specs(self, settings: Settings, gpus: list[int], kv_store: KvStore) -> list[EngineSpec]:
        """The engines to run (or attach to) on these GPUs, LMCache engines first."""

    @abstractmethod
    def precompute_plan(self, runtime: Runtime) -> PrecomputePlan:
        """The requests to send once the engines are healthy, before the first question."""

    @abstractmethod
    def skip_save(self, handle: EngineHandle) -> bool:
        """Whether a question sent to this engine asks LMCache not to store its KV (lmcache.skip_save)."""

    @abstractmethod
    def restart_redoes_precompute(self, handle: EngineHandle) -> bool:
        """Whether a restart of this engine lost what the precompute plan stored, so it runs again."""

    @abstractmethod
    def build_page(self, runtime: Runtime) -> gr.Blocks:
        """The scenario's Gradio page (built once per process; per-session data lives in its gr.State)."""

    @abstractmethod
    def bench_cases(self) -> BenchCases:
        """The protocol ``python -m kvdemo.bench --scenario NAME`` measures."""
