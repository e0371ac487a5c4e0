"""All configuration in one place: the Settings dataclass, its CLI flags, env overrides, and the GPU plan.

Every flag can also be set by an environment variable `KVDEMO_<FLAG_NAME>` (e.g. `KVDEMO_MODEL`), which is
how a Hugging Face Space or a container sets them without editing a command line. On a Space (`SPACE_ID`
set) the UI binds 0.0.0.0:7860 as Spaces expects.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserFacingError
from .prompts import DEFAULT_CONTEXT_TOKENS

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "mistralai/Mistral-7B-Instruct-v0.2"
SIM_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "sim_tokenizer"
FAIRNESS_MODES = ("auto", "sequential", "concurrent")
# The demo's scenarios, one module each in kvdemo/scenarios/ (which builds on this module, never the reverse).
SCENARIO_NAMES = ("blend", "share")
# Fraction of a GPU's memory that all engines on it may take together (vLLM's own default is 0.9).
GPU_MEMORY_BUDGET = 0.9


@dataclass
class Settings:
    """What the user asked for; built from flags, env and defaults by `parse_settings`."""

    scenario: str = "blend"
    model: str = DEFAULT_MODEL
    simulate: bool = False
    gpus: list[int] | None = None  # None: use every GPU nvidia-smi lists
    port: int = 7860
    engine_ports: list[int] = field(default_factory=lambda: [8000, 8001, 8002, 8003])
    max_model_len: int = 32768
    context_tokens: int = DEFAULT_CONTEXT_TOKENS  # the page's default chunks (max_model_len caps it)
    gpu_memory_utilization: float | None = None  # None: split GPU_MEMORY_BUDGET between engines on a GPU
    kv_cache_gib: float | None = None  # None: 12 GiB when engines share a GPU (skips vLLM's profiling)
    data_dir: Path = REPO_ROOT / "data"
    lmcache_config: Path | None = None  # None: lmcache_configs/<scenario>.yaml
    share: bool = False
    server_name: str = "127.0.0.1"
    auth: tuple[str, str] | None = None
    attach: list[str] | None = None
    dry_run: bool = False
    log_dir: Path = REPO_ROOT / "logs"
    engine_args: list[str] = field(default_factory=list)
    fairness: str = "auto"
    health_timeout_s: float = 900.0
    no_ui: bool = False
    ask: str | None = None
    hf_token: str | None = None
    sim_speed: float = 1.0  # simulated engines only: >1 makes every simulated delay shorter
    kv_store_dir: Path = Path(tempfile.gettempdir()) / "kvdemo-kv-store"  # share scenario: shared directory
    kv_store: str | None = None  # share scenario: redis://host:port instead of the directory
    clear_kv_store: bool = False
    upload_budget_gib: float | None = None  # None: CPU cache − shipped chunks − margin (upload_budget.py)

    @property
    def lmcache_config_path(self) -> Path:
        return self.lmcache_config or REPO_ROOT / "lmcache_configs" / f"{self.scenario}.yaml"

    @property
    def is_local_model(self) -> bool:
        """A path-like model is a local directory (no Hub access, no token)."""
        return self.model.startswith((".", "/", "~")) or Path(self.model).expanduser().exists()

    @property
    def tokenizer_source(self) -> str:
        """Simulated engines with the default (Hub) model use the bundled tokenizer: no download needed."""
        if self.simulate and self.model == DEFAULT_MODEL:
            return str(SIM_TOKENIZER_DIR)
        return str(Path(self.model).expanduser()) if self.is_local_model else self.model


@dataclass(frozen=True)
class GpuSlot:
    """Where one engine runs: which GPU, and how much of it (engines sharing a GPU split its memory)."""

    gpu: int | None  # None: no GPU (simulated engine)
    memory_fraction: float
    engines_on_gpu: int

    @property
    def shared(self) -> bool:
        return self.engines_on_gpu > 1


def plan_gpus(n_engines: int, gpus: list[int]) -> list[GpuSlot]:
    """Spread engines round-robin over GPUs; engines on one GPU split its memory budget evenly.

    With 2 GPUs and 2 engines each engine gets its own GPU (the fair layout the original demos use);
    with one GPU both share it, each with a bit under half of the memory.
    """
    if not gpus:
        return [GpuSlot(None, 0.0, 1) for _ in range(n_engines)]
    placement = [gpus[i % len(gpus)] for i in range(n_engines)]
    slots = []
    for gpu in placement:
        count = placement.count(gpu)
        fraction = int(GPU_MEMORY_BUDGET / count * 100) / 100  # round down: never over-commit
        slots.append(GpuSlot(gpu, fraction, count))
    return slots


def sharing_warning(s: Settings) -> str | None:
    """Public links and 0.0.0.0 expose engines that cost GPU time: warn when no login is required."""
    if (s.share or s.server_name == "0.0.0.0") and not s.auth:
        where = "a public Gradio link (--share)" if s.share else f"all interfaces ({s.server_name})"
        return f"the UI is open to anyone via {where} without a login; add --auth user:password."
    return None


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"KVDEMO_{name.upper()}", default)


def _env_bool(name: str) -> bool:
    return (_env(name) or "").lower() in ("1", "true", "yes", "on")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("--auth takes user:password")
    return user, password


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="python app.py",
        description="Side-by-side demo of LMCache KV-cache reuse vs plain vLLM. "
        "Every flag can also be set as env KVDEMO_<FLAG> (e.g. KVDEMO_MODEL).",
    )
    p.add_argument("--scenario", choices=SCENARIO_NAMES, default=_env("scenario", d.scenario),
                   help="blend: LMCache vs plain vLLM on reordered chunks; share: a second LMCache engine reuses the KV "
                   "the first one stored")
    p.add_argument("--model", default=_env("model", d.model), help="Hub model id or local model directory")
    p.add_argument("--simulate", action="store_true", default=_env_bool("simulate"),
                   help="no GPU needed: simulated engines, every number labelled SIMULATED")
    p.add_argument("--gpus", type=_int_list, default=_env("gpus"),
                   help="GPU indices to use, e.g. 0,1 (default: all that nvidia-smi lists)")
    p.add_argument("--port", type=int, default=_env("port", str(d.port)), help="UI port")
    p.add_argument("--engine-ports", type=_int_list, default=_env("engine_ports", "8000,8001,8002,8003"),
                   help="ports of the engines, in order (LMCache engine first)")
    p.add_argument("--max-model-len", type=int, default=_env("max_model_len", str(d.max_model_len)))
    p.add_argument("--context-tokens", type=int, default=_env("context_tokens", str(d.context_tokens)),
                   help="the page's default chunks: library order until the context reaches N tokens "
                        "(within --max-model-len; blending pays on long contexts)")
    p.add_argument("--gpu-memory-utilization", type=float, default=_env("gpu_memory_utilization"),
                   help="per engine (default: 0.9 split between the engines on a GPU)")
    p.add_argument("--kv-cache-gib", type=float, default=_env("kv_cache_gib"),
                   help="KV cache size per engine; default 12 when engines share a GPU")
    p.add_argument("--data-dir", type=Path, default=Path(_env("data_dir", str(d.data_dir))))
    p.add_argument("--lmcache-config", type=Path, default=_env("lmcache_config"),
                   help="LMCache yaml (default: lmcache_configs/<scenario>.yaml)")
    p.add_argument("--share", action="store_true", default=_env_bool("share"), help="Gradio public link")
    p.add_argument("--server-name", default=_env("server_name"), help="UI bind address (default 127.0.0.1)")
    p.add_argument("--auth", type=_auth, default=_env("auth"), help="user:password required to open the UI")
    p.add_argument("--attach", default=_env("attach"),
                   help="use running engines instead of starting them: URL,URL (LMCache engine first)")
    p.add_argument("--dry-run", action="store_true", help="print each engine's command and env; start nothing")
    p.add_argument("--log-dir", type=Path, default=Path(_env("log_dir", str(d.log_dir))))
    p.add_argument("--engine-args", default=_env("engine_args", ""),
                   help='extra vllm serve arguments for every engine, e.g. "--load-format dummy"')
    p.add_argument("--fairness", choices=FAIRNESS_MODES, default=_env("fairness", d.fairness),
                   help="auto: one engine after the other when they share a GPU, at once otherwise")
    p.add_argument("--health-timeout", type=float, default=_env("health_timeout", "900"),
                   help="seconds to wait for engines to become healthy")
    p.add_argument("--no-ui", action="store_true", help="headless: start, precompute, answer --ask, exit")
    p.add_argument("--ask", default=_env("ask"), help="question to answer in headless mode")
    p.add_argument("--kv-store-dir", type=Path, default=Path(_env("kv_store_dir", str(d.kv_store_dir))),
                   help="share scenario: directory both LMCache engines store KV in (LMCache fs connector)")
    p.add_argument("--kv-store", default=_env("kv_store"),
                   help="share scenario: share KV through a Redis server instead: redis://host:port (LMCache's "
                   "redis-py connector) or resp://host:port (its native batched RESP client, database 0)")
    p.add_argument("--clear-kv-store", action="store_true", help="share scenario: empty the KV store at start")
    p.add_argument("--upload-budget-gib", type=float, default=_env("upload_budget_gib"),
                   help="GiB of 🚀's LMCache CPU cache that visitors' uploads may take together, oldest evicted "
                   "first (default: max_local_cpu_size minus the shipped chunks' KV minus a margin)")
    p.add_argument("--sim-speed", type=float, default=_env("sim_speed", "1"),
                   help=argparse.SUPPRESS)
    return p


# Flags whose value is itself a command line: `--engine-args "--enforce-eager"` is one value, not a flag.
PASS_THROUGH_FLAGS: tuple[str, ...] = ("--engine-args",)


def with_pass_through_values(argv: list[str] | None) -> list[str]:
    """``--engine-args --enforce-eager`` → ``--engine-args=--enforce-eager``.

    WHY: argparse takes a value that starts with "-" and has no space for a flag of its own, so a single
    vLLM flag given to --engine-args failed with "expected one argument" (found on the GPU machine).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    out: list[str] = []
    i = 0
    while i < len(args):
        if args[i] in PASS_THROUGH_FLAGS and i + 1 < len(args):
            out.append(f"{args[i]}={args[i + 1]}")
            i += 2
        else:
            out.append(args[i])
            i += 1
    return out


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Flags (then env, then defaults) → Settings. Invalid combinations raise UserFacingError."""
    return settings_from_args(build_parser().parse_args(with_pass_through_values(argv)))


def settings_from_args(a: argparse.Namespace) -> Settings:
    """Settings from parsed app flags (tools like kvdemo.bench add their own flags to the same parser).

    argparse already ran each flag's `type` on env-string defaults, so values arrive typed.
    """
    server_name = a.server_name or ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    port = 7860 if os.environ.get("SPACE_ID") and a.port == Settings.port else a.port
    s = Settings(
        scenario=a.scenario, model=a.model, simulate=a.simulate, gpus=a.gpus, port=port,
        engine_ports=a.engine_ports, max_model_len=a.max_model_len, context_tokens=a.context_tokens,
        gpu_memory_utilization=a.gpu_memory_utilization, kv_cache_gib=a.kv_cache_gib,
        data_dir=a.data_dir, lmcache_config=Path(a.lmcache_config) if a.lmcache_config else None,
        share=a.share, server_name=server_name, auth=a.auth,
        attach=[u.strip().rstrip("/") for u in a.attach.split(",") if u.strip()] if a.attach else None,
        dry_run=a.dry_run, log_dir=a.log_dir, engine_args=shlex.split(a.engine_args or ""),
        fairness=a.fairness, health_timeout_s=a.health_timeout, no_ui=a.no_ui, ask=a.ask,
        hf_token=os.environ.get("HF_TOKEN") or None, sim_speed=a.sim_speed,
        kv_store_dir=a.kv_store_dir, kv_store=a.kv_store, clear_kv_store=a.clear_kv_store,
        upload_budget_gib=a.upload_budget_gib,
    )
    validate(s)
    return s


def check_scenario_name(name: str) -> None:
    """An unknown scenario name (KVDEMO_SCENARIO: argparse checks a default against no choices) is a one-line
    UserFacingError that lists the known ones."""
    if name not in SCENARIO_NAMES:
        raise UserFacingError(f"Unknown scenario {name!r} (KVDEMO_SCENARIO?): use one of {', '.join(SCENARIO_NAMES)}.")


def validate(s: Settings) -> None:
    """Checks that need no GPU and no network; each failure says what to change. (What needs the scenario
    itself, e.g. enough --engine-ports for its engines, the runtime checks when it takes its scenario.)"""
    if s.max_model_len < 256:
        raise UserFacingError(f"--max-model-len {s.max_model_len} is too small; use at least 256.")
    if s.context_tokens < 1:
        raise UserFacingError(f"--context-tokens {s.context_tokens}: give the default context's size in tokens, "
                              "e.g. 16000.")
    if s.gpu_memory_utilization is not None and not 0.05 <= s.gpu_memory_utilization <= 0.98:
        raise UserFacingError("--gpu-memory-utilization must be between 0.05 and 0.98.")
    if len(set(s.engine_ports)) != len(s.engine_ports) or s.port in s.engine_ports:
        raise UserFacingError("--engine-ports and --port must all be different ports.")
    check_scenario_name(s.scenario)
    if s.fairness not in FAIRNESS_MODES:
        raise UserFacingError(f"Unknown fairness mode {s.fairness!r} (KVDEMO_FAIRNESS?): use one of "
                              f"{', '.join(FAIRNESS_MODES)}.")
    if s.upload_budget_gib is not None and s.upload_budget_gib < 0:
        raise UserFacingError("--upload-budget-gib must be 0 (no uploads) or more.")
    if s.sim_speed <= 0:
        raise UserFacingError("--sim-speed must be positive.")
    if s.no_ui and not s.ask and not s.dry_run:
        raise UserFacingError('--no-ui needs a question: add --ask "..."')
