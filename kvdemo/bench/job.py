"""What one TTFT benchmark run is: the checked flags (`BenchJob`) that cli.py makes and measure.py and
write.py carry out, and the token-count flags' parser that the quality case (quality.py) shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Settings
from ..errors import UserFacingError
from .protocol import BenchCases


@dataclass(frozen=True)
class BenchJob:
    """One TTFT benchmark run, as the flags asked for it (checked)."""

    settings: Settings
    cases: BenchCases  # the scenario's protocol
    contexts: list[int]
    trace_contexts: list[int]
    repeats: int
    decode_tokens: int
    skip_app_question: bool
    out: Path
    name: str | None  # result file stem (default: the scenario)
    command: str  # how to run it again, for the result file


def token_counts(flag: str, text: str) -> list[int]:
    """``4000,8000`` → [4000, 8000]; anything else is a one-line error naming the flag."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserFacingError(f"{flag} takes token counts separated by commas, e.g. 8000,16000 (got {text!r}).")
    return values
