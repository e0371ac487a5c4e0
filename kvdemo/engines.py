"""Engine processes: what command line and environment each engine gets, and its whole life cycle.

Each engine runs in its own process group with its own log file, so stopping it means signalling one
group (vLLM forks an engine-core and workers under it). A separate watchdog process holds a pipe to the
app: when the app dies for any reason, SIGKILL included, the pipe closes and the watchdog kills every
engine group it was told about — no GPU process outlives the app.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from .config import GpuSlot
from .errors import EngineError

log = logging.getLogger(__name__)

LMCACHE_KV_TRANSFER = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
# Env every real engine gets: no 140 s flashinfer sampler JIT at start, stable hashes, no usage stats.
BASE_ENGINE_ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "PYTHONHASHSEED": "0", "VLLM_NO_USAGE_STATS": "1"}
# Switches on kvdemo.vllm_plugin (its ENV_ENABLE) in LMCache engines only: the plain engine stays stock vLLM.
PLUGIN_ENV = "KVDEMO_LMCACHE_PLUGIN"
TELEMETRY_ENV = "KVDEMO_TELEMETRY_DIR"  # read by kvdemo.lmcache_patches.telemetry and kvdemo.simulate


# The LMCache engine's settings, defined once for both ways of running it: `vllm serve` flags (the app,
# EngineSpec) and vllm.LLM keyword arguments (kvdemo.offline), so the two cannot drift apart.


def lmcache_engine_kwargs() -> dict[str, Any]:
    """What LMCache blending needs of a vLLM engine, as ``EngineArgs`` fields (a fresh copy each call).

    The LMCache connector for both storing and loading; no vLLM prefix caching (vLLM's own cache would
    answer before LMCache is asked); FlashAttention (LMCache's blender supports only that backend).
    """
    return {"kv_transfer_config": dict(LMCACHE_KV_TRANSFER), "enable_prefix_caching": False,
            "attention_backend": "FLASH_ATTN"}


def lmcache_engine_flags() -> list[str]:
    """:func:`lmcache_engine_kwargs` as ``vllm serve`` flags (vLLM's own spelling of each field)."""
    flags: list[str] = []
    for name, value in lmcache_engine_kwargs().items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value, separators=(",", ":"))]
        else:
            flags += [flag, str(value)]
    return flags


def real_engine_env(*, lmcache: bool, lmcache_config: Path | str | None = None,
                    local_model: bool = False) -> dict[str, str]:
    """What a real (not simulated) vLLM engine adds to its environment; the GPU choice is the caller's.

    :data:`BASE_ENGINE_ENV`; ``HF_HUB_OFFLINE=1`` for a local model directory (no Hub lookups); for an
    LMCache engine also the plugin switch and LMCache's config file (``LMCACHE_CONFIG_FILE``).
    """
    env = dict(BASE_ENGINE_ENV)
    if local_model:
        env["HF_HUB_OFFLINE"] = "1"
    if lmcache:
        env[PLUGIN_ENV] = "1"
        if lmcache_config:
            env["LMCACHE_CONFIG_FILE"] = str(lmcache_config)
    return env


