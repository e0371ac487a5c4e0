"""Bring your own text: a session's uploaded or pasted text, split into chunks the blend page can pick.

Gradio-free (ui/handlers.py wires it). A .txt/.md file is read as UTF-8; a .pdf's text layer is extracted
page by page with pypdf. Text is split at markdown headings and blank-line paragraphs, packing paragraphs up
to a target size in tokens of the runtime's tokenizer; a paragraph longer than the target is split at
sentences, then words. Each chunk is tokenized on its own, like a library chunk, and its KV is precomputed
on the 🚀 engine (`[BOS] + SEP + chunk`) before the page offers it. The chunks belong to one browser session
(an `Uploads` in its gr.State); the shared library is never changed. All sessions' uploads share 🚀's LMCache
CPU cache with the shipped chunks, within the runtime's upload budget (upload_budget.py): `add_upload`
admits each upload to that engine-wide ledger, and a session whose chunks it evicted learns so, in one line,
the next time it acts (`add_upload`, `check_evicted`).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserFacingError
from .prompts import PromptBuilder, _contains
from .upload_budget import refresh_shipped, size_text

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger(__name__)

TARGET_TOKENS = 2_000  # each uploaded chunk's size, at most
MAX_FILE_BYTES = 2 * 1024 * 1024
MAX_SESSION_TOKENS = 65_536  # all of one session's uploaded chunks together
MAX_SESSION_CHUNKS = 40
EXTENSIONS = (".txt", ".md", ".pdf")
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
    """One browser session's uploaded chunks, in upload order.

    `session` names the session in the engine-wide ledger; it is set on the first upload, not here, because
    Gradio deep-copies the page's initial Uploads() into every session (a default id would be shared).
    `evicted`: this session's chunks the ledger evicted, with the note that says so (asking with one of them
    still selected repeats it).
    """

    chunks: dict[str, UploadedChunk] = field(default_factory=dict)
    session: str = ""
    evicted: dict[str, str] = field(default_factory=dict)

    def session_id(self) -> str:
        if not self.session:
            self.session = uuid.uuid4().hex
        return self.session

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
            self.evicted.pop(c.name, None)

    def drop(self, names: Iterable[str], note: str) -> None:
        """Take evicted chunks off this session's picker, remembering why."""
        for name in names:
            if self.chunks.pop(name, None) is not None:
                self.evicted[name] = note


# ----- reading ---------------------------------------------------------------------------------------

def read_upload(path: str | Path) -> tuple[str, str]:
    """(file stem, text) of an uploaded .txt/.md/.pdf file; a UserFacingError says what is wrong with it.

    Blocking (a PDF's extraction takes a while): handlers run it in a worker thread.
    """
    path = Path(path)
    name = path.name
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise UserFacingError(f"{name}: only {', '.join(EXTENSIONS[:-1])} and {EXTENSIONS[-1]} files can be "
                              "uploaded.")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise UserFacingError(f"{name} is {size / 2**20:.1f} MB, over the limit of {MAX_FILE_BYTES // 2**20} MB.")
    if suffix == ".pdf":
        text = pdf_text(path)
    else:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserFacingError(f"{name} is not UTF-8 text (byte {exc.start}): save it as UTF-8 and upload it "
                                  "again.") from exc
    if not text.strip():
        raise UserFacingError(f"{name} is empty: nothing to add.")
    return path.stem, text


def pdf_text(path: Path) -> str:
    """The text layer of a PDF, page by page (pages joined by a blank line: a page break ends a paragraph).

    pypdf reads it (pure Python, no system libraries). An encrypted PDF opens if its user password is empty
    (common for "no copying" PDFs); one that needs a password, a damaged one, and one with no text at all
    (a scan) each get their own one-line error. The text is capped like a text file (MAX_FILE_BYTES): a small
    PDF can hold far more text than its size, and tokenizing it all would stall the page.
    """
    from pypdf import PdfReader  # lazy: only PDF uploads need it
    from pypdf.errors import DependencyError, FileNotDecryptedError

    name = path.name
    pages: list[str] = []
    size = 0
    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise FileNotDecryptedError("a password is needed")
        for page in reader.pages:
            text = (page.extract_text() or "").strip()
            size += len(text.encode("utf-8"))
            if size > MAX_FILE_BYTES:
                raise UserFacingError(f"{name} holds more than {MAX_FILE_BYTES // 2**20} MB of text, over the "
                                      f"limit of {MAX_FILE_BYTES // 2**20} MB: upload fewer pages.")
            pages.append(text)
    except UserFacingError:
        raise
    except (FileNotDecryptedError, DependencyError) as exc:
        raise UserFacingError(f"{name} is encrypted (password-protected): save an unprotected copy and upload it "
                              "again.") from exc
    except Exception as exc:  # a damaged PDF fails anywhere in pypdf, in many exception types
        detail = (str(exc).splitlines() or [""])[0][:80]
        raise UserFacingError(f"{name} could not be read as a PDF ({type(exc).__name__}"
                              f"{': ' + detail if detail else ''}): the file is damaged or not a PDF.") from exc
    if not any(pages):
        raise UserFacingError(f"{name} has no extractable text (scanned image? no text layer): upload a PDF "
                              "with text, or paste its text.")
    return "\n\n".join(p for p in pages if p)


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
    while any(name.startswith(f"{PREFIX}{_suffixed(base, k)} (") for name in [*uploads.chunks, *uploads.evicted]):
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


