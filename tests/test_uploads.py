"""Bring your own text: splitting, the limits of an upload, and prompts with a session's uploaded chunks."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import make_runtime
from pdfs import encrypt_pdf, write_image_only_pdf, write_pdf

from kvdemo import upload_budget as ub
from kvdemo import uploads as byo
from kvdemo.config import Settings, parse_settings
from kvdemo.errors import UserFacingError
from kvdemo.prompts import _contains
from kvdemo.ui.session import ChatState, validate_turn

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
    docx = tmp_path / "doc.docx"
    docx.write_bytes(b"PK\x03\x04")
    with pytest.raises(UserFacingError, match=r"doc.docx: only .txt, .md and .pdf files can be uploaded"):
        byo.read_upload(docx)
    big_pdf = tmp_path / "big.pdf"
    big_pdf.write_bytes(b"%PDF-1.4\n" + b"0" * byo.MAX_FILE_BYTES)
    with pytest.raises(UserFacingError, match=r"big.pdf is 2.0 MB, over the limit of 2 MB"):
        byo.read_upload(big_pdf)
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


def test_store_uploaded_segments_stores_on_the_lmcache_engine(builder, sim_engines):
    runtime = make_runtime(builder, handles=sim_engines)
    up = byo.Uploads()
    chunks = byo.make_chunks(builder, up, "store", "\n\n".join(words(60, i) + "." for i in range(3)), target=70)
    requests = byo.precompute_requests(builder, chunks)

    async def go() -> list[int]:
        return [i async for i in runtime.store_uploaded_segments(requests)]

    assert asyncio.run(go()) == list(range(1, len(chunks) + 1))


# ----- PDF uploads -----------------------------------------------------------------------------------

def heron_pages(n: int = 3, sentences: int = 40) -> list[str]:
    return [f"Chapter {p}\n" + " ".join(f"The heron number {p} nests at pier {p * 7 + j}." for j in range(sentences))
            for p in range(n)]


def test_a_pdf_is_read_page_by_page_and_split(builder, tmp_path):
    pages = heron_pages(4, 60)
    pdf = write_pdf(tmp_path / "Heron Field Notes.pdf", pages)
    stem, text = byo.read_upload(pdf)
    assert stem == "Heron Field Notes"
    parts = text.split("\n\n")
    assert len(parts) == 4  # a page break ends a paragraph
    for part, page in zip(parts, pages):
        assert squash(part) == squash(page)  # every word of the page, in order (fpdf2 wraps lines)
    up = byo.Uploads()
    chunks = byo.make_chunks(builder, up, stem, text, target=300)
    n = len(chunks)
    assert n > 4 and [c.name for c in chunks] == [f"upload: Heron Field Notes ({k}/{n})" for k in range(1, n + 1)]
    assert all(len(c.ids) <= 300 for c in chunks)
    assert squash(" ".join(c.text for c in chunks)) == squash(" ".join(pages))


def test_pdf_errors_each_have_their_message(tmp_path, monkeypatch):
    good = write_pdf(tmp_path / "good.pdf", heron_pages(3))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pdf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserFacingError, match=r"^truncated.pdf could not be read as a PDF \(.+\): the file is damaged "
                                              r"or not a PDF\.$"):
        byo.read_upload(truncated)
    not_pdf = tmp_path / "fake.pdf"
    not_pdf.write_text("just text, named .pdf")
    with pytest.raises(UserFacingError, match="fake.pdf could not be read as a PDF"):
        byo.read_upload(not_pdf)

    locked = encrypt_pdf(good, tmp_path / "locked.pdf", user_password="secret")
    with pytest.raises(UserFacingError, match=r"^locked.pdf is encrypted \(password-protected\): save an unprotected "
                                              r"copy and upload it again\.$"):
        byo.read_upload(locked)
    rc4 = encrypt_pdf(good, tmp_path / "locked-rc4.pdf", user_password="secret", algorithm="RC4-128")
    with pytest.raises(UserFacingError, match="locked-rc4.pdf is encrypted"):
        byo.read_upload(rc4)
    # Encrypted with an empty user password (e.g. "no copying" PDFs): anyone may open it, and so does the app.
    open_pdf = encrypt_pdf(good, tmp_path / "owner-only.pdf", user_password="")
    assert squash(byo.read_upload(open_pdf)[1]) == squash(byo.read_upload(good)[1])

    scan = write_image_only_pdf(tmp_path / "scan.pdf")
    with pytest.raises(UserFacingError, match=r"^scan.pdf has no extractable text \(scanned image\? no text layer\)"):
        byo.read_upload(scan)

    # A small file can hold much more text than its size: the text is capped like a text file.
    many = write_pdf(tmp_path / "many.pdf", heron_pages(3, 60))
    assert len(byo.pdf_text(many).encode()) > 2 * many.stat().st_size
    monkeypatch.setattr(byo, "MAX_FILE_BYTES", many.stat().st_size + 1)
    with pytest.raises(UserFacingError, match="many.pdf holds more than 0 MB of text"):
        byo.pdf_text(many)


# ----- the upload budget: KV size, ledger arithmetic ----------------------------------------------------

MISTRAL = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
           "torch_dtype": "bfloat16"}


def test_kv_bytes_per_token_from_a_model_config():
    assert ub.kv_bytes_per_token(MISTRAL) == 2 * 32 * 8 * 128 * 2 == ub.ESTIMATED_BYTES_PER_TOKEN  # 128 KiB
    assert ub.kv_bytes_per_token({**MISTRAL, "head_dim": 64}) == 2 * 32 * 8 * 64 * 2
    assert ub.kv_bytes_per_token({"text_config": MISTRAL}) == 131072  # multimodal configs nest the LM's
    no_gqa = {k: v for k, v in MISTRAL.items() if k != "num_key_value_heads"}
    assert ub.kv_bytes_per_token(no_gqa) == 2 * 32 * 32 * 128 * 2
    assert ub.kv_bytes_per_token(MISTRAL, ["--kv-cache-dtype", "fp8_e4m3"]) == 65536
    assert ub.kv_bytes_per_token(MISTRAL, ["--dtype=float32"]) == 262144
    assert ub.kv_bytes_per_token({"model_type": "mla-ish", "kv_lora_rank": 512}) is None


def test_kv_size_of_a_local_model_and_the_labelled_estimate(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**MISTRAL, "num_hidden_layers": 30}))
    local = ub.kv_size(Settings(model=str(tmp_path), simulate=True))
    assert local == ub.KvSize(2 * 30 * 8 * 128 * 2, "the model's config") and not local.estimated
    missing = ub.kv_size(Settings(model=str(tmp_path / "nowhere"), simulate=True))
    assert missing.estimated and missing.bytes_per_token == ub.ESTIMATED_BYTES_PER_TOKEN
    assert missing.text() == "128 KiB/token (estimate: no model config, assumed like Mistral-7B)"


def test_default_budget_and_the_runtime_ledger(builder, monkeypatch):
    gib = ub.GIB
    assert ub.default_budget(10 * gib, 4 * gib) == 5 * gib  # 10% margin
    assert ub.default_budget(4 * gib, 3 * gib) == gib // 2  # at least 0.5 GiB of margin
    assert ub.default_budget(4 * gib, 4 * gib) == 0  # no room left: every upload is refused
    monkeypatch.setattr(ub, "model_config", lambda s: None)  # the estimate, whatever the HF cache holds
    runtime = make_runtime(builder)
    ledger = runtime.upload_ledger
    assert runtime.upload_ledger is ledger  # one per runtime: every session shares it
    shipped_tokens = sum(map(len, runtime.precompute_prompts()))
    assert ledger.shipped_bytes == shipped_tokens * 131072
    assert ledger.cache_bytes == 10 * gib  # lmcache_configs/blend.yaml's max_local_cpu_size
    assert ledger.budget_bytes == 10 * gib - ledger.shipped_bytes - gib
    assert "upload budget 4.9 GiB (~40," in ledger.describe() and "estimate" in ledger.describe()
    fixed = make_runtime(builder, "--upload-budget-gib", "1.5").upload_ledger
    assert fixed.budget_bytes == int(1.5 * gib) and fixed.budget_text == "1.5 GiB"
    monkeypatch.setenv("KVDEMO_UPLOAD_BUDGET_GIB", "0.25")
    assert parse_settings(["--simulate"]).upload_budget_gib == 0.25
    with pytest.raises(UserFacingError, match="--upload-budget-gib must be 0"):
        parse_settings(["--simulate", "--upload-budget-gib", "-1"])


def ledger(budget_tokens: int, cache_tokens: int = 10_000, shipped_tokens: int = 4_000) -> ub.UploadLedger:
    """A ledger counted in tokens of 1 KiB each, to keep the arithmetic readable."""
    kib = 1024
    return ub.UploadLedger(budget_tokens * kib, ub.KvSize(kib, "test"), cache_tokens * kib, shipped_tokens * kib)


def test_ledger_evicts_the_oldest_chunks_of_any_session_first():
    led = ledger(1000)
    assert led.admit("A", [("upload: a (1/2)", 300), ("upload: a (2/2)", 300)]) == []
    assert led.admit("B", [("upload: b (1/1)", 200)]) == []
    assert led.used_bytes == 800 * 1024
    evicted = led.admit("B", [("upload: b2 (1/1)", 600)])  # needs 400 more: A's two oldest chunks go
    assert [(e.session, e.name) for e in evicted] == [("A", "upload: a (1/2)"), ("A", "upload: a (2/2)")]
    assert led.used_bytes == 800 * 1024
    assert led.take_evicted("B") == []
    assert led.take_evicted("A") == ["upload: a (1/2)", "upload: a (2/2)"]
    assert led.take_evicted("A") == []  # each eviction is reported once
    evicted = led.admit("A", [("upload: a3 (1/1)", 500)])  # B's oldest (200) is not enough: then b2 (600)
    assert [e.name for e in evicted] == ["upload: b (1/1)", "upload: b2 (1/1)"]
    assert led.take_evicted("B") == ["upload: b (1/1)", "upload: b2 (1/1)"]
    assert led.used_bytes == 500 * 1024
    assert led.admit("A", [("upload: a4 (1/1)", 500)]) == []  # exactly the budget fits
    assert led.used_bytes == 1000 * 1024 and led.take_evicted("A") == []


def test_an_upload_larger_than_the_budget_is_refused_and_evicts_nothing():
    led = ledger(1000)
    led.admit("A", [("upload: a (1/1)", 700)])
    with pytest.raises(UserFacingError) as exc:
        led.check("huge", 1001)
    assert str(exc.value) == ("huge would take 1 MiB of 🚀's KV cache (1,001 tokens), more than the upload budget of "
                              "1 MiB that keeps the shipped chunks cached: upload a shorter text.")
    with pytest.raises(UserFacingError, match="more than the upload budget"):
        led.admit("B", [("upload: huge (1/2)", 600), ("upload: huge (2/2)", 401)])
    assert led.used_bytes == 700 * 1024 and led.take_evicted("A") == []  # nothing was lost


def test_ledger_note_and_when_to_refresh_the_shipped_chunks():
    led = ub.UploadLedger(int(6.2 * ub.GIB), ub.KvSize(131072, "test"), 10 * ub.GIB, 3 * ub.GIB)
    assert led.note(["upload: notes (1/3)"]) == ("upload: notes (1/3) was evicted to keep the shipped chunks cached "
                                                 "(upload budget 6.2 GiB)")
    assert led.note(["x (1/2)", "x (2/2)"]).startswith("x (1/2) and x (2/2) were evicted")
    assert led.note([f"x ({i}/5)" for i in range(1, 6)]).startswith("x (1/5), x (2/5), x (3/5) and 2 more were")
    small = ledger(3000, cache_tokens=10_000, shipped_tokens=4_000)  # room for 3,000 more before LRU evicts
    small.admit("A", [("a", 2000)])
    assert not small.needs_refresh()
    small.admit("A", [("b", 1500)])  # 4,000 + 3,500 stored + a next upload of 3,000 > 10,000
    assert small.needs_refresh()


# ----- the upload flow: budget, evictions, and what the evicted session sees ---------------------------

async def steps(runtime, up, stem, text) -> list[byo.UploadStep]:
    return [s async for s in byo.add_upload(runtime, up, stem, text)]


def test_an_evicted_session_sees_a_note_when_it_next_acts(builder, sim_engines, capsys):
    runtime = make_runtime(builder, handles=sim_engines)
    text = "\n\n".join(f"# Part {i}\n\n" + words(600, i) + "." for i in range(3))
    probe = byo.make_chunks(builder, byo.Uploads(), "a", text)
    tokens = sum(len(c.ids) for c in probe)
    assert len(probe) == 3  # a chunk a part, about a third of the tokens each
    # Budget: room for 1.2 such uploads; the cache is big enough that no refresh is needed yet.
    runtime._upload_ledger = ub.UploadLedger(int(1.2 * tokens) * 1024, ub.KvSize(1024, "test"),
                                             100 * tokens * 1024, 0)
    alice, bob = byo.Uploads(), byo.Uploads()
    done = asyncio.run(steps(runtime, alice, "a", text))
    assert done[-1].changed and done[-1].line.startswith(f"✅ Added {len(probe)} chunk")
    assert "all visitors' uploads:" in done[-1].line
    picked = [probe[0].name, next(iter(builder.library.chunks))]
    bob_steps = asyncio.run(steps(runtime, bob, "b", text))
    assert "evicted" not in bob_steps[-1].line and alice.session != bob.session
    evicted = [c.name for c in probe]  # all of Alice's chunks: two thirds of them are not room enough
    assert set(alice.chunks) == set(evicted)  # Alice has not acted yet

    # Alice asks with an evicted chunk selected: refused with the note, and the chunk is off her uploads.
    with pytest.raises(UserFacingError) as exc:
        byo.check_evicted(runtime, alice, picked)
    assert str(exc.value).startswith(f"{probe[0].name} was evicted to keep the shipped chunks cached (upload budget ")
    assert str(exc.value).endswith(": remove it from the chunks and ask again.")
    assert alice.chunks == {} and set(alice.evicted) == set(evicted)
    assert byo.check_evicted(runtime, alice, picked[1:]) is None  # without it: fine, and the note was shown
    assert byo.kept_selection(alice, picked, builder.library.chunks) == picked[1:]

    # Bob's next upload (about half as big) evicts his own oldest chunks: his status says so, by the new ones.
    c_text = "\n\n".join(f"# Section {i}\n\n" + words(560, i + 5) + "." for i in range(2))
    last = asyncio.run(steps(runtime, bob, "c", c_text))[-1]
    assert last.changed and last.line.startswith("✅ Added 2 chunks from c")
    note = last.line.split("\n")[-1]
    assert note.startswith("⚠️ upload: b (1/3) and upload: b (2/3) were evicted to keep the shipped chunks cached")
    assert set(bob.chunks) == {"upload: b (3/3)", "upload: c (1/2)", "upload: c (2/2)"}
    assert "refreshed" not in capsys.readouterr().out

    # An upload over the whole budget: refused before any precompute; nothing of anyone's is evicted.
    before = (dict(bob.chunks), runtime.upload_ledger.used_bytes)
    refused = asyncio.run(steps(runtime, bob, "huge", "\n\n".join([text] * 2)))
    assert len(refused) == 1 and "more than the upload budget" in refused[0].line and not refused[0].changed
    assert (dict(bob.chunks), runtime.upload_ledger.used_bytes) == before


def test_the_page_handlers_take_evicted_chunks_off_the_pickers(builder, sim_engines):
    from kvdemo.ui.handlers import add_pasted, prepare  # the page's own event handlers

    runtime = make_runtime(builder, handles=sim_engines)
    runtime._upload_ledger = ub.UploadLedger(400 * 1024, ub.KvSize(1024, "test"), 10**9, 0)  # 400 tokens
    state = ChatState()
    up = byo.Uploads()
    shipped = next(iter(builder.library.chunks))
    outs = asyncio.run(drain(add_pasted(runtime, words(150), up, [shipped], None)))
    status, chunks, move, _ = outs[-1]
    mine = next(iter(up.chunks))
    assert status.startswith("✅ Added 1 chunk from pasted") and mine in [n for _, n in chunks["choices"]]
    assert chunks["value"] == [shipped]
    asyncio.run(drain(add_pasted(runtime, words(150, 1), byo.Uploads(), [], None)))  # another session
    # This session asks with its evicted chunk picked: one line says why, and no turn starts.
    labels = [h.spec.label for h in runtime.engines]
    _, notice, *_ = prepare(runtime, "Which words?", [mine, shipped], builder.library.sys_prompt, 0.0, 8,
                            labels, state, up)
    assert notice.startswith(f"⚠️ {mine} was evicted to keep the shipped chunks cached") and state.pending is None
    # Its next upload rebuilds the pickers without it, keeping the rest of the selection.
    outs = asyncio.run(drain(add_pasted(runtime, words(50, 2), up, [mine, shipped], mine)))
    status, chunks, move, _ = outs[-1]
    assert mine not in [n for _, n in chunks["choices"]] and chunks["value"] == [shipped] and move["value"] is None


def test_refresh_requests_touch_every_shipped_chunk_within_the_model_length(builder, sim_engines, capsys):
    runtime = make_runtime(builder, handles=sim_engines)
    requests = ub.refresh_requests(runtime)
    assert len(requests) >= 2 and all(len(r) <= runtime.max_model_len - 64 for r in requests)  # 33K shipped tokens
    head = builder.bos_ids + builder.sys_ids()
    assert all(r[:len(head)] == head for r in requests)
    for name in builder.library.chunks:  # each shipped chunk once, as a blended segment
        ids = builder.sep_ids + builder.chunk_ids(name)
        assert sum(_contains(r, ids) for r in requests) == 1, name
    assert asyncio.run(ub.refresh_shipped(runtime)) > 0
    # After an upload, once the uploads stored so far could overflow the cache, the upload refreshes them.
    runtime._upload_ledger = ub.UploadLedger(10_000 * 1024, ub.KvSize(1024, "test"), 12_000 * 1024, 1_000 * 1024)
    up = byo.Uploads()
    asyncio.run(steps(runtime, up, "small", words(100)))
    assert not runtime.upload_ledger.needs_refresh() and "refreshed" not in capsys.readouterr().out
    last = asyncio.run(steps(runtime, up, "more", words(600, 3)))[-1]
    assert last.line.startswith("✅ Added") and runtime.upload_ledger.needs_refresh()
    assert "kvdemo: after upload more: shipped chunks refreshed in LMCache's LRU" in capsys.readouterr().out


async def drain(agen) -> list:
    return [x async for x in agen]
