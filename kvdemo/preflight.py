"""Checks before any engine starts, each failing with one line that says what to do."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path
from typing import Any

from .config import Settings
from .errors import UserFacingError

log = logging.getLogger(__name__)

# The plugin vLLM must load in an LMCache engine's processes (pyproject.toml's entry point).
PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "kvdemo_lmcache"
PLUGIN_TARGET = "kvdemo.vllm_plugin:register"
VERIFIED_VERSIONS = {"vllm": "0.22.0", "lmcache": "0.5.3"}  # blending is verified with this pair (docs/plugin.md)


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_mib: int


def detect_gpus() -> list[Gpu]:
    """GPUs as nvidia-smi lists them; [] when there is no driver or no GPU."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        index, name, mem = (x.strip() for x in line.split(","))
        gpus.append(Gpu(int(index), name, int(float(mem))))
    return gpus


def require_gpu(why: str) -> list[Gpu]:
    """The GPUs nvidia-smi lists; a clear error when there are none (vLLM would fail obscurely later).

    ``why`` says what needs the GPU, e.g. "offline blending needs one".
    """
    gpus = detect_gpus()
    if not gpus:
        raise UserFacingError(f"No NVIDIA GPU found (nvidia-smi lists none): {why}. Try "
                              "`python app.py --simulate` for a GPU-free demo.")
    return gpus


def choose_gpus(settings: Settings, n_engines: int, available: list[Gpu] | None = None) -> list[int]:
    """Which GPU indices the engines use; a clear error if there are none or --gpus names missing ones."""
    available = detect_gpus() if available is None else available
    if not available:
        raise UserFacingError("No NVIDIA GPU found (nvidia-smi lists none). Run `python app.py --simulate` to "
                              "try the demo without a GPU, or --attach URL,URL to use engines running elsewhere.")
    indices = [g.index for g in available]
    if settings.gpus is None:
        return indices[:n_engines]
    missing = [g for g in settings.gpus if g not in indices]
    if missing:
        raise UserFacingError(f"--gpus names GPU {missing[0]}, but this machine has only GPU(s) "
                              f"{','.join(map(str, indices))}. Pick from those, or use --simulate.")
    return settings.gpus


def check_port_free(port: int, host: str = "127.0.0.1", what: str = "port") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As servers do (uvicorn, vLLM): connections of a just-stopped engine in TIME_WAIT must not count
        # as "in use" (seen on the GPU machine: a restart right after a run was refused), a listener must.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host if host != "0.0.0.0" else "", port))
            s.listen(1)
        except OSError as exc:
            hint = "stop whatever uses it" + (" (an engine left from an earlier run?)" if "engine" in what else "")
            flag = "--port" if what == "UI port" else "--engine-ports"
            if exc.errno == errno.EADDRINUSE:
                raise UserFacingError(f"{what} {port} is already in use: {hint}, or choose another with {flag}.") \
                    from exc
            raise UserFacingError(f"Cannot use {what} {port}: {exc.strerror}. Choose another with {flag}.") from exc


def check_model(settings: Settings) -> None:
    """Local dir exists; a Hub model is reachable, and gated models come with a token that has access."""
    if settings.is_local_model:
        path = Path(settings.model).expanduser()
        if not path.is_dir():
            raise UserFacingError(f"Model directory {settings.model} does not exist: fix --model, or give a Hub id.")
        if not (path / "config.json").is_file():
            raise UserFacingError(f"{settings.model} has no config.json: --model must be a model directory.")
        return
    if settings.simulate and settings.model == Settings.model:
        return  # the bundled tokenizer stands in for the default model
    from huggingface_hub import auth_check
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        auth_check(settings.model, token=settings.hf_token)
    except GatedRepoError as exc:
        what = "HF_TOKEN has no access to it" if settings.hf_token else "no HF_TOKEN is set"
        raise UserFacingError(f"{settings.model} is a gated model and {what}: accept its licence on "
                              f"huggingface.co/{settings.model} and export HF_TOKEN=hf_... .") from exc
    except RepositoryNotFoundError as exc:
        raise UserFacingError(f"Model {settings.model} was not found on the Hugging Face Hub (or is private and "
                              "HF_TOKEN is missing): check --model.") from exc
    except (HfHubHTTPError, OSError) as exc:
        log.debug("hub check failed", exc_info=True)
        raise UserFacingError(f"Cannot reach the Hugging Face Hub to check {settings.model} "
                              f"({type(exc).__name__}). Use a local model directory with --model, or retry online.") \
            from exc


def model_config(settings: Settings) -> Mapping[str, Any] | None:
    """The model's config.json: a local model's file, else the Hub's (in simulate mode only a copy already in
    the Hugging Face cache: simulated runs need no network). None when it cannot be had."""
    try:
        if settings.is_local_model:
            return json.loads((Path(settings.model).expanduser() / "config.json").read_text())
        from huggingface_hub import hf_hub_download  # lazy: only when a config is asked for

        path = hf_hub_download(settings.model, "config.json", token=settings.hf_token,
                               local_files_only=settings.simulate)
        return json.loads(Path(path).read_text())
    except Exception as exc:  # noqa: BLE001 - any failure means "unknown": callers estimate or let vLLM say
        log.info("no config.json for %s (%s)", settings.model, exc)
        return None


