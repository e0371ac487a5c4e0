"""The Scenario interface: what the runtime, main and the UI ask a scenario instead of comparing its name.

One instance per scenario (``SCENARIO`` in scenarios/blend.py and scenarios/share.py), found by name with
``kvdemo.scenarios.get_scenario``. The runtime holds its scenario as ``runtime.scenario``.

The import graph stays one-way (ui, bench → runtime → scenarios → engines/config): a scenario sees the runtime
only as kvdemo.runtime_view's `RuntimeView` and plans its own precompute prompts from it; it knows neither its
page (the UI's kvdemo/ui/pages.py picks that by scenario name) nor its bench protocol (kvdemo/bench/cases.py,
share_cases.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from ..config import Settings
from ..engine_handle import EngineHandle
from ..engines import EngineSpec
from ..kvstore import KvStore
from ..runtime_view import RuntimeView


@dataclass(frozen=True)
class PrecomputePlan:
    """What the runtime sends before the first question (in the background while the page is up)."""

    what: str  # the word of its progress lines: "precompute" or "preheat"
    requests: list[tuple[EngineHandle, list[int], bool]]  # (engine, prompt ids, warm-up only), in order
    cached_sys_prompt: tuple[int, ...] | None = None  # [BOS] + system prompt ids it stores on the LMCache engine


class Scenario(ABC):
    """One way of running the demo: which engines, what is precomputed, what is stored."""

    name: ClassVar[str]
    n_engines: ClassVar[int]  # engines (and --engine-ports / --attach URLs) it needs, LMCache engines first
    uses_kv_store: ClassVar[bool] = False  # its LMCache engines share the runtime's KV store (prepared at start)

    @abstractmethod
    def engine_specs(self, settings: Settings, gpus: list[int], kv_store: KvStore) -> list[EngineSpec]:
        """The engines to run (or attach to) on these GPUs, LMCache engines first."""

    @abstractmethod
    def precompute_plan(self, runtime: RuntimeView) -> PrecomputePlan:
        """The requests to send once the engines are healthy, before the first question."""

    @abstractmethod
    def skip_save(self, handle: EngineHandle) -> bool:
        """Whether a question sent to this engine asks LMCache not to store its KV (lmcache.skip_save)."""

    @abstractmethod
    def restart_redoes_precompute(self, handle: EngineHandle) -> bool:
        """Whether a restart of this engine lost what the precompute plan stored, so it runs again."""
