"""Offline prompts: chunk files, texts or Chunks → token ids, assembled by the server path's PromptBuilder.

``[BOS] + sys + SEP + c1 + ... + SEP + cN + SEP + question``, every piece tokenized on its own (so each
chunk's KV is found again wherever the chunk sits), and the precompute requests that cache the pieces —
the exact ids the app sends its LMCache engine for the same files and question.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserFacingError
from ..prompts import DEFAULT_SEPARATOR, Chunk, ChunkLibrary, PromptBuilder, read_chunk

log = logging.getLogger("kvdemo.offline")

ChunkLike = str | os.PathLike | Chunk


@dataclass(frozen=True)
class BlendPrompts:
    """The token ids of one blended question and of the precompute requests that cache its pieces."""

    chunk_names: list[str]
    sys_ids: list[int]  # the system-prompt segment without BOS (chat prefix included)
    chunk_ids: list[list[int]]
    question_ids: list[int]
    prompt: list[int]  # [BOS] + sys + SEP + c1 + ... + SEP + cN + SEP + question
    precompute: list[list[int]]  # [BOS] + sys, then [BOS] + SEP + ci per chunk
    bos_tokens: int
    sep_tokens: int

    @property
    def total(self) -> int:
        return len(self.prompt)

    def breakdown(self) -> dict[str, Any]:
        """Token counts of each piece; they add up to ``total``."""
        return {"total": self.total, "bos": self.bos_tokens, "system": len(self.sys_ids),
                "chunks": [len(c) for c in self.chunk_ids],
                "separators": self.sep_tokens * (len(self.chunk_ids) + 1), "question": len(self.question_ids)}

    def describe(self) -> str:
        b = self.breakdown()
        return (f"{b['total']} tokens: system {b['system']}, {len(b['chunks'])} chunk(s) {sum(b['chunks'])}, "
                f"separators {b['separators']}, question {b['question']}, BOS {b['bos']}")


def load_chunk_file(path: str | os.PathLike) -> Chunk:
    """One chunk file (kvdemo.prompts.read_chunk: empty or non-UTF-8 files are refused)."""
    path = Path(path)
    if not path.exists():
        raise UserFacingError(f"Chunk file {path} does not exist: check the paths given to --chunks.")
    if path.is_dir():
        raise UserFacingError(f"{path} is a directory: --chunks takes files, e.g. {path}/*.txt.")
    return read_chunk(path)


def read_sys_prompt(path: str | os.PathLike) -> str:
    """The system prompt file's text; missing, empty or non-UTF-8 files are refused."""
    path = Path(path)
    if not path.is_file():
        raise UserFacingError(f"System prompt file {path} does not exist: fix --sys-prompt-file.")
    try:
        return read_chunk(path).text
    except UserFacingError as exc:
        raise UserFacingError(f"--sys-prompt-file: {exc}") from exc


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def _text_chunk(text: str, index: int) -> Chunk:
    body = text.strip()
    if not body:
        raise UserFacingError(f"Chunk {index + 1} is empty text: give it some text or leave it out.")
    if "\n" not in body and len(body) < 4096 and _is_file(body):
        log.warning("chunk %d is a str that names an existing file; it is used as TEXT (pass a Path to read "
                    "the file)", index + 1)
    first, _, _ = body.partition("\n")
    digest = hashlib.sha1(body.encode()).hexdigest()[:10]
    return Chunk(name=f"text-{digest}", title=first.lstrip("#").strip()[:80] or f"text-{digest}", text=body)