def model_architectures(settings: Settings) -> list[str] | None:
    """``architectures`` from the model's config.json; None when unknown."""
    config = model_config(settings)
    found = config.get("architectures") if isinstance(config, Mapping) else None
    return [str(a) for a in found] if isinstance(found, list) else None


def check_blending_architecture(settings: Settings) -> None:
    """Blending works only for the model classes LMCache 0.5.3 maps (+ Mistral through kvdemo's plugin).

    WHY: otherwise the 🚀 engine starts, loads the model, and dies with a NotImplementedError in its log when
    LMCache builds its blender, minutes later; here it is one line before any engine starts.
    """
    from .lmcache_patches.model import LLAMA_LIKE_CLASS_NAMES, LMCACHE_ARCHITECTURES, SUPPORTED_ARCHITECTURES

    found = model_architectures(settings)
    if not found or any(a in SUPPORTED_ARCHITECTURES for a in found):
        return
    raise UserFacingError(
        f"{settings.model} is a {', '.join(found)}: LMCache 0.5.3 blends only {', '.join(LMCACHE_ARCHITECTURES)} "
        f"(and {', '.join(LLAMA_LIKE_CLASS_NAMES)} through kvdemo's plugin). Pick such a model with --model, or "
        "use --scenario share (no blending).")


def check_lmcache_config(path: Path) -> dict:
    """The LMCache yaml parses and is a mapping; returns it."""
    import yaml

    if not path.is_file():
        raise UserFacingError(f"LMCache config {path} not found: fix --lmcache-config.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserFacingError(f"LMCache config {path} is not valid YAML{where}: fix the file.") from exc
    if not isinstance(data, dict):
        raise UserFacingError(f"LMCache config {path} must be a mapping of keys to values.")
    return data


def plugin_problem() -> str | None:
    """Why vLLM would not load kvdemo's plugin (then LMCache cannot blend), or None when it will.

    vLLM loads general plugins from installed entry points in every process it starts, so a source
    checkout on ``PYTHONPATH`` is not enough: the project must be pip-installed.
    """
    try:
        eps = list(metadata.entry_points(group=PLUGIN_GROUP))
    except Exception as exc:  # noqa: BLE001 - a broken metadata install must not crash the check
        return f"cannot list vLLM plugins ({type(exc).__name__}: {exc})"
    ep = next((e for e in eps if e.name == PLUGIN_NAME), None)
    if ep is None:
        return (f"kvdemo's vLLM plugin is not installed (entry point {PLUGIN_NAME} in group {PLUGIN_GROUP}), "
                "so LMCache cannot blend: run `pip install -e .` in the kvdemo checkout.")
    if ep.value != PLUGIN_TARGET:
        return (f"the installed entry point {PLUGIN_NAME} points at {ep.value}, not {PLUGIN_TARGET}: "
                "reinstall kvdemo with `pip install -e .`.")
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in [p.strip() for p in allowed.split(",")]:
        return f"VLLM_PLUGINS={allowed!r} leaves out {PLUGIN_NAME}: add it, or unset VLLM_PLUGINS."
    return None


def check_plugin_installed() -> None:
    """:func:`plugin_problem` as a one-line error, before an LMCache engine spends minutes starting."""
    problem = plugin_problem()
    if problem:
        raise UserFacingError(problem[0].upper() + problem[1:])


def check_runtime_importable() -> None:
    """vLLM and LMCache are installed (without importing them: that takes seconds and loads CUDA)."""
    for name in ("vllm", "lmcache"):
        if not _module_available(name):
            raise UserFacingError(f"{name} is not installed in this Python: offline blending needs vllm "
                                  f"{VERIFIED_VERSIONS['vllm']} + lmcache {VERIFIED_VERSIONS['lmcache']} "
                                  "(pip install -r requirements.txt on the GPU machine).")
    for name, verified in VERIFIED_VERSIONS.items():
        version = package_version(name)
        if version is not None and version != verified:
            log.warning("%s %s is installed; blending was verified with vllm %s + lmcache %s", name, version,
                        VERIFIED_VERSIONS["vllm"], VERIFIED_VERSIONS["lmcache"])


def _module_available(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def model_context_limit(model: str) -> int | None:
    """The model's own context length (config.json), to refuse too-long prompts before the engine starts.

    None when unknown (e.g. the Hub is unreachable): the engine's ``max_model_len`` is checked after start.
    """
    settings = Settings(model=model, hf_token=os.environ.get("HF_TOKEN") or None)
    config: Mapping[str, Any] = {}
    try:
        if settings.is_local_model:
            config = json.loads((Path(model).expanduser() / "config.json").read_text())
        else:
            from transformers import AutoConfig  # lazy: importing transformers takes seconds

            config = AutoConfig.from_pretrained(model, token=settings.hf_token).to_dict()
    except Exception as exc:  # noqa: BLE001 - only an early check; vLLM checks again
        log.debug("cannot read the context length of %s: %s", model, exc)
        return None
    for source in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None