# ----- adding an upload: the engine-wide budget -----------------------------------------------------

@dataclass(frozen=True)
class UploadStep:
    """One status update of `add_upload`: the line(s) to show, and whether this session's chunks changed
    (then its pickers need new choices, and its selection must lose evicted chunks)."""

    line: str
    changed: bool = False


def _collect_evicted(runtime: Runtime, up: Uploads) -> list[str]:
    """Drop from `up` the chunks the ledger evicted since this session last acted; their names."""
    if not up.session:  # never uploaded: nothing of it is in the ledger (and no ledger is built for it)
        return []
    ledger = runtime.upload_ledger
    names = [n for n in ledger.take_evicted(up.session) if n in up.chunks]
    if names:
        up.drop(names, ledger.note(names))
    return names


def check_evicted(runtime: Runtime, up: Uploads | None, names: list[str] | None) -> str | None:
    """Before a question: the note about this session's chunks evicted since it last acted, or None.

    Raises UserFacingError (one line) if a selected chunk was evicted: answering without it would answer a
    different context than the one the visitor picked.
    """
    if up is None:
        return None
    evicted = _collect_evicted(runtime, up)
    gone = [n for n in names or [] if n in up.evicted]
    if gone:
        raise UserFacingError(f"{runtime.upload_ledger.note(gone)}: remove it from the chunks and ask again.")
    return runtime.upload_ledger.note(evicted) if evicted else None


def kept_selection(up: Uploads, names: list[str] | None, library_names: Iterable[str]) -> list[str]:
    """The picker's selection without chunks this session no longer has (evicted)."""
    known = set(library_names) | set(up.chunks)
    return [n for n in names or [] if n in known]


async def add_upload(runtime: Runtime, up: Uploads, stem: str, text: str) -> AsyncIterator[UploadStep]:
    """Split one upload, check it against the session's limits and the engine-wide upload budget, precompute
    its chunks on 🚀, admit them to the ledger (evicting the oldest uploads, any session's, if needed), then
    add them to this session. Yields status steps; a refusal or failure adds nothing and evicts nothing.

    After a successful upload, if the cache could overflow (`UploadLedger.needs_refresh`), the shipped chunks
    are touched in LMCache (`refresh_shipped`) so its LRU evicts uploads first; a failure there is logged only.
    """
    builder = runtime.builder
    assert builder is not None
    ledger = runtime.upload_ledger
    evicted = _collect_evicted(runtime, up)

    def step(line: str, changed: bool = bool(evicted)) -> UploadStep:
        return UploadStep(line + (f"  \n⚠️ {ledger.note(evicted)}" if evicted else ""), changed)

    try:
        new = make_chunks(builder, up, stem, text)
        ledger.check(stem, sum(len(c.ids) for c in new))
    except UserFacingError as exc:
        yield step(f"⚠️ {exc}")
        return
    n = len(new)
    yield step(f"⏳ {stem}: {n} chunk{'s' if n != 1 else ''}, precomputing their KV on 🚀… 0/{n}")
    try:
        async for done in runtime.store_uploaded_segments(precompute_requests(builder, new)):
            yield step(f"⏳ {stem}: precomputing on 🚀… {done}/{n}")
    except UserFacingError as exc:
        yield step(f"⚠️ Precompute of {stem} failed, nothing added: {str(exc).splitlines()[0]}")
        return
    ledger.admit(up.session_id(), [(c.name, len(c.ids)) for c in new])
    up.add(new)
    evicted += _collect_evicted(runtime, up)  # this upload may have evicted the session's own older ones
    if ledger.needs_refresh():
        try:
            seconds = await refresh_shipped(runtime)
            print(f"kvdemo: after upload {stem}: shipped chunks refreshed in LMCache's LRU ({seconds:.2f} s)",
                  flush=True)
        except UserFacingError as exc:
            log.warning("refreshing the shipped chunks after upload %s failed: %s", stem, exc)
    tokens = sum(len(c.ids) for c in new)
    yield step(f"✅ Added {n} chunk{'s' if n != 1 else ''} from {stem} ({tokens:,} tokens, precomputed); this "
               f"session's uploads: {len(up.chunks)} chunks, {up.tokens:,} tokens; all visitors' uploads: "
               f"{size_text(ledger.used_bytes)} of the {ledger.describe()}.", changed=True)
