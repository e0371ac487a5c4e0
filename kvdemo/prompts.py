"""The chunk library and the token-id prompts that let LMCache reuse each chunk's KV cache.

LMCache stores a chunk's KV under the hash of that chunk's own token ids, splitting prompts on the ids of
a separator string. Re-tokenizing joined text would shift token boundaries and miss the cache, so every
piece (system prompt, each chunk, separator, question) is tokenized once, on its own, and the prompt is
assembled as a list of token ids:

    [BOS] + sys + SEP + c1 + SEP + c2 + ... + SEP + cN + SEP + question

Both engines get exactly the same ids, so the comparison is fair.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import UserFacingError

log = logging.getLogger(__name__)

DEFAULT_SEPARATOR = " # # "  # LMCache's default blend_special_str
SHOWN_SEPARATOR = "\n\n⟪ # # ⟫\n\n"  # how the UI shows a separator inside the context text
# The page's default context: blending pays off on long contexts (benchmarks/results/blend-h100.json: 2.6x at 16K).
DEFAULT_CONTEXT_TOKENS = 16_000
ANSWER_ROOM_TOKENS = 512  # left under the engines' max_model_len for the question and the answer
_PLACEHOLDER = "\x00KVDEMO_USER_MESSAGE\x00"


@dataclass(frozen=True)
class Chunk:
    name: str  # file stem, stable id
    title: str  # first line "# Title" of the file, else the name
    text: str


@dataclass
class ChunkLibrary:
    """The system prompt and the chunk files of a data directory (data/sys_prompt.txt, data/chunks/*.txt)."""

    sys_prompt: str
    chunks: dict[str, Chunk]

    @classmethod
    def load(cls, data_dir: Path) -> ChunkLibrary:
        sys_file = data_dir / "sys_prompt.txt"
        chunk_dir = data_dir / "chunks"
        if not sys_file.is_file():
            raise UserFacingError(f"Missing {sys_file}: point --data-dir at a folder with sys_prompt.txt.")
        files = sorted(chunk_dir.glob("*.txt")) if chunk_dir.is_dir() else []
        if not files:
            raise UserFacingError(f"No chunk files in {chunk_dir}: add *.txt files (one text chunk each).")
        chunks = {}
        for path in files:
            chunk = read_chunk(path)
            chunks[chunk.name] = chunk
        return cls(sys_prompt=_read_text(sys_file).strip(), chunks=chunks)

    def titles(self) -> dict[str, str]:
        return {c.name: c.title for c in self.chunks.values()}


def read_chunk(path: Path) -> Chunk:
    """One chunk file; its first line `# Title` names it. Empty or undecodable files are refused."""
    text = _read_text(path).strip()
    if not text:
        raise UserFacingError(f"Chunk file {path} is empty: remove it or put text in it.")
    first, _, _ = text.partition("\n")
    title = first.lstrip("#").strip() if first.startswith("#") else path.stem
    return Chunk(name=path.stem, title=title, text=text)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserFacingError(f"{path} is not UTF-8 text (byte {exc.start}); fix or remove it.") from exc
    except OSError as exc:
        raise UserFacingError(f"Cannot read {path}: {exc.strerror}.") from exc


def load_tokenizer(source: str, token: str | None = None):
    """The model's own tokenizer (transformers), from a local dir or the Hub; errors say what to do."""
    from transformers import AutoTokenizer  # lazy: importing transformers takes seconds

    try:
        return AutoTokenizer.from_pretrained(source, token=token)
    except OSError as exc:
        raise UserFacingError(f"Cannot load the tokenizer of {source!r}: {str(exc).splitlines()[0]} "
                              "Check --model (Hub id or local directory) and HF_TOKEN.") from exc


def chat_wrapping(tokenizer) -> tuple[str, str]:
    """Text the model's chat template puts before and after one user message, e.g. ('[INST] ', ' [/INST]').

    The system-prompt segment starts with the prefix and the question segment ends with the suffix, so an
    instruction-tuned model sees its own format while every chunk stays a cacheable segment of its own.
    """
    if not getattr(tokenizer, "chat_template", None):
        return "", "\nAnswer:"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _PLACEHOLDER}], tokenize=False,
                                             add_generation_prompt=True)
    prefix, _, suffix = rendered.partition(_PLACEHOLDER)
    bos = tokenizer.bos_token or ""
    if bos and prefix.startswith(bos):
        prefix = prefix[len(bos):]  # BOS is added as an id, not as text
    return prefix, suffix


class PromptBuilder:
    """Tokenizes each piece once (cached) and assembles token-id prompts for blending."""

    def __init__(self, tokenizer, library: ChunkLibrary, separator: str = DEFAULT_SEPARATOR,
                 default_context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> None:
        self.tokenizer = tokenizer
        self.library = library
        self.separator = separator
        self.default_context_tokens = default_context_tokens  # the page's default selection fills this many
        # Exactly as LMCache computes it (token_database.py): encode with special tokens, drop the first.
        self.sep_ids: list[int] = list(tokenizer.encode(separator))[1:]
        self.bos_ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.prefix, self.suffix = chat_wrapping(tokenizer)
        self._encode = lru_cache(maxsize=4096)(self._encode_uncached)

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=False))

    def sys_ids(self, sys_prompt: str | None = None) -> list[int]:
        text = self.library.sys_prompt if sys_prompt is None else sys_prompt
        return list(self._encode(self.prefix + text))

    def chunk_ids(self, name: str, extra: Mapping[str, Sequence[int]] | None = None) -> list[int]:
        """A chunk's token ids: the library's, or `extra`'s (one session's uploaded chunks, name → ids)."""
        if extra and name in extra:
            return list(extra[name])
        chunk = self.library.chunks.get(name)
        if chunk is None:
            raise UserFacingError(f"Unknown chunk {name!r}; pick one of: {', '.join(self.library.chunks)}.")
        ids = list(self._encode(chunk.text))
        if _contains(ids, self.sep_ids):
            log.warning("chunk %s contains the separator's token ids; LMCache will split it there", name)
        return ids

    def question_ids(self, question: str) -> list[int]:
        return list(self._encode("\n\n" + question.strip() + self.suffix))

    def build(self, chunk_names: list[str], question: str, sys_prompt: str | None = None,
              extra: Mapping[str, Sequence[int]] | None = None) -> list[int]:
        """[BOS] + sys + SEP + c1 + ... + SEP + cN + SEP + question, as token ids (`extra`: see chunk_ids)."""
        return self.assemble(self.sys_ids(sys_prompt), [self.chunk_ids(n, extra) for n in chunk_names],
                             self.question_ids(question))

    def assemble(self, sys_ids: list[int], chunks: list[list[int]], question_ids: list[int]) -> list[int]:
        """The blending layout from already tokenized pieces (benchmarks splice synthetic chunks here)."""
        ids = self.bos_ids + sys_ids
        for chunk in chunks:
            ids += self.sep_ids + chunk
        return ids + self.sep_ids + question_ids

    def precompute_prompts(self, chunk_names: list[str], sys_prompt: str | None = None) -> list[list[int]]:
        """`[BOS] + sys`, then `[BOS] + SEP + ci` for each chunk: each stores one segment's KV."""
        return self.precompute_layout(self.sys_ids(sys_prompt), [self.chunk_ids(n) for n in chunk_names])

    def precompute_layout(self, sys_ids: list[int], chunks: list[list[int]]) -> list[list[int]]:
        return [self.bos_ids + sys_ids] + [self.bos_ids + self.sep_ids + c for c in chunks]

    def context_tokens(self, chunk_names: list[str], sys_prompt: str | None = None,
                       extra: Mapping[str, Sequence[int]] | None = None) -> int:
        """Tokens of everything but the question (what the context panel counts)."""
        n = len(self.bos_ids) + len(self.sys_ids(sys_prompt))
        return n + sum(len(self.sep_ids) + len(self.chunk_ids(c, extra)) for c in chunk_names)

    def display_text(self, chunk_names: list[str], sys_prompt: str | None = None,
                     extra_texts: Mapping[str, str] | None = None) -> str:
        """The context as a person reads it, separators made visible (`extra_texts`: uploaded chunks' text)."""
        sys_text = self.library.sys_prompt if sys_prompt is None else sys_prompt
        texts = {**{n: c.text for n, c in self.library.chunks.items()}, **(extra_texts or {})}
        parts = [sys_text] + [texts[n] for n in chunk_names if n in texts]
        return SHOWN_SEPARATOR.join(parts)

    def page_selection(self, max_model_len: int) -> list[str]:
        """The page's default chunks (also /ask's and the headless question's when none are named): library
        order up to ``default_context_tokens`` (``--context-tokens``), leaving ANSWER_ROOM_TOKENS under
        ``max_model_len``."""
        return self.default_selection(self.default_context_tokens, max_model_len - ANSWER_ROOM_TOKENS)

    def default_selection(self, min_tokens: int, max_tokens: int) -> list[str]:
        """Chunks in library order until the context reaches min_tokens (blending pays off on long contexts)."""
        chosen: list[str] = []
        for name in self.library.chunks:
            if self.context_tokens(chosen + [name]) + 64 > max_tokens:
                break
            chosen.append(name)
            if self.context_tokens(chosen) >= min_tokens:
                break
        return chosen


def _contains(haystack: list[int], needle: list[int]) -> bool:
    n = len(needle)
    return n > 0 and any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))
