"""The whole demo as a person uses it: `python app.py --simulate` in a subprocess, driven through chromium.

One app (and its two simulated engines) serves every test of this module; its teardown interrupts the app
with SIGINT, as Ctrl-C would, and checks that no process of it is left and that every port is free again.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import REPO_ROOT
from helpers import alive, describe, free_ports, kill_all, port_is_free, wait_until

from kvdemo.ui.session import answer_agreement

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SIM_SPEED = "4"
SCREENSHOT = REPO_ROOT / "docs" / "screenshot.png"
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"  # screenshots of failed browser tests (git-ignored)
QUESTION = "How does Python resolve a name used inside a class body?"
ADDED = ["08-exceptions", "10-import-system", "13-string-formatting"]  # ~7.7K tokens on top of the default ~18K


@dataclass
class App:
    proc: subprocess.Popen
    url: str
    ports: list[int]
    output: Path
    engine_pids: dict[str, int] = field(default_factory=dict)
    pids: set[int] = field(default_factory=set)  # the app and every process under it

    def text(self) -> str:
        return self.output.read_text(errors="replace")


def _ui_answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _start(argv: list[str], **kw) -> subprocess.Popen:
    """Popen whose child takes SIGINT as Ctrl-C even when this process ignores it (e.g. a background job,
    whose SIG_IGN a child would inherit); handled signals are reset to the default on exec."""
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(argv, **kw)
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Iterator[App]:
    tmp = tmp_path_factory.mktemp("app")
    ui_port, lm_port, plain_port = ports = free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVDEMO_") and k not in ("SPACE_ID",)}
    env.update(PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    output = tmp / "app.out"
    with open(output, "wb") as out:
        proc = _start(
            [sys.executable, "app.py", "--simulate", "--sim-speed", SIM_SPEED, "--port", str(ui_port),
             "--engine-ports", f"{lm_port},{plain_port}", "--log-dir", str(tmp / "logs")],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    a = App(proc, f"http://127.0.0.1:{ui_port}/", ports, output)
    try:
        wait_until(lambda: proc.poll() is not None or _ui_answers(a.url), 120, "the UI to answer")
        assert proc.poll() is None, f"app exited with {proc.returncode}:\n{a.text()[-3000:]}"
        for key in ("lmcache", "plain"):
            m = re.search(rf"started {key} \(pid (\d+)\)", a.text())
            assert m, f"no engine start line for {key}:\n{a.text()[-3000:]}"
            a.engine_pids[key] = int(m.group(1))
        tree = psutil.Process(proc.pid).children(recursive=True)
        a.pids = {proc.pid, *(p.pid for p in tree)}
        assert set(a.engine_pids.values()) <= a.pids, describe(a.pids)
        assert len(a.pids) >= 4  # app, watchdog, two engines
        yield a
    finally:
        a.pids |= {p.pid for p in _tree(proc.pid)}  # anything started since
        _interrupt_and_check(a)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _interrupt_and_check(a: App) -> None:
    """Ctrl-C (SIGINT) must stop the app, its engines and its watchdog, and free every port."""
    a.proc.send_signal(signal.SIGINT)
    try:
        code = a.proc.wait(timeout=60)
        wait_until(lambda: not alive(a.pids), 30, "every process of the app to exit")
        wait_until(lambda: all(port_is_free(p) for p in a.ports), 30, "the UI and engine ports to be free")
    except (AssertionError, subprocess.TimeoutExpired) as exc:
        left = alive(a.pids)
        kill_all(left)
        a.proc.wait(timeout=10)
        pytest.fail(f"after SIGINT: {exc}; left running: {describe(left)}\n{a.text()[-3000:]}")
    assert code == 130, f"exit code {code} after SIGINT\n{a.text()[-3000:]}"
    out = a.text()
    assert "Traceback" not in out, out[-3000:]
    assert "stopping engines" in out


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium fonts-noto-color-emoji")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium fonts-noto-color-emoji)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, app, request):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(app.url)
    pg.locator("#chunks input[role=combobox]").wait_for()
    yield pg
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:  # what the page showed when the test failed
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


# ----- page helpers --------------------------------------------------------------------------------

def order(page) -> list[str]:
    """The chunk titles of the 'Order:' line of #context-info."""
    text = page.locator("#context-info").inner_text()
    line = next((ln for ln in text.splitlines() if ln.startswith("Order:")), "")
    return [t.strip() for t in line.removeprefix("Order:").split("→") if t.strip()]


