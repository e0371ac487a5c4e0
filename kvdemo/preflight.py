"""Checks before any engine starts, each failing with one line that says what to do."""

from __future__ import annotations

import errno
import logging
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .config import Settings
from .errors import UserFacingError

log = logging.getLogger(__name__)


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
