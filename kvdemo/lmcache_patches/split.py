"""Fix 'split': LMCache 0.5.3's ``SegmentTokenDatabase._fast_split_by_subtensor`` lacks a ``return``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

from .hooks import wrap_method
from .targets import MOD_TOKEN_DB


def find_separator_starts(tokens: Sequence[int], sep: Sequence[int]) -> list[int]:
    """Start index of every (possibly overlapping) occurrence of ``sep`` in ``tokens``.

    The pure-Python equivalent of LMCache's ``tokens.unfold(0, len(sep), 1) == sep`` window match.
    """
    n = len(sep)
    if n == 0:
        return []
    sep_list = list(sep)
    first = sep_list[0]
    return [i for i in range(len(tokens) - n + 1) if tokens[i] == first and list(tokens[i:i + n]) == sep_list]


def fast_split_by_subtensor(self: Any, tokens: Any) -> Iterator[Any]:
    """Fixed copy of lmcache 0.5.3 ``SegmentTokenDatabase._fast_split_by_subtensor``.

    WHY: the original yields the whole token list when it is shorter than the separator and then falls
    through to ``tokens.unfold(0, sep_len, 1)``, which raises ``RuntimeError: maximum size for tensor at
    dimension 0 is 1 but size is 3`` and kills the engine (e.g. a precompute request ``[BOS]+SEP+chunk``
    whose lookup only hits ``[BOS]``). The only change is the ``return`` after that early ``yield``;
    plain Python sequences are accepted too (same windows, matched without torch).
    """
    sep_len = self.sep_len
    if sep_len == 0 or len(tokens) < sep_len:
        yield tokens
        return

    if hasattr(tokens, "unfold"):
        # Unfold into sliding windows, shape (num_tokens - sep_len + 1, sep_len); as in LMCache.
        windows = tokens.unfold(0, sep_len, 1)
        matches = (windows == self.sep_tokens).all(dim=1).nonzero(as_tuple=True)[0].tolist()
    else:
        sep = self.sep_tokens.tolist() if hasattr(self.sep_tokens, "tolist") else list(self.sep_tokens)
        matches = find_separator_starts(tokens, sep)

    start = 0
    for idx in matches:
        yield tokens[start:idx]
        start = idx + sep_len
    yield tokens[start:]


def patch_split(module: ModuleType) -> None:
    """Replace ``SegmentTokenDatabase._fast_split_by_subtensor`` with :func:`fast_split_by_subtensor`."""
    def make(_original: Any) -> Any:
        def _fast_split_by_subtensor(self: Any, tokens: Any) -> Iterator[Any]:
            return fast_split_by_subtensor(self, tokens)
        return _fast_split_by_subtensor

    wrap_method(module, "SegmentTokenDatabase._fast_split_by_subtensor", "split", make,
                "returns after its early yield")


PATCHES = ((MOD_TOKEN_DB, patch_split),)
