"""Reliability of the running demo, driven as people use it: `python app.py --simulate` and chromium.

- an engine killed while it streams: its pane shows the crash with its log tail, the other engine's answer
  completes, the status line shows the dead engine, and its Restart button brings it back (the LMCache
  engine's chunks precomputed again);
- 8 browser sessions asking at once: each sees only its own questions and answers, and the app stays
  responsive;
- UI-level mistakes: no chunks (allowed, and said so), a context over --max-model-len (refused with the
  count before anything is sent), an empty question;
- sharing safety: --auth puts Gradio's login in front of the page and of its API; binding 0.0.0.0 without
  --auth prints a warning;
- Stop while both engines answer: the partial answers stay, marked stopped, both engines see the streams
  closed, and the next question is answered normally.

Each app's teardown stops it with Ctrl-C (SIGINT) and checks that none of its processes is left.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import REPO_ROOT
from helpers import describe, free_ports, kill_all, start_app, ui_answers, wait_until
from test_browser import CHROMIUM, CHROMIUM_ARGS, _interrupt_and_check, pick

from kvdemo.simulate import _answer_words

pytestmark = pytest.mark.slow  # each test starts the app (and most drive Chromium)
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"  # screenshots of failed browser tests (git-ignored)
AUTH = ("demo-user", "s3cret-pass")
SESSIONS = 8


@dataclass
class App:
    proc: subprocess.Popen
    url: str
    ports: list[int]  # UI, LMCache engine, plain engine
    output: Path
    log_dir: Path
    pids: set[int] = field(default_factory=set)  # the app and every process under it, ever seen
    stderr: Path | None = None  # when the app's stderr goes to its own file

    def text(self) -> str:
        """stdout, then stderr when it was kept apart."""
        err = self.stderr.read_text(errors="replace") if self.stderr and self.stderr.exists() else ""
        return self.output.read_text(errors="replace") + err

    def tree(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def engine(self, port: int) -> psutil.Process:
        """The engine process serving `port` (not the app, whose own command line has --engine-ports)."""
        for p in self.tree():
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if "kvdemo.simulate" in cmd and "--port" in cmd and cmd[cmd.index("--port") + 1] == str(port):
                return p
        raise AssertionError(f"no engine process on port {port}: {describe(p.pid for p in self.tree())}")


def launch(tmp: Path, *flags: str, stderr: Path | None = None) -> App:
    ui_port, lm_port, plain_port = ports = free_ports(3)
    output = tmp / "app.out"
    proc = start_app(["--port", str(ui_port), "--engine-ports", f"{lm_port},{plain_port}", "--log-dir",
                      str(tmp / "logs"), *flags], output, stderr=stderr)
    app = App(proc, f"http://127.0.0.1:{ui_port}/", ports, output, tmp / "logs", stderr=stderr)
    try:
        wait_until(lambda: proc.poll() is not None or ui_answers(app.url), 120, "the UI to answer")
        assert proc.poll() is None, f"app exited with {proc.returncode}:\n{app.text()[-3000:]}"
        app.pids = {proc.pid, *(p.pid for p in app.tree())}
    except BaseException:
        kill_all(p.pid for p in app.tree())
        proc.kill()
        proc.wait(timeout=10)
        raise
    return app


def stop(app: App) -> None:
    """Ctrl-C; then nothing of the app may be left and its ports must be free (test_browser's check)."""
    app.pids |= {p.pid for p in app.tree()}  # engines restarted by a test are new processes
    _interrupt_and_check(app)


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Iterator[App]:
    """Simulated delays at full length (--sim-speed 1): an answer streams for about a second."""
    a = launch(tmp_path_factory.mktemp("app"), "--simulate", "--sim-speed", "1")
    yield a
    stop(a)


@pytest.fixture(scope="module")
def slow_app(tmp_path_factory) -> Iterator[App]:
    """--sim-speed 0.5: answers stream at 30 tokens/s (the longest, 64 tokens, for ~2 s): time to click Stop."""
    a = launch(tmp_path_factory.mktemp("slow-app"), "--simulate", "--sim-speed", "0.5")
    yield a
    stop(a)


@pytest.fixture(scope="module")
def locked_app(tmp_path_factory) -> Iterator[App]:
    """--auth on all interfaces (no sharing warning then), and a small context limit."""
    a = launch(tmp_path_factory.mktemp("locked-app"), "--simulate", "--sim-speed", "4", "--auth", ":".join(AUTH),
               "--server-name", "0.0.0.0", "--max-model-len", "4096")
    yield a
    stop(a)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium fonts-noto-color-emoji)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Pages:
    """Browser contexts (one per user session) that are closed, and checked for JavaScript errors, at the end."""

    def __init__(self, browser, request) -> None:
        self.browser, self.request = browser, request
        self.contexts: list = []
        self.errors: list[str] = []

    def new(self, url: str, wait_for_ui: bool = True):
        context = self.browser.new_context(viewport={"width": 1400, "height": 1000})
        self.contexts.append(context)
        pg = context.new_page()
        pg.set_default_timeout(30_000)
        pg.on("pageerror", lambda exc: self.errors.append(str(exc)))
        pg.goto(url, wait_until="commit" if not wait_for_ui else "load")
        if wait_for_ui:
            pg.locator("#chunks input[role=combobox]").wait_for()
        return pg

    def many(self, url: str, n: int) -> list:
        """n sessions, loading at the same time."""
        pgs = [self.new(url, wait_for_ui=False) for _ in range(n)]
        for pg in pgs:
            pg.locator("#chunks input[role=combobox]").wait_for()
        return pgs

    def close(self) -> None:
        report = getattr(self.request.node, "rep_call", None)
        if report is not None and report.failed:  # what the pages showed when the test failed
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            for i, context in enumerate(self.contexts):
                for pg in context.pages:
                    pg.screenshot(path=str(ARTIFACTS / f"{self.request.node.name}-{i}.png"), full_page=True)
        for context in self.contexts:
            context.close()