class ChunkPrompts:
    """Token-id prompts for offline blending, assembled by the server path's PromptBuilder.

    Chunks (files, texts or :class:`~kvdemo.prompts.Chunk`) go into one ChunkLibrary so that
    ``PromptBuilder.chunk_ids`` tokenizes each once; two different chunks with the same file stem get
    distinct names. The separator must be LMCache's ``blend_special_str``.
    """

    def __init__(self, tokenizer: Any, sys_prompt: str = "", separator: str = DEFAULT_SEPARATOR) -> None:
        self.library = ChunkLibrary(sys_prompt=sys_prompt, chunks={})
        self.builder = PromptBuilder(tokenizer, self.library, separator)

    @property
    def separator(self) -> str:
        return self.builder.separator

    def add(self, chunks: Sequence[ChunkLike]) -> list[str]:
        """Put chunks into the library; returns their names, in the order given."""
        if isinstance(chunks, (str, os.PathLike, Chunk)):
            raise TypeError("chunks must be a sequence (texts, paths or Chunk objects), not one chunk")
        names = []
        for i, item in enumerate(chunks):
            if isinstance(item, Chunk):
                chunk = item
            elif isinstance(item, os.PathLike):
                chunk = load_chunk_file(item)
            elif isinstance(item, str):
                chunk = _text_chunk(item, i)
            else:
                raise TypeError(f"chunk {i + 1}: expected str (text), a path or a Chunk, "
                                f"got {type(item).__name__}")
            existing = self.library.chunks.get(chunk.name)
            if existing is not None and existing.text != chunk.text:
                digest = hashlib.sha1(chunk.text.encode()).hexdigest()[:8]
                chunk = dataclasses.replace(chunk, name=f"{chunk.name}-{digest}")
            self.library.chunks[chunk.name] = chunk
            names.append(chunk.name)
        return names

    def _sys_ids(self, sys_prompt: str | None) -> list[int]:
        text = self.library.sys_prompt if sys_prompt is None else sys_prompt
        if not text.strip():
            raise UserFacingError("The system prompt is empty: LMCache matches a blended prompt from its "
                                  "system segment on, so give one (--sys-prompt-file, or sys_prompt=...).")
        return self.builder.sys_ids(text.strip())

    def precompute(self, chunks: Sequence[ChunkLike], sys_prompt: str | None = None) -> list[list[int]]:
        """``[BOS] + sys``, then ``[BOS] + SEP + ci`` per chunk: each request stores one segment's KV."""
        names = self.add(chunks)
        chunk_ids = [self.builder.chunk_ids(n) for n in names]
        return self.builder.precompute_layout(self._sys_ids(sys_prompt), chunk_ids)

    def build(self, chunks: Sequence[ChunkLike], question: str,
              sys_prompt: str | None = None) -> BlendPrompts:
        """The blended prompt and its precompute requests, from the same tokenized pieces."""
        if not question or not question.strip():
            raise UserFacingError("The question is empty: give --question some text.")
        if not chunks:
            raise UserFacingError("No chunks given: blending needs at least one chunk (--chunks FILE ...).")
        names = self.add(chunks)
        sys_ids = self._sys_ids(sys_prompt)
        chunk_ids = [self.builder.chunk_ids(n) for n in names]
        question_ids = self.builder.question_ids(question)
        return BlendPrompts(
            chunk_names=names, sys_ids=sys_ids, chunk_ids=chunk_ids, question_ids=question_ids,
            prompt=self.builder.assemble(sys_ids, chunk_ids, question_ids),
            precompute=self.builder.precompute_layout(sys_ids, chunk_ids),
            bos_tokens=len(self.builder.bos_ids), sep_tokens=len(self.builder.sep_ids),
        )


def check_fits(prompts: BlendPrompts, max_tokens: int, limit: int | None,
               limit_source: str = "max_model_len") -> None:
    """Refuse a prompt the model cannot take (vLLM needs prompt + at least 1 token <= max_model_len)."""
    if limit is None:
        return
    needed = prompts.total + max(1, max_tokens)
    if needed > limit:
        raise UserFacingError(
            f"The prompt is too long for the model: {prompts.describe()}; with max tokens {max_tokens} it "
            f"needs {needed} tokens, but the model allows {limit} ({limit_source}). Use fewer or shorter "
            "chunks, fewer --max-tokens, or a larger --max-model-len if the model supports it.")