def wait_for_order(page, titles: list[str]) -> None:
    wait_until(lambda: order(page) == titles, 15, f"the order to become {titles} (it is {order(page)})")


def pick(page, dropdown: str, title: str, multiselect: bool) -> None:
    """Type part of a title into a dropdown, wait for the matching option, and take it with Enter.

    (Enter, not a click: once the multiselect is tall, Gradio may draw the option list outside the page.)
    """
    box = page.locator(f"{dropdown} input[role=combobox]")
    box.click()
    box.press_sequentially(title[:14], delay=10)  # key by key: the single-select filters on key events
    options = page.locator(dropdown).get_by_role("option")
    wait_until(lambda: options.count() == 1 and title in options.first.inner_text(), 15,
               f"{dropdown} to offer only {title!r}")
    box.press("Enter")
    if multiselect:
        chosen = page.locator(f"{dropdown} .token").filter(has_text=title)
        wait_until(lambda: chosen.count() == 1, 15, f"{title!r} to be added to {dropdown}")
    else:
        wait_until(lambda: title in box.input_value(), 15, f"{dropdown} to show {title!r}")
    box.blur()  # closes the list (Escape would keep it from opening on the next click)


def ttft(page, key: str) -> float:
    text = page.locator(f"#stats-{key}").inner_text()
    m = re.search(r"TTFT ([\d.]+) s", text)
    assert m, f"no TTFT in #stats-{key}: {text!r}"
    return float(m.group(1))


def chart_points(page, series: str = "") -> list[tuple[int, float]]:
    """The points the TTFT chart draws (of the series whose name contains `series`), from their aria-labels:
    'context (prompt tokens): 17990; TTFT (s): 0.0975; series: 🚀 this session (SIMULATED)'."""
    labels = page.locator("#ttft-chart g.role-mark > path").evaluate_all(
        "paths => paths.map(p => p.getAttribute('aria-label') || '')")
    points = []
    for label in labels:
        m = re.fullmatch(r"context \(prompt tokens\): ([\d,]+); TTFT \(s\): ([\d.]+); series: (.+)", label)
        assert m, f"unexpected point label {label!r}"
        if series in m.group(3):
            points.append((int(m.group(1).replace(",", "")), float(m.group(2))))
    return points


REUSE = {"lmcache": re.compile(r"· ([\d,]+) of ([\d,]+) prompt tokens reused from LMCache \(SIMULATED\)\n"
                               r"🔎 LMCache reused \1 tokens, recomputed [\d,]+ \(\d+%\), computed [\d,]+ fresh · "
                               r"[\d.]+ GB KV loaded, load \+ recompute \d+ ms GPU \(SIMULATED\)$"),
         "plain": re.compile(r"· ([\d,]+) of ([\d,]+) prompt tokens reused from vLLM's prefix cache \(SIMULATED\)$")}


def reused(page, key: str) -> tuple[int, int]:
    """(reused, prompt) tokens of the pane's stats line."""
    text = page.locator(f"#stats-{key}").inner_text().strip()
    m = REUSE[key].search(text)
    assert m, f"no reuse in #stats-{key}: {text!r}"
    return int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))


def shown_answer(page, key: str) -> str:
    """The text of the last answer in #chat-{key}, without its TTFT line."""
    return page.locator(f"#chat-{key} [data-testid=bot]").last.locator(".message-content p").first.inner_text()


AGREEMENT = re.compile(r"🚀 and 🐢 (give the same answer \(\d+ tokens\)|agree on the first \d+ of \d+ answer tokens) "
                       r"\(greedy decoding; blending recomputes only part of the context, .*\) \(SIMULATED\)")


def ask_and_wait(page, question: str, answers_before: int) -> None:
    page.locator("#question textarea").fill(question)
    page.locator("#ask").click()
    n = answers_before + 1
    page.wait_for_function(
        """n => ['#chat-lmcache', '#chat-plain'].every(
               s => (document.querySelector(s).innerText.match(/TTFT \\d/g) || []).length === n)""",
        arg=n, timeout=60_000)


