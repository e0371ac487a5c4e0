"""Prompt assembly with the bundled tokenizer and the real data/ library: the token-id layout LMCache needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvdemo.errors import UserFacingError
from kvdemo.prompts import DEFAULT_SEPARATOR, SHOWN_SEPARATOR, ChunkLibrary, PromptBuilder

SEP_IDS = [938, 938, 223]  # " # # " with the bundled tokenizer, minus the BOS
QUESTION = "How does Python resolve names in a class body?"


def find(haystack: list[int], needle: list[int], start: int = 0) -> int:
    """Index of the first occurrence of needle in haystack at or after start, or -1."""
    n = len(needle)
    for i in range(start, len(haystack) - n + 1):
        if haystack[i:i + n] == needle:
            return i
    return -1


def split_on(ids: list[int], sep: list[int]) -> list[list[int]]:
    out, start = [], 0
    while (i := find(ids, sep, start)) >= 0:
        out.append(ids[start:i])
        start = i + len(sep)
    out.append(ids[start:])
    return out


def test_separator_ids_as_lmcache_computes_them(tokenizer, builder):
    assert list(tokenizer.encode(DEFAULT_SEPARATOR))[1:] == SEP_IDS
    assert builder.sep_ids == SEP_IDS
    assert builder.bos_ids == [tokenizer.bos_token_id]


def test_library_is_the_real_corpus(library):
    assert len(library.chunks) >= 10
    assert library.sys_prompt
    assert all(c.text and c.title for c in library.chunks.values())
    assert list(library.chunks) == sorted(library.chunks)  # file order is library order


def test_build_splices_chunks_unchanged_in_given_order(builder, library):
    names = list(library.chunks)[:4][::-1]  # not library order: order must follow the list given
    ids = builder.build(names, QUESTION)
    assert ids[0] == builder.bos_ids[0]
    segments = split_on(ids, SEP_IDS)
    # [BOS]+sys | c1 | ... | cN | question: a separator between every two pieces, none inside them.
    assert len(segments) == len(names) + 2
    assert segments[0] == builder.bos_ids + builder.sys_ids()
    for seg, name in zip(segments[1:-1], names):
        assert seg == builder.chunk_ids(name), f"chunk {name} is not spliced verbatim"
    assert segments[-1] == builder.question_ids(QUESTION)
    # Each chunk's own ids appear verbatim, at increasing positions (= the given order).
    positions = [find(ids, builder.chunk_ids(n)) for n in names]
    assert all(p > 0 for p in positions) and positions == sorted(positions)


def test_chunk_ids_are_the_chunk_tokenized_on_its_own(builder, tokenizer, library):
    name = next(iter(library.chunks))
    assert builder.chunk_ids(name) == tokenizer.encode(library.chunks[name].text, add_special_tokens=False)


def test_question_is_last_and_counts_match(builder, library):
    names = list(library.chunks)[2:5]
    ids = builder.build(names, QUESTION)
    q = builder.question_ids(QUESTION)
    assert ids[-len(q):] == q
    assert ids[-len(q) - len(SEP_IDS):-len(q)] == SEP_IDS
    assert builder.context_tokens(names) == len(ids) - len(q) - len(SEP_IDS)
    expected = 1 + len(builder.sys_ids()) + sum(len(SEP_IDS) + len(builder.chunk_ids(n)) for n in names)
    assert builder.context_tokens(names) == expected
    assert len(builder.build([], QUESTION)) == 1 + len(builder.sys_ids()) + len(SEP_IDS) + len(q)


def test_question_ends_with_the_chat_template_suffix(builder, tokenizer):
    # The bundled tokenizer has Mistral's template: [INST] ... [/INST]
    assert builder.prefix.strip() == "[INST]" and builder.suffix.strip() == "[/INST]"
    assert tokenizer.decode(builder.question_ids(QUESTION)).rstrip().endswith("[/INST]")
    assert tokenizer.decode(builder.sys_ids()).lstrip().startswith("[INST]")


def test_edited_system_prompt_changes_only_the_first_segment(builder, library):
    names = list(library.chunks)[:2]
    a = split_on(builder.build(names, QUESTION), SEP_IDS)
    b = split_on(builder.build(names, QUESTION, sys_prompt="Answer in one word."), SEP_IDS)
    assert a[0] != b[0] and a[1:] == b[1:]


def test_precompute_prompts_layout(builder, library):
    names = list(library.chunks)[:3]
    prompts = builder.precompute_prompts(names)
    assert len(prompts) == len(names) + 1
    assert prompts[0] == builder.bos_ids + builder.sys_ids()
    for prompt, name in zip(prompts[1:], names):
        assert prompt == builder.bos_ids + SEP_IDS + builder.chunk_ids(name)
    custom = builder.precompute_prompts(names, sys_prompt="Be brief.")
    assert custom[0] == builder.bos_ids + builder.sys_ids("Be brief.") and custom[1:] == prompts[1:]


def test_display_text_shows_separators(builder, library):
    names = list(library.chunks)[:3]
    text = builder.display_text(names)
    assert text.count(SHOWN_SEPARATOR) == len(names)
    assert "# #" in SHOWN_SEPARATOR
    parts = text.split(SHOWN_SEPARATOR)
    assert parts[0] == library.sys_prompt
    assert parts[1:] == [library.chunks[n].text for n in names]
    assert builder.display_text([]) == library.sys_prompt


def test_default_selection_reaches_a_long_context(builder, library):
    names = builder.default_selection(16_000, 32_768 - 512)
    assert names == list(library.chunks)[:len(names)]  # library order
    assert builder.context_tokens(names) >= 16_000
    assert builder.context_tokens(names[:-1]) < 16_000  # stops as soon as it is long enough
    small = builder.default_selection(16_000, 6_000)  # never over the limit
    assert small and builder.context_tokens(small) + 64 <= 6_000


def test_unknown_chunk_is_a_user_facing_error(builder):
    with pytest.raises(UserFacingError, match="Unknown chunk 'nope'"):
        builder.build(["nope"], QUESTION)


# ----- ChunkLibrary.load errors ------------------------------------------------------------------

def make_data(tmp_path: Path, chunks: dict[str, bytes], sys_prompt: bytes | None = b"Be helpful.") -> Path:
    data = tmp_path / "data"
    (data / "chunks").mkdir(parents=True)
    if sys_prompt is not None:
        (data / "sys_prompt.txt").write_bytes(sys_prompt)
    for name, content in chunks.items():
        (data / "chunks" / name).write_bytes(content)
    return data


def test_load_small_library(tmp_path):
    lib = ChunkLibrary.load(make_data(tmp_path, {"b.txt": b"# Second\ntext b", "a.txt": "plain text é".encode()}))
    assert list(lib.chunks) == ["a", "b"]
    assert lib.titles() == {"a": "a", "b": "Second"}
    assert lib.sys_prompt == "Be helpful."


def test_load_missing_dir(tmp_path):
    with pytest.raises(UserFacingError, match=r"Missing .*sys_prompt\.txt.*--data-dir"):
        ChunkLibrary.load(tmp_path / "does-not-exist")


def test_load_no_chunks(tmp_path):
    with pytest.raises(UserFacingError, match=r"No chunk files in .*chunks.*add \*\.txt"):
        ChunkLibrary.load(make_data(tmp_path, {}))


def test_load_empty_chunk(tmp_path):
    data = make_data(tmp_path, {"a.txt": b"# A\nfine", "empty.txt": b"  \n\n"})
    with pytest.raises(UserFacingError, match=r"Chunk file .*empty\.txt is empty"):
        ChunkLibrary.load(data)


def test_load_non_utf8_chunk(tmp_path):
    data = make_data(tmp_path, {"latin1.txt": "caf\u00e9 cr\u00e8me".encode("latin-1")})
    with pytest.raises(UserFacingError, match=r"latin1\.txt is not UTF-8 text \(byte 3\)"):
        ChunkLibrary.load(data)


def test_load_non_utf8_sys_prompt(tmp_path):
    data = make_data(tmp_path, {"a.txt": b"text"}, sys_prompt=b"\xff\xfe bad")
    with pytest.raises(UserFacingError, match=r"sys_prompt\.txt is not UTF-8"):
        ChunkLibrary.load(data)


def test_separator_inside_a_chunk_is_reported(tokenizer, tmp_path, caplog):
    lib = ChunkLibrary.load(make_data(tmp_path, {"a.txt": b"before # #  after"}))
    b = PromptBuilder(tokenizer, lib)
    b.chunk_ids("a")
    assert "contains the separator" in caplog.text


def test_page_selection_fills_the_configured_context(tokenizer, library):
    """--context-tokens sets how long the page's default selection is; --max-model-len still caps it."""
    long = PromptBuilder(tokenizer, library, default_context_tokens=30_000)
    names = long.page_selection(32_768)
    assert long.context_tokens(names) >= 30_000 and long.context_tokens(names) + 64 <= 32_768 - 512
    assert long.context_tokens(PromptBuilder(tokenizer, library).page_selection(32_768)) < 30_000
    capped = long.page_selection(8_192)
    assert capped and long.context_tokens(capped) + 64 <= 8_192 - 512