@pytest.fixture
def pages(browser, request):
    p = Pages(browser, request)
    yield p
    p.close()
    assert not p.errors, f"JavaScript errors in the page: {p.errors}"


# ----- page helpers --------------------------------------------------------------------------------

def text(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def answers(page, key: str) -> int:
    """Completed answers in a pane: each ends with its `TTFT x s` line."""
    return len(re.findall(r"TTFT \d", text(page, f"#chat-{key}")))


def wait_for_answers(page, lmcache: int, plain: int, timeout_ms: int = 60_000) -> None:
    page.wait_for_function(
        """([lm, pl]) => {
               const n = s => (document.querySelector(s).innerText.match(/TTFT \\d/g) || []).length;
               return n('#chat-lmcache') === lm && n('#chat-plain') === pl;
           }""", arg=[lmcache, plain], timeout=timeout_ms)


def ask(page, question: str) -> None:
    page.locator("#question textarea").fill(question)
    page.locator("#ask").click()


def wait_healthy(page) -> None:
    wait_until(lambda: text(page, "#status").count("✅ healthy") == 2, 60,
               f"both engines healthy in #status ({text(page, '#status')!r})", interval=0.2)


def long_answer_question(builder, candidates: list[str]) -> str:
    """The candidate whose simulated answer is longest (deterministic per prompt): the widest window to kill
    an engine while it streams."""
    names = builder.default_selection(16_000, 32_768 - 512)
    return max(candidates, key=lambda q: len(_answer_words(builder.build(names, q), 128, False)))


# ----- an engine dies mid-answer ---------------------------------------------------------------------

@pytest.mark.browser
def test_engine_killed_mid_answer_then_restarted(app, pages, builder):
    page = pages.new(app.url)
    wait_healthy(page)
    page.locator("#status").get_by_text("precomputed").wait_for(timeout=60_000)
    _, lm_port, plain_port = app.ports
    plain = app.engine(plain_port)
    question = long_answer_question(builder, [f"What does section {i} say about names?" for i in range(12)])

    ask(page, question)
    page.wait_for_function("() => document.querySelector('#chat-plain').innerText.includes('[SIMULATED]')",
                           timeout=30_000)
    plain.kill()  # SIGKILL: a crash, not a clean stop
    assert answers(page, "plain") == 0, "the plain answer finished before its engine was killed"

    # Its pane says it crashed and shows the last lines of its log; the other answer completes.
    page.locator("#chat-plain").get_by_text("crashed").wait_for()
    pane = text(page, "#chat-plain")
    assert "Restart" in pane and "last lines of its log" in pane, pane
    last_log_line = (app.log_dir / "plain.log").read_text(errors="replace").strip().splitlines()[-1]
    assert last_log_line.strip() in pane, f"log tail {last_log_line!r} not in the pane:\n{pane}"
    assert "Traceback" not in pane
    wait_for_answers(page, 1, 0)
    assert re.search(r"TTFT [\d.]+ s", text(page, "#stats-lmcache")), text(page, "#stats-lmcache")
    assert text(page, "#stats-plain").strip() == ""
    # The status line (refreshed every 2 s) shows the dead engine.
    page.locator("#status").get_by_text("❌ stopped").wait_for(timeout=15_000)
    assert re.search(r"🐢 plain vLLM: ❌ stopped \(exit -9\)", text(page, "#status")), text(page, "#status")

    # Restart 🐢: back, healthy, and both engines answer the next question.
    page.locator("#restart-plain").click()
    page.locator("#notice").get_by_text("restarted").wait_for(timeout=60_000)
    assert app.engine(plain_port).pid != plain.pid
    wait_healthy(page)
    ask(page, "And after the restart?")
    wait_for_answers(page, 2, 1)

    # Restart 🚀: its chunks are precomputed again before the notice says it is back.
    finished_run = r"(?:precompute|warm-up) (\d+)/\1 "  # the last line of a whole precompute run
    precomputes = len(re.findall(finished_run, app.text()))
    old_lmcache = app.engine(lm_port).pid
    page.locator("#restart-lmcache").click()
    page.locator("#notice").get_by_text("precomputed again").wait_for(timeout=60_000)
    assert app.engine(lm_port).pid != old_lmcache
    assert len(re.findall(finished_run, app.text())) == precomputes + 1, app.text()[-2000:]
    wait_healthy(page)
    n = len(builder.library.chunks) + 1  # the system prompt and every chunk
    page.locator("#status").get_by_text(f"precomputed {n} segments").wait_for(timeout=15_000)  # refreshed every 2 s
    ask(page, "And after restarting the LMCache engine?")
    wait_for_answers(page, 3, 2)
    assert "crashed" not in text(page, "#chat-lmcache")


# ----- many users at once ----------------------------------------------------------------------------

@pytest.mark.browser
def test_eight_sessions_ask_at_once(app, pages):
    sessions = pages.many(app.url, SESSIONS)
    wait_healthy(sessions[0])
    questions = [f"Question number {k}: what is special about topic {k * 7}?" for k in range(SESSIONS)]
    for page, q in zip(sessions, questions):
        page.locator("#question textarea").fill(q)
    t0 = time.monotonic()
    for page in sessions:
        page.locator("#ask").click()

    # While 16 answers stream, the server still answers a fresh page load promptly.
    sessions[-1].wait_for_function("() => document.querySelector('#chat-plain').innerText.includes('[SIMULATED]')")
    t_probe = time.monotonic()
    assert httpx.get(app.url, timeout=10).status_code == 200
    probe_s = time.monotonic() - t_probe
    for page in sessions:
        wait_for_answers(page, 1, 1, timeout_ms=90_000)
    total_s = time.monotonic() - t0
    print(f"\n{SESSIONS} sessions answered by both engines in {total_s:.1f} s; page load while busy {probe_s:.2f} s")

    for k, page in enumerate(sessions):
        for key in ("lmcache", "plain"):
            pane = text(page, f"#chat-{key}")
            assert questions[k] in pane and "[SIMULATED]" in pane, f"session {k} #chat-{key}: {pane}"
            others = [q for j, q in enumerate(questions) if j != k and f"Question number {j}:" in pane]
            assert not others, f"session {k} #chat-{key} shows another session's question: {others}"
            assert pane.count("Question number") == 1, pane
            assert "⚠️" not in pane, pane
        assert "Still answering" not in text(page, "#notice")
    assert total_s < 60, f"{SESSIONS} concurrent sessions took {total_s:.1f} s"
    assert probe_s < 5, f"the UI took {probe_s:.1f} s to answer while busy"


# ----- mistakes in the page --------------------------------------------------------------------------

@pytest.mark.browser
def test_no_chunks_answers_from_the_question_alone(app, pages):
    page = pages.new(app.url)
    wait_healthy(page)
    page.locator("#chunks .remove-all").click()
    page.locator("#context-info").get_by_text("(no chunks: question only)").wait_for()
    ask(page, "What is Python, in one sentence?")
    page.locator("#notice").get_by_text("answering from the question alone").wait_for()
    wait_for_answers(page, 1, 1)


@pytest.mark.browser
def test_login_required_with_auth(locked_app, pages):
    # Neither the page's config nor its API answer without a login.
    for path in ("config", "gradio_api/info"):
        r = httpx.get(locked_app.url + path, timeout=10)
        assert r.status_code == 401, f"/{path} answered {r.status_code} without a login"
    r = httpx.post(locked_app.url + "gradio_api/call/context_info", json={"data": [[], ""]}, timeout=10)
    assert r.status_code == 401, f"the API answered {r.status_code} without a login"

    page = pages.new(locked_app.url, wait_for_ui=False)
    login = page.get_by_role("button", name="Login")
    login.wait_for()
    assert page.locator("#question").count() == 0

    page.locator("input[type=text]").fill(AUTH[0])
    page.locator("input[type=password]").fill("wrong-" + AUTH[1])
    login.click()
    page.get_by_text("Incorrect Credentials").wait_for()
    assert page.locator("#question").count() == 0

    page.locator("input[type=text]").fill(AUTH[0])  # the form clears both fields after a failed attempt
    page.locator("input[type=password]").fill(AUTH[1])
    login.click()
    page.locator("#question").wait_for()
    assert "kvdemo: WARNING" not in locked_app.text()  # 0.0.0.0 with --auth: nothing to warn about


@pytest.mark.browser
def test_context_over_max_model_len_is_refused_with_the_count(locked_app, pages, builder, library):
    page = pages.new(locked_app.url, wait_for_ui=False)
    page.locator("input[type=text]").fill(AUTH[0])
    page.locator("input[type=password]").fill(AUTH[1])
    page.get_by_role("button", name="Login").click()
    page.locator("#chunks input[role=combobox]").wait_for()

    page.locator("#ask").click()  # empty question
    page.locator("#notice").get_by_text("Type a question first").wait_for()

    names = builder.default_selection(16_000, 4096 - 512)
    titles = library.titles()
    unique = [n for n in library.chunks  # pick() types a title's first 14 characters: take one they single out
              if sum(t.lower().startswith(titles[n][:14].lower()) for t in titles.values()) == 1]
    extra = next(n for n in unique if n not in names)
    pick(page, "#chunks", titles[extra], multiselect=True)
    names.append(extra)
    page.locator("#context-info").get_by_text("over the limit of 4,096").wait_for()
    question = "Does this fit?"
    ask(page, question)
    n = len(builder.build(names, question))
    expected = f"Context is {n:,} tokens + 128 to generate, over the model's limit of 4,096 (--max-model-len)"
    page.locator("#notice").get_by_text(expected).wait_for()
    assert "deselect chunks or lower max tokens" in text(page, "#notice")
    for key in ("lmcache", "plain"):  # refused before sending: no turn was started
        assert question not in text(page, f"#chat-{key}") and "…" not in text(page, f"#chat-{key}")


# ----- Stop ------------------------------------------------------------------------------------------

STOPPED = re.compile(r"⏹ stopped after (\d+) tokens?")


@pytest.mark.browser
def test_stop_while_both_answer_then_ask_again(slow_app, pages, builder):
    page = pages.new(slow_app.url)
    wait_healthy(page)
    page.locator("#status").get_by_text("precomputed").wait_for(timeout=60_000)  # nothing else keeps them busy
    page.locator("#chunks .remove-all").click()  # question only: a short prefill, then the long answer
    page.locator("#context-info").get_by_text("(no chunks: question only)").wait_for()
    page.get_by_text("Generation settings").click()
    max_tokens = page.locator("#max-tokens input[type=number]")
    slider = page.locator("#max-tokens input[type=range]")

    def set_2048() -> bool:
        """Type 2048 again when the slider has not taken it (on a loaded 2-core machine the accordion can still
        be rendering when the first keystrokes arrive, and they are lost)."""
        if slider.input_value() != "2048":
            max_tokens.fill("2048")
            max_tokens.press("Enter")
            page.wait_for_timeout(500)
        return slider.input_value() == "2048"

    wait_until(set_2048, 20, "max tokens to be 2048")
    candidates = [f"What does section {i} say about names?" for i in range(12)]
    question = max(candidates, key=lambda q: len(_answer_words(builder.build([], q), 2048, False)))
    full = len(_answer_words(builder.build([], question), 2048, False))

    ask(page, question)
    page.wait_for_function("""() => ['#chat-lmcache', '#chat-plain'].every(
                                   s => document.querySelector(s).innerText.includes('[SIMULATED]'))""",
                           timeout=30_000)
    page.locator("#stop").click()

    # Both partial answers stay, marked stopped in the pane and in its stats line; no error anywhere.
    for key in ("lmcache", "plain"):
        page.locator(f"#stats-{key}").get_by_text("stopped after").wait_for()
        m = STOPPED.search(text(page, f"#stats-{key}"))
        assert m and 1 <= int(m.group(1)) < full, text(page, f"#stats-{key}")
        pane = text(page, f"#chat-{key}")
        assert question in pane and "[SIMULATED]" in pane and m.group(0) in pane, pane
        assert "TTFT" not in pane and "⚠️" not in pane, pane
        # The engine saw the client close the stream mid-answer (the simulator's log, as vLLM aborts then).
        log = slow_app.log_dir / f"{key}.log"
        wait_until(lambda log=log: "client disconnected after" in log.read_text(errors="replace"), 15,
                   f"{key}'s engine to log the disconnect")
    assert page.locator(".toast-body").count() == 0, page.locator(".toast-body").all_inner_texts()
    assert "⚠️" not in text(page, "#notice"), text(page, "#notice")

    # Stop with nothing streaming changes nothing; the next question is answered normally.
    before = [text(page, s) for s in ("#chat-lmcache", "#chat-plain", "#stats-lmcache", "#stats-plain")]
    page.locator("#stop").click()
    ask(page, "And in one sentence?")
    wait_for_answers(page, 1, 1)
    for key, earlier in zip(("lmcache", "plain"), before):
        pane = text(page, f"#chat-{key}")
        assert pane.startswith(earlier.rstrip()) or earlier.strip() in pane, (earlier, pane)
        assert pane.count("⏹ stopped") == 1 and "And in one sentence?" in pane, pane
        assert re.search(r"TTFT [\d.]+ s", text(page, f"#stats-{key}")), text(page, f"#stats-{key}")
        assert "stopped" not in text(page, f"#stats-{key}")
    assert page.locator(".toast-body").count() == 0
    assert "Traceback" not in slow_app.text(), slow_app.text()[-3000:]


# ----- sharing without a login -----------------------------------------------------------------------

def test_all_interfaces_without_auth_prints_a_warning(tmp_path):
    a = launch(tmp_path, "--simulate", "--sim-speed", "20", "--server-name", "0.0.0.0", stderr=tmp_path / "err")
    try:
        warnings = [ln for ln in a.output.read_text(errors="replace").splitlines() if "WARNING" in ln]  # stdout
        assert any(ln.startswith("kvdemo: WARNING") and "--auth" in ln and "0.0.0.0" in ln for ln in warnings), \
            a.text()[-3000:]
    finally:
        stop(a)