RECORD_JS = """() => {
    window.__snapshots = {lmcache: [], plain: []};
    for (const key of ['lmcache', 'plain']) {
        const el = document.querySelector('#chat-' + key);
        new MutationObserver(() => window.__snapshots[key].push(el.innerText))
            .observe(el, {subtree: true, childList: true, characterData: true});
    }
}"""


# ----- tests ---------------------------------------------------------------------------------------

def test_pick_reorder_ask_and_compare(page, app, builder, library):
    titles = library.titles()
    page.get_by_text("SIMULATED: no GPU").wait_for()
    assert page.locator("#sim-banner").is_visible()
    assert "SIMULATED" in page.locator("#sim-banner").inner_text()

    # The default selection: the library's first chunks, about 16K tokens.
    names = builder.default_selection(16_000, 32_768 - 512)
    assert order(page) == [titles[n] for n in names]

    # Add chunks by typing in the multiselect and picking the option.
    for name in ADDED:
        pick(page, "#chunks", titles[name], multiselect=True)
        names.append(name)
        wait_for_order(page, [titles[n] for n in names])
    tokens = f"{builder.context_tokens(names):,} tokens"
    assert tokens in page.locator("#context-info").inner_text()

    # Move the last chunk one up.
    pick(page, "#move-chunk", titles[ADDED[-1]], multiselect=False)
    page.locator("#btn-up").click()
    names[-2], names[-1] = names[-1], names[-2]
    wait_for_order(page, [titles[n] for n in names])

    # 🚀 reuses chunks only once they are precomputed.
    page.locator("#status").get_by_text("precomputed").wait_for(timeout=60_000)

    # The TTFT chart: the H100 benchmark's reference curve, and nothing of this session yet.
    chart = page.locator("#ttft-chart")
    assert chart.is_visible() and "Time to first token vs context (this session: SIMULATED)" in chart.inner_text()
    wait_until(lambda: len(chart_points(page, "benchmark (H100)")) >= 8, 15, "the benchmark curve to be drawn")
    assert chart_points(page, "this session") == []
    assert "benchmark on NVIDIA H100 80GB HBM3 (dummy weights)" in page.locator("#ttft-chart-note").inner_text()

    page.evaluate(RECORD_JS)
    ask_and_wait(page, QUESTION, 0)
    n_prompt = len(builder.build(names, QUESTION))
    prompt_tokens = f"{n_prompt:,} prompt tokens"
    for key in ("lmcache", "plain"):
        stats = page.locator(f"#stats-{key}").inner_text()
        assert "SIMULATED" in stats and prompt_tokens in stats, stats  # the ids of the order shown were sent
        # Streamed: the answer was visible, and grew, before the final TTFT line.
        snaps = page.evaluate("k => window.__snapshots[k]", key)
        partial = {s for s in snaps if "[SIMULATED]" in s and "TTFT" not in s}
        assert len({len(s) for s in partial}) >= 2, f"#chat-{key} did not stream: {snaps[-3:]}"
        assert "[SIMULATED]" in page.locator(f"#chat-{key}").inner_text()

    # Each pane says how much of its prompt its engine reused: 🚀 the precomputed chunks, from LMCache; 🐢 at
    # most the system prompt, from its prefix cache (nothing before asked this order).
    lm_reused, lm_prompt = reused(page, "lmcache")
    plain_reused, plain_prompt = reused(page, "plain")
    assert lm_prompt == plain_prompt == n_prompt
    assert lm_reused > 0.9 * n_prompt and plain_reused < 0.1 * n_prompt, (lm_reused, plain_reused)

    # The chart now has this turn's two answers, at this prompt's length, with the TTFTs the panes show.
    wait_until(lambda: len(chart_points(page, "this session")) == 2, 15, "the answers to be on the chart")
    assert chart_points(page, "🚀 this session (SIMULATED)") == [(n_prompt, pytest.approx(ttft(page, "lmcache"),
                                                                                          abs=1e-3))]
    assert chart_points(page, "🐢 this session (SIMULATED)") == [(n_prompt, pytest.approx(ttft(page, "plain"),
                                                                                          abs=1e-3))]

    # Both answered at temperature 0 (the default): how far the two answers agree, counted in tokens.
    k, m = answer_agreement(builder.tokenizer, shown_answer(page, "lmcache"), shown_answer(page, "plain"))
    assert m > 0
    line = page.locator("#agreement")
    wait_until(lambda: "🚀 and 🐢" in line.inner_text(), 15, "the agreement line to show")
    agreement = line.inner_text()
    assert line.is_visible() and AGREEMENT.fullmatch(agreement), agreement
    assert (f"give the same answer ({m} tokens)" if k == m else f"agree on the first {k} of {m} answer tokens") \
        in agreement, (k, m, agreement)

    # Reverse the order and ask again: 🐢's cached prefix is gone, 🚀 blends the cached chunks in any order.
    page.locator("#btn-reverse").click()
    names.reverse()
    wait_for_order(page, [titles[n] for n in names])
    ask_and_wait(page, QUESTION, 1)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    fast, slow = ttft(page, "lmcache"), ttft(page, "plain")
    assert fast < slow, f"reordered repeat: 🚀 TTFT {fast} s is not lower than 🐢 {slow} s"
    badge = page.locator("#speedup").inner_text()
    assert "faster" in badge and "SIMULATED" in badge, badge
    wait_until(lambda: len(chart_points(page, "this session")) == 4, 15, "the second turn to be on the chart")
    assert len(chart_points(page, "🚀 this session")) == len(chart_points(page, "🐢 this session")) == 2

    # Clear chat forgets this session's points; the benchmark stays.
    page.locator("#clear").click()
    wait_until(lambda: chart_points(page, "this session") == [], 15, "Clear chat to empty the session's points")
    assert len(chart_points(page, "benchmark (H100)")) >= 8


