"""Bring your own text: splitting, the limits of an upload, and prompts with a session's uploaded chunks."""

from __future__ import annotations

import asyncio

import pytest
from conftest import make_runtime

from kvdemo import uploads as byo
from kvdemo.errors import UserFacingError
from kvdemo.ui.session import validate_turn

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


def words(n: int, seed: int = 0) -> str:
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(n))


def squash(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def count(builder):
    return lambda s: len(builder._encode(s))


def test_paragraphs_split_at_blank_lines_and_headings():
    text = "# Title\nintro line\nmore intro\n\npara two\n## Sub\nbody\n\n\n  \nlast"
    assert byo.paragraphs(text) == [(True, "# Title\nintro line\nmore intro"), (False, "para two"),
                                    (True, "## Sub\nbody"), (False, "last")]


def test_small_paragraphs_are_packed_and_nothing_is_lost(count):
    paras = [f"Paragraph {i}. " + words(40, i) + "." for i in range(60)]
    text = "\n\n".join(paras)
    chunks = byo.split_text(text, count, 300)
    assert len(chunks) > 1
    assert all(count(c) <= 300 for c in chunks)
    assert all(count(c) > 150 for c in chunks[:-1])  # packed, not one paragraph a chunk
    assert squash(" ".join(chunks)) == squash(text)
    assert all(c.startswith("Paragraph ") for c in chunks)  # cut between paragraphs


def test_headings_start_a_chunk_once_it_is_half_full(count):
    section = "# Section {i}\n\n" + "\n\n".join(words(30, j) + "." for j in range(6))
    text = "\n\n".join(section.format(i=i) for i in range(5))
    chunks = byo.split_text(text, count, 800)  # a section is ~470 tokens
    assert [c.splitlines()[0] for c in chunks] == [f"# Section {i}" for i in range(5)]
    assert squash(" ".join(chunks)) == squash(text)
    tiny = byo.split_text("# A\n\none\n\n# B\n\ntwo", count, 1000)  # small sections share a chunk
    assert tiny == ["# A\n\none\n\n# B\n\ntwo"]


def test_a_long_paragraph_is_split_at_sentences_then_words(count):
    sentences = " ".join(f"Sentence {i} says " + words(20, i) + "." for i in range(40))
    chunks = byo.split_text(sentences, count, 200)
    assert len(chunks) > 3 and all(count(c) <= 200 for c in chunks)
    assert all(c.startswith("Sentence ") and c.endswith(".") for c in chunks)
    assert squash(" ".join(chunks)) == squash(sentences)
    no_stops = words(2000)  # one paragraph, no sentence end: split at words
    chunks = byo.split_text(no_stops, count, 250)
    assert len(chunks) > 3 and all(count(c) <= 250 for c in chunks)
    assert squash(" ".join(chunks)) == squash(no_stops)
    blob = "x" * 5000  # one huge "word"
    chunks = byo.split_text(blob, count, 100)
    assert all(count(c) <= 100 for c in chunks) and "".join(chunks) == blob


def test_make_chunks_names_ids_and_default_target(builder):
    text = "\n\n".join(f"Paragraph {i}. " + words(120, i) + "." for i in range(40))
    up = byo.Uploads()
    chunks = byo.make_chunks(builder, up, "notes", text)
    n = len(chunks)
    assert n >= 2
    assert [c.name for c in chunks] == [f"upload: notes ({k}/{n})" for k in range(1, n + 1)]
    for c in chunks:
        assert list(c.ids) == builder.tokenizer.encode(c.text, add_special_tokens=False)
        assert len(c.ids) <= byo.TARGET_TOKENS
    up.add(chunks)
    again = byo.make_chunks(builder, up, "notes", "short text")
    assert [c.name for c in again] == ["upload: notes-2 (1/1)"]  # the same file again gets a name of its own
    assert builder.library.chunks and not any(n.startswith("upload") for n in builder.library.chunks)


def test_limits(builder, tmp_path):
    big = tmp_path / "big.md"
    big.write_bytes(b"a" * (byo.MAX_FILE_BYTES + 1))
    with pytest.raises(UserFacingError, match=r"big.md is 2.0 MB, over the limit of 2 MB"):
        byo.read_upload(big)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(UserFacingError, match="empty.txt is empty"):
        byo.read_upload(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(UserFacingError, match="latin.txt is not UTF-8"):
        byo.read_upload(latin)
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(b"%PDF")
    with pytest.raises(UserFacingError, match="only .txt and .md"):
        byo.read_upload(pdf)
    ok = tmp_path / "Good Notes.md"
    ok.write_text("# Hi\n\nthere")
    assert byo.read_upload(ok) == ("Good Notes", "# Hi\n\nthere")

    up = byo.Uploads()
    with pytest.raises(UserFacingError, match="empty"):
        byo.make_chunks(builder, up, "pasted", "   ")
    with pytest.raises(UserFacingError, match="separator"):
        byo.make_chunks(builder, up, "sep", "this text has the separator # #  inside it")
    many = "\n\n".join(f"# Part {i}\n\n" + words(30, i) for i in range(byo.MAX_SESSION_CHUNKS + 1))
    with pytest.raises(UserFacingError, match=f"over the limit of {byo.MAX_SESSION_CHUNKS} uploaded chunks"):
        byo.make_chunks(builder, up, "many", many, target=40)
    huge = "\n\n".join(f"Paragraph {i}. " + words(150, i) + "." for i in range(500))
    with pytest.raises(UserFacingError, match="over the limit of 65,536 tokens"):
        byo.make_chunks(builder, up, "huge", huge)
    assert up.chunks == {}  # nothing was added by a refused upload


def test_session_prompts_include_uploaded_chunks(builder):
    runtime = make_runtime(builder)
    labels = [h.spec.label for h in runtime.engines]
    up = byo.Uploads()
    up.add(byo.make_chunks(builder, up, "mine", "# Mine\n\nThe secret word is pelican."))
    name = "upload: mine (1/1)"
    shipped = next(iter(builder.library.chunks))
    turn = validate_turn(runtime, "What is the secret word?", [name, shipped], builder.library.sys_prompt, 0.0,
                         16, labels, up.ids())
    want = builder.assemble(builder.sys_ids(), [list(up.chunks[name].ids), builder.chunk_ids(shipped)],
                            builder.question_ids("What is the secret word?"))
    assert turn.prompt_ids == want and turn.chunk_names == [name, shipped]
    assert builder.context_tokens([name], None, up.ids()) == (len(builder.bos_ids) + len(builder.sys_ids())
                                                             + len(builder.sep_ids) + len(up.chunks[name].ids))
    assert "pelican" in builder.display_text([name, shipped], None, up.texts())
    # Another session (no uploads) cannot use the name.
    with pytest.raises(UserFacingError, match="Unknown chunk"):
        validate_turn(runtime, "q?", [name], builder.library.sys_prompt, 0.0, 16, labels)
    # The precompute requests have the library's shape: [BOS] + SEP + chunk.
    assert byo.precompute_requests(builder, list(up.chunks.values())) == [
        builder.bos_ids + builder.sep_ids + list(up.chunks[name].ids)]


def test_precompute_segments_stores_on_the_lmcache_engine(builder, sim_engines):
    runtime = make_runtime(builder, handles=sim_engines)
    up = byo.Uploads()
    chunks = byo.make_chunks(builder, up, "store", "\n\n".join(words(60, i) + "." for i in range(3)), target=70)
    requests = byo.precompute_requests(builder, chunks)

    async def go() -> list[int]:
        return [i async for i in runtime.precompute_segments(requests)]

    assert asyncio.run(go()) == list(range(1, len(chunks) + 1))
