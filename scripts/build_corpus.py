"""Build the kvdemo text chunks from CPython's bundled ``pydoc_data.topics``.

``pydoc_data.topics.topics`` maps pydoc topic names to plain-text renderings of sections of the
Python Language Reference (and a few Library Reference pages), generated from the CPython docs
(PSF License; see ``data/ATTRIBUTION.md``).  This script groups related topics into themed chunks
and writes one file per chunk to ``data/chunks/NN-slug.txt``:

    # <Title>
    <blank line>
    <topic text>
    <blank line>
    <topic text> ...

The topic text is copied unchanged except that trailing whitespace is stripped from every line and
a chunk that would exceed ``MAX_CHARS`` is trimmed: a topic that does not fit in the room left is
cut just before a section heading (if that keeps most of the room) or else at the last top-level
block boundary (a blank line followed by an unindented line), dropping a dangling heading or a
lead-in line ending in ``:``; a cut topic shorter than ``MIN_PIECE`` and any later topics are left out.
No topic appears in more than one chunk, and no chosen topic's text is contained in another chosen
topic (e.g. ``compound`` and ``specialnames`` are avoided because they contain other topics).

The output is deterministic for a given Python version (the topic text changes between releases;
the files in data/chunks were generated with Python 3.11).  Other ``*.txt`` files found in the output
directory are reported, not removed.

Usage: python3 scripts/build_corpus.py [--out data/chunks]
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics

MIN_CHARS = 7_000  # ~1,950 Mistral tokens at ~3.6 chars/token
MAX_CHARS = 13_000  # ~3,600 Mistral tokens
CHARS_PER_TOKEN = 3.6
MIN_TOKENS, MAX_TOKENS = 1_500, 4_000
MIN_PIECE = 1_500  # a trimmed topic shorter than this is left out instead
HEADING_CUT_MIN = 0.6

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data" / "chunks"


@dataclass(frozen=True)
class Chunk:
    """One output file: a title and the pydoc topics it is made of, in order."""

    slug: str
    title: str
    topics: tuple[str, ...]


CHUNKS: tuple[Chunk, ...] = (
    Chunk("data-model", "Data model: objects, values and basic customization", ("objects", "customization")),
    Chunk(
        "expressions-primaries",
        "Expressions: attribute references, subscriptions, slicings and calls",
        ("attribute-references", "subscriptions", "slicings", "calls", "await"),
    ),
    Chunk(
        "operators",
        "Expressions: arithmetic, bitwise and Boolean operators",
        ("conversions", "power", "unary", "binary", "shifting", "bitwise", "booleans"),
    ),
    Chunk(
        "comparisons",
        "Expressions: comparisons, membership and identity tests, expression lists",
        ("comparisons", "exprlists"),
    ),
    Chunk("assignment", "Simple statements: assignment, del and pass", ("assignment", "del", "pass")),
    Chunk(
        "names-scopes",
        "Execution model: naming, binding, global/nonlocal and exceptions",
        ("naming", "global", "nonlocal", "exceptions"),
    ),
    Chunk(
        "control-flow",
        "Compound statements: if, while, for, with and assert",
        ("if", "while", "for", "break", "continue", "with", "context-managers", "assert"),
    ),
    Chunk("exceptions", "Exceptions: the raise and try statements", ("raise", "try")),
    Chunk(
        "functions-classes",
        "Functions, lambdas and classes",
        ("function", "lambda", "return", "yield", "class"),
    ),
    Chunk("import-system", "The import statement and modules", ("import", "typesmodules")),
    Chunk(
        "types-sequences",
        "Built-in types: common sequence operations and list displays",
        ("typesseq", "lists"),
    ),
    Chunk("types-mappings", "Built-in types: mappings (dict) and dictionary views", ("typesmapping",)),
    Chunk("string-formatting", "String formatting: format string syntax", ("formatstrings",)),
)

_BLOCK_START = re.compile(r"\n\n(?=\S)")
_HEADING = re.compile(r"\n\n(?=[^\n]+\n[=-]{3,}\n)")
_UNDERLINE = re.compile(r"^([*=\-^~])\1+$")


def clean(text: str) -> str:
    """Strip trailing whitespace from every line and surrounding blank lines."""
    return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")


def _ends_badly(text: str) -> bool:
    """True if *text* ends with a heading or a lead-in line (``...:``) whose body was cut off."""
    lines = text.rstrip("\n").splitlines()
    if not lines:
        return False
    return bool(_UNDERLINE.match(lines[-1])) or lines[-1].endswith(":")


def trim(text: str, budget: int) -> str:
    """Return a prefix of *text* of at most *budget* chars that ends at a block boundary.

    Prefer cutting just before a section heading (a line underlined with ``=`` or ``-``) if that keeps
    at least ``HEADING_CUT_MIN`` of the budget; otherwise cut at the last top-level block boundary.
    """
    if len(text) <= budget:
        return text
    headings = [m.start() for m in _HEADING.finditer(text) if m.start() <= budget]
    if headings and headings[-1] >= HEADING_CUT_MIN * budget:
        return text[: headings[-1]].rstrip()
    cuts = [m.start() for m in _BLOCK_START.finditer(text) if m.start() <= budget]
    while cuts:
        head = text[: cuts.pop()].rstrip()
        if not _ends_badly(head):
            return head
    return ""


def render(chunk: Chunk) -> tuple[str, list[str]]:
    """Render one chunk file's text (title line, then the topics, trimmed to ``MAX_CHARS``).

    Returns the text and the names of the topics used (a trimmed one is marked with ``*``).
    """
    out = f"# {chunk.title}"
    used: list[str] = []
    for name in chunk.topics:
        room = MAX_CHARS - len(out) - 3  # "\n\n" separator + final newline
        piece = trim(clean(topics[name]), room)
        if len(piece) < MIN_PIECE and piece != clean(topics[name]):
            break
        out += "\n\n" + piece
        used.append(name if piece == clean(topics[name]) else name + "*")
        if len(out) >= MAX_CHARS - 200:
            break
    return out + "\n", used


def check(chunks: tuple[Chunk, ...]) -> None:
    """Fail if a topic is used twice or if one chosen topic's text contains another's."""
    names = [n for c in chunks for n in c.topics]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SystemExit(f"topics used more than once: {dupes}")
    for a in names:
        body = clean(topics[a]).split("\n", 2)[-1][:400]
        for b in names:
            if a != b and body in topics[b]:
                raise SystemExit(f"topic {a!r} is contained in topic {b!r}")


def main(argv: list[str] | None = None) -> int:
    """Write the chunk files and print a size table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: data/chunks)")
    args = ap.parse_args(argv)
    check(CHUNKS)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted: set[str] = set()
    total = 0
    print(f"{'file':40} {'chars':>7} {'~mistral':>9}  topics")
    for i, chunk in enumerate(CHUNKS, start=1):
        text, used = render(chunk)
        name = f"{i:02d}-{chunk.slug}.txt"
        wanted.add(name)
        est = len(text) / CHARS_PER_TOKEN
        if not (MIN_CHARS <= len(text) <= MAX_CHARS and MIN_TOKENS <= est <= MAX_TOKENS):
            raise SystemExit(f"{name}: {len(text)} chars (~{est:.0f} tokens) is out of range")
        (out_dir / name).write_text(text, encoding="utf-8", newline="\n")
        total += len(text)
        print(f"{name:40} {len(text):7d} {est:9.0f}  {', '.join(used)}")
    for stale in sorted(out_dir.glob("*.txt")):
        if stale.name not in wanted:
            print(f"warning: {stale} is not produced by this script", file=sys.stderr)
    print(f"{'total':40} {total:7d} {total / CHARS_PER_TOKEN:9.0f}  (Python {sys.version.split()[0]})")
    print("* = topic trimmed at a block boundary")
    return 0


if __name__ == "__main__":
    sys.exit(main())