def test_empty_question_shows_a_notice(page):
    page.locator("#ask").click()
    page.locator("#notice").get_by_text("Type a question first").wait_for()
    assert "…" not in page.locator("#chat-lmcache").inner_text()  # no turn was started


def test_shuffle_keeps_the_same_chunks(page, library):
    before = order(page)
    page.locator("#chunks .token-remove").first.click()  # remove the first chunk with its ×
    wait_until(lambda: order(page) == before[1:], 15, "the first chunk to be removed")
    for _ in range(5):  # a shuffle can give the same order back; five in a row hardly ever do
        page.locator("#btn-shuffle").click()
        try:
            wait_until(lambda: order(page) != before[1:], 3, "a new order")
            break
        except AssertionError:
            continue
    assert sorted(order(page)) == sorted(before[1:]) and order(page) != before[1:]
    assert set(order(page)) <= set(library.titles().values())


def test_bring_your_own_text(page, browser, app, builder, library, tmp_path):
    from kvdemo import uploads as byo

    page.locator("#byo").get_by_text("Bring your own text").click()
    assert "2,000 tokens" in page.locator("#byo-info").inner_text()
    before = order(page)

    # A bad file: its message, and nothing else changes.
    empty = tmp_path / "empty.md"
    empty.write_text("\n\n")
    page.locator("#byo-file input[type=file]").set_input_files(str(empty))
    page.locator("#byo-status").get_by_text("empty.md is empty").wait_for()
    assert order(page) == before

    # A small markdown file: split, precomputed on 🚀, then offered in the picker.
    text = "\n\n".join(f"# Part {i}\n\n" + " ".join(f"The pelican number {i} lives at dock {i * 7 + j}." for j in
                                                    range(120)) for i in range(3))
    notes = tmp_path / "faq.md"
    notes.write_text(text)
    expected = byo.make_chunks(builder, byo.Uploads(), "faq", text)
    n = len(expected)
    assert n >= 2
    wait_until(lambda: page.locator("#byo-file input[type=file]").count() == 1, 15, "the file input to be ready")
    page.locator("#byo-file input[type=file]").set_input_files(str(notes))
    page.locator("#byo-status").get_by_text(f"Added {n} chunks from faq").wait_for(timeout=60_000)
    assert order(page) == before  # the selection is kept

    # One uploaded and one shipped chunk, in that order.
    while page.locator("#chunks .token-remove").count():
        page.locator("#chunks .token-remove").first.click()
    wait_for_order(page, ["(no chunks: question only)"])
    uploaded = expected[1].name
    shipped = next(iter(library.chunks))
    pick(page, "#chunks", uploaded, multiselect=True)
    pick(page, "#chunks", library.titles()[shipped], multiselect=True)
    wait_for_order(page, [uploaded, library.titles()[shipped]])
    ids = {c.name: c.ids for c in expected}
    tokens = f"{builder.context_tokens([uploaded, shipped], None, ids):,} tokens"
    assert tokens in page.locator("#context-info").inner_text()

    question = "Where does pelican number 1 live?"
    answers = page.locator("#chat-lmcache").inner_text().count("TTFT")
    ask_and_wait(page, question, answers)
    n_prompt = len(builder.build([uploaded, shipped], question, None, ids))
    lm_reused, lm_prompt = reused(page, "lmcache")
    _, plain_prompt = reused(page, "plain")
    assert lm_prompt == plain_prompt == n_prompt
    assert lm_reused > 0.8 * n_prompt, (lm_reused, n_prompt)  # the uploaded chunk was precomputed too

    # Another visitor does not see this session's uploads.
    other = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        pg = other.new_page()
        pg.goto(app.url)
        box = pg.locator("#chunks input[role=combobox]")
        box.click()
        assert pg.locator("#chunks").get_by_role("option").count() == len(library.chunks)
        box.press_sequentially("upload", delay=10)
        wait_until(lambda: pg.locator("#chunks").get_by_role("option").count() == 0, 15,
                   "no uploaded chunk to be offered to another session")
    finally:
        other.close()


