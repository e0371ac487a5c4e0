"""The running demo: engines, their clients, the prompt builder and the precompute state.

One Runtime per app process. It holds only what is shared by nature (the engines and what their caches
hold); everything about one browser session lives in that session's gr.State.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from .config import Settings
from .engine_handle import EngineHandle
from .engines import EngineProcess, EngineSpec, Watchdog
from .errors import EngineError, UserFacingError
from .kvstore import KvStore
from .lmcache_config import LmcacheConfig
from .precompute import PrecomputeProgress, PrecomputeRequest, precompute
from .preflight import (
    check_blending_architecture,
    check_model,
    check_plugin_installed,
    check_port_free,
    choose_gpus,
    detect_gpus,
)
from .prompts import ChunkLibrary, PromptBuilder, load_tokenizer
from .scenarios import get_scenario
from .upload_budget import UploadLedger

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings, specs: list[EngineSpec] | None = None) -> None:
        """``specs``: run these engines instead of the scenario's (the quality benchmark's engine set)."""
        self.settings = settings
        self.scenario = get_scenario(settings.scenario)
        if len(settings.engine_ports) < self.scenario.n_engines:  # before anything starts or --dry-run prints
            raise UserFacingError(f"--engine-ports needs {self.scenario.n_engines} ports for the {settings.scenario} "
                                  "scenario (LMCache engines first).")
        self._specs = specs
        self.library = ChunkLibrary.load(settings.data_dir)
        self.kv_store = KvStore.from_settings(settings.kv_store_dir, settings.kv_store)
        self.engines: list[EngineHandle] = []
        self.watchdog: Watchdog | None = None
        self.progress = PrecomputeProgress()
        self.builder: PromptBuilder | None = None
        self._cached_sys_prompts: set[tuple[int, ...]] = set()
        self._lock = threading.Lock()
        self._restarting: set[str] = set()
        self._precompute_thread: threading.Thread | None = None
        self._upload_ledger: UploadLedger | None = None

    # ----- start-up -------------------------------------------------------------------------------
    @property
    def n_engines(self) -> int:
        return self.scenario.n_engines

    def plan(self) -> list[EngineSpec]:
        """Engine specs without touching the machine beyond listing GPUs (what --dry-run prints)."""
        s = self.settings
        if self._specs is not None:
            return self._specs
        if s.simulate or s.attach:
            gpus: list[int] = []
        elif s.dry_run and (s.gpus or not detect_gpus()):
            gpus = s.gpus or [0]  # a plan for another machine: --dry-run --gpus 0,1 needs no GPU here
        else:
            gpus = choose_gpus(s, self.n_engines)
        if s.attach and len(s.attach) != self.n_engines:
            raise UserFacingError(f"--attach takes {self.n_engines} URLs for the {s.scenario} scenario "
                                  "(LMCache engines first).")
        return self.scenario.engine_specs(s, gpus, self.kv_store)

    def start(self) -> None:
        """Preflight, start engines in parallel, wait for health (fail fast), load the tokenizer."""
        s = self.settings
        specs = self.plan()
        self.lmcache_config = LmcacheConfig.load(s.lmcache_config_path)
        check_model(s)
        if not s.simulate and not s.attach and any(spec.lmcache for spec in specs):
            # vLLM loads kvdemo's plugin through its entry point; without it LMCache cannot blend, and
            # that would show only as an error in the engine's log, minutes after start.
            check_plugin_installed()
            if self.lmcache_config.blending:
                check_blending_architecture(s)
        if self.scenario.uses_kv_store and not s.attach:
            if s.clear_kv_store:
                print(f"kvdemo: cleared {self.kv_store.clear() / 2**20:.0f} MiB from the KV store", flush=True)
            self.kv_store.prepare(min_free_gib=0.1 if s.simulate else 4.0)
        if not s.attach:
            for spec in specs:
                check_port_free(spec.port, what=f"engine port ({spec.label})")
        check_port_free(s.port, s.server_name, what="UI port")
        self.builder = PromptBuilder(load_tokenizer(s.tokenizer_source, s.hf_token), self.library,
                                     separator=self.lmcache_config.separator,
                                     default_context_tokens=s.context_tokens)
        if not s.attach:
            self.watchdog = Watchdog()
        for spec in specs:
            proc = None if s.attach else EngineProcess(spec, s.log_dir, self.watchdog)
            self.engines.append(EngineHandle(spec, proc))
        for h in self.engines:
            if h.process:
                h.process.start()
        print(f"kvdemo: waiting for {len(self.engines)} engines (logs in {s.log_dir}/)…", flush=True)
        with ThreadPoolExecutor(len(self.engines)) as pool:
            try:
                results = list(pool.map(self._wait_ready, self.engines))
            except BaseException:  # Ctrl-C / SIGTERM while engines start: leaving this block would first wait
                self.stop()  # for every engine to become healthy (minutes for vLLM); stopped, the waits end at once
                raise
        for h, startup in zip(self.engines, results):
            h.startup_s = startup
            print(f"kvdemo: {h.spec.label} ready in {startup:.1f} s at {h.spec.url}", flush=True)

    def _wait_ready(self, h: EngineHandle, stop_all_on_failure: bool = True) -> float:
        t0 = time.monotonic()
        if h.process:
            try:
                h.process.wait_healthy(self.settings.health_timeout_s)
            except EngineError:
                if stop_all_on_failure:
                    self.stop()  # fail fast at start-up: do not leave the other engine starting for minutes
                raise
        h.model_name = _served_model(h.spec.url, h.spec.label)
        return time.monotonic() - t0

    # ----- precompute -----------------------------------------------------------------------------
    @property
    def lmcache_engine(self) -> EngineHandle:
        return next(h for h in self.engines if h.spec.lmcache)

    def precompute_prompts(self) -> list[list[int]]:
        """``[BOS] + sys`` and ``[BOS] + SEP + chunk`` for every shipped chunk: what the precompute stores."""
        assert self.builder is not None
        return self.builder.precompute_prompts(list(self.library.chunks))

    def precompute_in_background(self) -> threading.Thread:
        """`precompute_and_wait` in a background thread (the page shows its progress); returns the thread."""
        self._precompute_thread = threading.Thread(target=self.precompute_and_wait, name="precompute",
                                                   daemon=True)
        self._precompute_thread.start()
        return self._precompute_thread

    def precompute_and_wait(self) -> PrecomputeProgress:
        """Send the scenario's precompute plan (blend: store every chunk's KV in the LMCache engine, then warm
        each engine up; share: preheat every engine) from this thread, printing progress; returns it when done
        (a failure is its ``error``)."""
        plan = self.scenario.precompute_plan(self)
        self.progress.what = plan.what

        def report(p: PrecomputeProgress) -> None:
            step = "warm-up" if p.done > p.total - p.warm_ups else p.what
            print(f"kvdemo: {step} {p.done}/{p.total} ({p.seconds:.2f} s)", flush=True)

        async def go() -> None:
            clients = {h.spec.key: h.client() for h, _, _ in plan.requests}
            try:
                await precompute([PrecomputeRequest(clients[h.spec.key], ids, warm_up,
                                                    skip_save=warm_up and self.skip_save(h))
                                  for h, ids, warm_up in plan.requests], self.progress, report)
            finally:
                for c in clients.values():
                    await c.close()

        try:
            asyncio.run(go())
            if plan.cached_sys_prompt is not None:
                with self._lock:
                    self._cached_sys_prompts.add(plan.cached_sys_prompt)
        except UserFacingError as exc:
            self.progress.error = str(exc).splitlines()[0]
            print(f"kvdemo: {self.progress.what} failed: {exc}", flush=True)
        return self.progress

    async def ensure_sys_prompt_cached(self, sys_prompt: str) -> float | None:
        """An edited system prompt is a new first segment: cache it before asking, or nothing is reused.

        Returns the seconds it took, or None when it was already cached.
        """
        assert self.builder is not None
        ids = tuple(self.builder.bos_ids + self.builder.sys_ids(sys_prompt))
        with self._lock:
            if ids in self._cached_sys_prompts:
                return None
        client = self.lmcache_engine.client()
        try:
            _, stats = await client.complete(list(ids), max_tokens=1)
        finally:
            await client.close()
        with self._lock:
            self._cached_sys_prompts.add(ids)
        return stats.total_s

    @property
    def upload_ledger(self) -> UploadLedger:
        """Every session's uploaded chunks and their KV, kept within the upload budget (upload_budget.py):
        one per runtime, as all sessions share the 🚀 engine's LMCache CPU cache. Built on first use (it needs
        the tokenizer and the model's KV size)."""
        with self._lock:
            if self._upload_ledger is None:
                self._upload_ledger = UploadLedger.for_runtime(self)
            return self._upload_ledger

    async def store_uploaded_segments(self, requests: list[list[int]]):
        """Store each `[BOS] + SEP + chunk` request's KV on the 🚀 engine (uploaded chunks; skip_save False),
        one at a time; yields how many are done after each. Raises EngineError / UserFacingError."""
        client = self.lmcache_engine.client()
        try:
            for i, ids in enumerate(requests, 1):
                await client.complete(ids, max_tokens=1, skip_save=False)
                yield i
        finally:
            await client.close()

    def restart_engine(self, key: str) -> float:
        """Stop (if needed) and start one engine again; precompute again if the scenario says the restart lost
        what its precompute stored (blend: the LMCache engine's chunk caches).

        Returns seconds to healthy. Raises EngineError (with log tail) if it fails to come back.
        """
        h = next(x for x in self.engines if x.spec.key == key)
        if h.process is None:
            raise UserFacingError(f"{h.spec.label} is attached (--attach): restart it where it runs.")
        with self._lock:
            if key in self._restarting:
                raise UserFacingError(f"{h.spec.label} is already restarting.")
            self._restarting.add(key)
        try:
            h.process.stop()
            h.model_name = None
            h.process.start()
            h.startup_s = self._wait_ready(h, stop_all_on_failure=False)
            if self.scenario.restart_redoes_precompute(h):
                with self._lock:
                    self._cached_sys_prompts.clear()
                self.progress = PrecomputeProgress()
                self.precompute_and_wait()
            return h.startup_s
        finally:
            with self._lock:
                self._restarting.discard(key)

    def skip_save(self, handle: EngineHandle) -> bool:
        """Whether questions to this engine are sent with lmcache.skip_save: the scenario's policy (blend: yes
        for 🚀, blended questions are not worth storing; share: no, A stores what B then loads)."""
        return self.scenario.skip_save(handle)

    # ----- state for the UI -----------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        """The longest prompt + answer every engine accepts (engines sharing a GPU may be capped lower)."""
        specs = [h.spec for h in self.engines] or self.plan()
        return min(spec.effective_max_model_len for spec in specs)

    @property
    def shared_gpu(self) -> bool:
        slots = [h.spec.slot for h in self.engines]
        return any(s.shared for s in slots)

    @property
    def sequential(self) -> bool:
        """Fair mode: on a shared GPU two prefills compete, so answer one engine after the other."""
        f = self.settings.fairness
        return f == "sequential" or (f == "auto" and self.shared_gpu)

    def status_line(self) -> str:
        parts = [f"{h.spec.label}: {h.status()}" for h in self.engines]
        parts.append(self.progress.line())
        if self.settings.simulate:
            parts.append("SIMULATED engines")
        return " · ".join(parts)

    # ----- shutdown -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every engine we started (whole process trees), then the watchdog. Safe to call twice."""
        procs = [h.process for h in self.engines if h.process and h.process.proc]
        with ThreadPoolExecutor(max(1, len(procs))) as pool:
            list(pool.map(lambda p: p.stop(), procs))
        if self.watchdog:
            self.watchdog.close()
            self.watchdog = None


def _served_model(url: str, label: str) -> str:
    try:
        r = httpx.get(f"{url}/v1/models", timeout=10)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise EngineError(f"{label} at {url} is up but /v1/models does not answer ({type(exc).__name__}); "
                          "is it an OpenAI-compatible server?", label) from exc