@dataclass
class EngineSpec:
    """One engine to run: enough to build its exact argv and env, or to describe an attached one."""

    key: str  # stable id used in code and logs, e.g. "lmcache", "plain", "lmcache_b"
    label: str  # what the UI shows, e.g. "🚀 vLLM + LMCache"
    lmcache: bool
    port: int
    slot: GpuSlot
    model: str
    max_model_len: int
    simulate: bool = False
    lmcache_config: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    gpu_memory_utilization: float | None = None
    kv_cache_gib: float | None = None
    local_model: bool = False
    sim_speed: float = 1.0
    url_override: str | None = None  # --attach: someone else runs it
    sim_store_dir: Path | None = None  # simulated LMCache engines: share stored KV through this directory
    sim_store_url: str | None = None  # ... or through this Redis server

    @property
    def url(self) -> str:
        return self.url_override or f"http://127.0.0.1:{self.port}"

    @property
    def effective_kv_cache_gib(self) -> float | None:
        return self.kv_cache_gib if self.kv_cache_gib is not None else default_kv_cache_gib(self.slot)

    @property
    def effective_max_model_len(self) -> int:
        """vLLM refuses to start if one max-length request does not fit its KV cache (128 KiB/token, 7B)."""
        kv_gib = self.effective_kv_cache_gib
        if kv_gib is None or self.simulate:
            return self.max_model_len
        return min(self.max_model_len, int(kv_gib * 2**30 / (128 * 1024)) // 1024 * 1024 - 1024)

    def argv(self) -> list[str]:
        if self.simulate:
            cmd = [sys.executable, "-m", "kvdemo.simulate", "--port", str(self.port),
                   "--mode", "lmcache" if self.lmcache else "plain", "--model", self.model,
                   "--max-model-len", str(self.max_model_len), "--speed", str(self.sim_speed)]
            if self.lmcache_config:
                cmd += ["--lmcache-config", str(self.lmcache_config)]
            if self.sim_store_dir:
                cmd += ["--store-dir", str(self.sim_store_dir)]
            if self.sim_store_url:
                cmd += ["--store-url", self.sim_store_url]
            return cmd
        # `python -m vllm.entrypoints.cli.main` is what the `vllm` console script runs; it works even
        # when the script is not on PATH (e.g. a --target install).
        cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", self.model,
               "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", str(self.effective_max_model_len),
               # per-request usage.prompt_tokens_details.cached_tokens: vLLM's prefix-cache hits plus tokens an
               # external KV connector (LMCache) loaded: each answer's own reuse, not a counter delta
               "--enable-prompt-tokens-details"]
        fraction = self.gpu_memory_utilization or self.slot.memory_fraction
        cmd += ["--gpu-memory-utilization", f"{fraction:.2f}"]
        kv_gib = self.effective_kv_cache_gib
        if kv_gib:
            # Skips vLLM's memory profiling, so engines sharing one GPU can start at the same time.
            cmd += ["--kv-cache-memory-bytes", str(int(kv_gib * 2**30))]
        if self.lmcache:
            cmd += lmcache_engine_flags()
        else:
            cmd += ["--enable-prefix-caching"]
        return cmd + list(self.extra_args)

    def env(self) -> dict[str, str]:
        """Only what this engine adds to the app's environment (the full env is os.environ + this)."""
        env = dict(self.extra_env)
        if self.simulate:
            return env
        env.update(real_engine_env(lmcache=self.lmcache, lmcache_config=self.lmcache_config,
                                   local_model=self.local_model))
        if self.slot.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.slot.gpu)
        return env

    def describe(self) -> str:
        """The exact command line and env additions, as --dry-run prints them."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env().items()))
        gpu = "no GPU" if self.slot.gpu is None else (
            f"GPU {self.slot.gpu}" + (f" (shared by {self.slot.engines_on_gpu} engines)" if self.slot.shared else ""))
        return f"# {self.label} [{self.key}] on {gpu}, port {self.port}\n{env} {shlex.join(self.argv())}"


def default_kv_cache_gib(slot: GpuSlot) -> float | None:
    """KV cache per engine when engines share a GPU (sized for a 7B model on an 80 GB GPU).

    Two engines: 12 GiB each (~98K tokens of Mistral-7B). Three or four: 3 GiB each (~24K tokens), so
    max_model_len is capped to what fits (see EngineSpec.effective_max_model_len).
    """
    if not slot.shared:
        return None
    return 12.0 if slot.engines_on_gpu <= 2 else 3.0


class EngineProcess:
    """A running engine: start in its own process group, wait for /health, stop the whole tree."""

    def __init__(self, spec: EngineSpec, log_dir: Path, watchdog: Watchdog | None = None) -> None:
        self.spec = spec
        self.log_path = log_dir / f"{spec.key}.log"
        # LMCache engines (real: the plugin, simulated: the simulator) write one JSON line per request they
        # load KV for here; the app reads each answer's line (kvdemo.telemetry).
        self.telemetry_dir: Path | None = log_dir / "telemetry" / spec.key if spec.lmcache else None
        self.proc: subprocess.Popen | None = None
        self._watchdog = watchdog

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps writing after we return
        logf.write(f"\n=== kvdemo starting {self.spec.key}: {shlex.join(self.spec.argv())}\n".encode())
        logf.flush()
        env = {**os.environ, **self.spec.env(), "PYTHONUNBUFFERED": "1"}
        if self.telemetry_dir is not None:
            env[TELEMETRY_ENV] = str(self.telemetry_dir)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                          os.environ.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(self.spec.argv(), stdout=logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        logf.close()
        if self._watchdog:
            self._watchdog.guard(self.proc.pid)
        log.info("started %s (pid %d), log: %s", self.spec.key, self.proc.pid, self.log_path)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(deque(f, maxlen=lines)).rstrip()
        except OSError:
            return "(no log)"

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.spec.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout_s: float, poll_s: float = 0.5) -> float:
        """Block until /health answers 200; fail fast (with the log tail) if the process exits."""
        start = time.monotonic()
        deadline = start + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise EngineError(f"{self.spec.label} exited with code {self.proc.returncode} while starting "
                                  f"(full log: {self.log_path}).", self.spec.key, self.log_tail())
            if self.healthy():
                return time.monotonic() - start
            time.sleep(poll_s)
        raise EngineError(f"{self.spec.label} did not become healthy within {timeout_s:.0f} s "
                          f"(raise --health-timeout, or read {self.log_path}).", self.spec.key, self.log_tail())

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the engine's process group, then SIGKILL whatever of its tree is left."""
        if self.proc is None:
            return
        kill_tree(self.proc.pid, grace_s)
        if self._watchdog:
            self._watchdog.release(self.proc.pid)
        try:
            self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not exit", self.spec.key, self.proc.pid)


def kill_tree(pid: int, grace_s: float = 10.0) -> None:
    """Stop a process, its process group and every descendant (vLLM workers may start their own groups)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    _signal_group(pid, signal.SIGTERM)
    for p in procs:
        _quiet(p.terminate)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    _signal_group(pid, signal.SIGKILL)
    for p in alive:
        _quiet(p.kill)
    psutil.wait_procs(alive, timeout=2)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _quiet(fn) -> None:
    try:
        fn()
    except psutil.Error:
        pass


class Watchdog:
    """A separate process that kills engine groups when the app dies, however it dies.

    The app writes each engine's pid to the watchdog's stdin. The watchdog blocks reading; EOF means the
    app is gone (the kernel closes the pipe even on SIGKILL), and it then kills every group it knows.
    """

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "kvdemo.watchdog"], stdin=subprocess.PIPE,
                                     start_new_session=True, text=True,
                                     env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})

    def guard(self, pid: int) -> None:
        self._send(str(pid))

    def release(self, pid: int) -> None:
        """The app stopped this engine itself: forget it, so a reused pid is never signalled."""
        self._send(f"-{pid}")

    def _send(self, line: str) -> None:
        if self.proc.stdin is None or self.proc.stdin.closed:
            return  # closed by close(): the app is shutting down and stops its engines itself
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            log.warning("watchdog is gone; engines will only be stopped by the app itself")

    def close(self) -> None:
        """Normal shutdown: engines are already stopped; closing the pipe lets the watchdog exit."""
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