def test_upload_a_pdf_then_pick_and_ask(page, app, builder, library, tmp_path):
    from pdfs import write_pdf

    from kvdemo import uploads as byo

    page.locator("#byo").get_by_text("Bring your own text").click()
    info = page.locator("#byo-info").inner_text()
    assert ".pdf" in info and "upload budget" in info and "oldest are evicted first" in info
    assert page.locator("#byo-file input[type=file]").get_attribute("accept").split(",")[-1].strip() == ".pdf"

    # A damaged PDF: its one-line message.
    whole = write_pdf(tmp_path / "whole.pdf", ["Some text."])
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(whole.read_bytes()[:400])
    page.locator("#byo-file input[type=file]").set_input_files(str(broken))
    page.locator("#byo-status").get_by_text("broken.pdf could not be read as a PDF").wait_for()

    # A real three-page PDF: its text layer, split, precomputed on 🚀, offered in the picker.
    pages = [f"Chapter {p}\n" + " ".join(f"The heron number {p} nests at pier {p * 7 + j}." for j in range(110))
             for p in range(3)]
    pdf = write_pdf(tmp_path / "hp.pdf", pages)  # a short name: `pick` types 14 characters of "upload: hp (k/n)"
    stem, text = byo.read_upload(pdf)
    expected = byo.make_chunks(builder, byo.Uploads(), stem, text)
    n = len(expected)
    assert n >= 2
    wait_until(lambda: page.locator("#byo-file input[type=file]").count() == 1, 15, "the file input to be ready")
    page.locator("#byo-file input[type=file]").set_input_files(str(pdf))
    page.locator("#byo-status").get_by_text(f"Added {n} chunks from hp").wait_for(timeout=60_000)

    while page.locator("#chunks .token-remove").count():
        page.locator("#chunks .token-remove").first.click()
    wait_for_order(page, ["(no chunks: question only)"])
    uploaded = expected[-1].name
    shipped = next(iter(library.chunks))
    pick(page, "#chunks", library.titles()[shipped], multiselect=True)
    pick(page, "#chunks", uploaded, multiselect=True)
    wait_for_order(page, [library.titles()[shipped], uploaded])

    question = "Where does heron number 2 nest?"
    answers = page.locator("#chat-lmcache").inner_text().count("TTFT")
    ask_and_wait(page, question, answers)
    ids = {c.name: c.ids for c in expected}
    n_prompt = len(builder.build([shipped, uploaded], question, None, ids))
    lm_reused, lm_prompt = reused(page, "lmcache")
    _, plain_prompt = reused(page, "plain")
    assert lm_prompt == plain_prompt == n_prompt
    assert lm_reused > 0.8 * n_prompt, (lm_reused, n_prompt)  # the PDF's chunk was precomputed too
