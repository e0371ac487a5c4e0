"""Bring your own text: a session's uploaded or pasted text, split into chunks the blend page can pick.

Gradio-free (ui/app.py wires it). Text is split at markdown headings and blank-line paragraphs, packing
paragraphs up to a target size in tokens of the runtime's tokenizer; a paragraph longer than the target is
split at sentences, then words. Each chunk is tokenized on its own, like a library chunk, and its KV is
precomputed on the 🚀 engine (`[BOS] + SEP + chunk`) before the page offers it. The chunks belong to one
browser session (an `Uploads` in its gr.State); the shared library is never changed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserFacingError
from .prompts import PromptBuilder, _contains

TARGET_TOKENS = 2_000  # each uploaded chunk's size, at most
MAX_FILE_BYTES = 2 * 1024 * 1024
MAX_SESSION_TOKENS = 65_536  # all of one session's uploaded chunks together
MAX_SESSION_CHUNKS = 40
EXTENSIONS = (".txt", ".md")
PREFIX = "upload: "

_HEADING = re.compile(r"^#{1,6}\s")
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")


@dataclass(frozen=True)
class UploadedChunk:
    name: str
    text: str
    ids: tuple[int, ...]


@dataclass
class Uploads:
    """One browser session's uploaded chunks, in upload order."""

    chunks: dict[str, UploadedChunk] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(len(c.ids) for c in self.chunks.values())

    def ids(self) -> dict[str, tuple[int, ...]]:
        """name → token ids, for PromptBuilder.build / validate_turn."""
        return {n: c.ids for n, c in self.chunks.items()}

    def texts(self) -> dict[str, str]:
        return {n: c.text for n, c in self.chunks.items()}

    def add(self, chunks: list[UploadedChunk]) -> None:
        for c in chunks:
            self.chunks[c.name] = c


# ----- reading ---------------------------------------------------------------------------------------

def read_upload(path: str | Path) -> tuple[str, str]:
    """(file stem, text) of an uploaded .txt/.md file; a UserFacingError says what is wrong with it."""
    path = Path(path)
    name = path.name
    if path.suffix.lower() not in EXTENSIONS:
        raise UserFacingError(f"{name}: only {' and '.join(EXTENSIONS)} files can be uploaded.")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise UserFacingError(f"{name} is {size / 2**20:.1f} MB, over the limit of {MAX_FILE_BYTES // 2**20} MB.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserFacingError(f"{name} is not UTF-8 text (byte {exc.start}): save it as UTF-8 and upload it "
                              "again.") from exc
    if not text.strip():
        raise UserFacingError(f"{name} is empty: nothing to add.")
    return path.stem, text


# ----- splitting -------------------------------------------------------------------------------------

def paragraphs(text: str) -> list[tuple[bool, str]]:
    """(starts with a heading, paragraph) at blank lines and before every markdown heading line."""
    out: list[tuple[bool, str]] = []
    lines: list[str] = []

    def flush() -> None:
        if lines:
            out.append((bool(_HEADING.match(lines[0])), "\n".join(lines).strip()))
            lines.clear()

    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line.strip():
            flush()
        elif _HEADING.match(line):
            flush()
            lines.append(line.rstrip())
        else:
            lines.append(line.rstrip())
    flush()
    return out


def split_text(text: str, count: Callable[[str], int], target: int = TARGET_TOKENS) -> list[str]:
    """Chunks of at most `target` tokens (as `count` measures them), at headings and paragraphs first.

    A heading starts a new chunk once the current one is at least half the target; paragraphs are packed
    (joined by a blank line) up to the target; a longer paragraph is split at sentences, then at words.
    """
    chunks: list[str] = []
    current: list[str] = []

    def close() -> None:
        if current:
            chunks.append("\n\n".join(current))
            current.clear()

    for heading, para in paragraphs(text):
        if heading and current and count("\n\n".join(current)) >= target // 2:
            close()
        for piece in _fit(para, count, target):
            if current and count("\n\n".join([*current, piece])) > target:
                close()
            current.append(piece)
    close()
    return chunks


def _fit(text: str, count: Callable[[str], int], target: int) -> list[str]:
    """`text` as pieces of at most `target` tokens: itself, or packed sentences, words, characters."""
    if count(text) <= target:
        return [text]
    for splitter, joiner in ((_SENTENCE_END.split, " "), (str.split, " ")):
        parts = [p for p in splitter(text) if p]
        if len(parts) > 1:
            return _pack([q for p in parts for q in _fit(p, count, target)], joiner, count, target)
    half = len(text) // 2  # one "word" longer than the target: cut it in halves
    return _fit(text[:half], count, target) + _fit(text[half:], count, target)


def _pack(parts: list[str], joiner: str, count: Callable[[str], int], target: int) -> list[str]:
    out: list[str] = []
    current: list[str] = []
    for p in parts:
        if current and count(joiner.join([*current, p])) > target:
            out.append(joiner.join(current))
            current = []
        current.append(p)
    if current:
        out.append(joiner.join(current))
    return out


# ----- making chunks ---------------------------------------------------------------------------------

def make_chunks(builder: PromptBuilder, uploads: Uploads, stem: str, text: str,
                target: int = TARGET_TOKENS) -> list[UploadedChunk]:
    """The chunks of one upload, named "upload: <stem> (k/n)", checked against the session's limits.

    Raises UserFacingError (nothing added) if the text is empty, a chunk contains the separator's token ids,
    or the session would go over MAX_SESSION_CHUNKS chunks or MAX_SESSION_TOKENS tokens.
    """
    if not text.strip():
        raise UserFacingError(f"{stem} is empty: nothing to add.")
    encode = builder._encode  # cached, add_special_tokens=False: exactly how a library chunk is tokenized
    pieces = split_text(text, lambda s: len(encode(s)), target)
    n = len(pieces)
    all_ids = [tuple(encode(p)) for p in pieces]
    total = uploads.tokens + sum(map(len, all_ids))
    if total > MAX_SESSION_TOKENS:
        raise UserFacingError(f"{stem} would bring this session's uploads to {total:,} tokens, over the limit of "
                              f"{MAX_SESSION_TOKENS:,} tokens.")
    if len(uploads.chunks) + n > MAX_SESSION_CHUNKS:
        raise UserFacingError(f"{stem} makes {n} chunks; with the {len(uploads.chunks)} uploaded already that is "
                              f"over the limit of {MAX_SESSION_CHUNKS} uploaded chunks per session.")
    base, k = stem.strip() or "text", 1
    while any(name.startswith(f"{PREFIX}{_suffixed(base, k)} (") for name in uploads.chunks):
        k += 1  # the same file again: "notes-2"
    base = _suffixed(base, k)
    chunks = []
    for i, (piece, ids) in enumerate(zip(pieces, all_ids), 1):
        name = f"{PREFIX}{base} ({i}/{n})"
        if _contains(list(ids), builder.sep_ids):
            raise UserFacingError(f"{name} contains the chunk separator {builder.separator.strip()!r}, which would "
                                  "split its cache: remove it from the text and upload again.")
        chunks.append(UploadedChunk(name, piece, ids))
    return chunks


def _suffixed(base: str, k: int) -> str:
    return base if k == 1 else f"{base}-{k}"


def precompute_requests(builder: PromptBuilder, chunks: list[UploadedChunk]) -> list[list[int]]:
    """`[BOS] + SEP + chunk` for each chunk: the library precompute's request shape."""
    return builder.precompute_layout([], [list(c.ids) for c in chunks])[1:]
