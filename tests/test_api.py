"""The scriptable endpoint /ask, called with gradio_client as a user's script would, against `python app.py
--simulate` in a subprocess (its own simulated engines, precomputed as at a real start); and the API lists
/ask alone: the page's own events are private.

Input mistakes are also checked by calling ui/api.py's `ask` directly (no engines needed to refuse them).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import SIM_MAX_MODEL_LEN, make_runtime
from gradio_client import Client
from gradio_client.exceptions import AppError
from helpers import free_ports, start_app, stop_app, ui_answers, wait_until

from kvdemo.errors import UserFacingError
from kvdemo.ui.api import ask
from kvdemo.ui.session import validate_turn

SIM_SPEED = "4"
QUESTION = "How does Python resolve a name used inside a class body?"
CHUNKS = ["09-functions-classes", "06-names-scopes"]  # not the library's order: 🚀 blends them in any order
PRECOMPUTED = re.compile(r"precompute: \d+ requests in")


@dataclass
class App:
    proc: subprocess.Popen
    url: str
    output: Path
    client: Client | None = None

    def text(self) -> str:
        return self.output.read_text(errors="replace")


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Iterator[App]:
    tmp = tmp_path_factory.mktemp("api-app")
    ui_port, lm_port, plain_port = free_ports(3)
    output = tmp / "app.out"
    proc = start_app(["--simulate", "--sim-speed", SIM_SPEED, "--port", str(ui_port), "--engine-ports",
                      f"{lm_port},{plain_port}", "--log-dir", str(tmp / "logs")], output)
    a = App(proc, f"http://127.0.0.1:{ui_port}/", output)
    pids = {proc.pid}
    try:
        wait_until(lambda: proc.poll() is not None or (ui_answers(a.url) and PRECOMPUTED.search(a.text())), 120,
                   "the UI to answer and the precompute to finish")
        assert proc.poll() is None, f"app exited with {proc.returncode}:\n{a.text()[-3000:]}"
        pids |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        a.client = Client(a.url, verbose=False, download_files=False, analytics_enabled=False)
        yield a
    finally:
        stop_app(proc, pids, a.text)
    assert "Traceback" not in a.text(), a.text()[-3000:]


def call(app: App, *args):
    return app.client.predict(*args, api_name="/ask")


@pytest.mark.slow  # the module's app: python app.py --simulate
def test_ask_answers_on_both_engines_in_the_chosen_order(app, builder, library):
    r = call(app, QUESTION, CHUNKS, "", 0.0, 24)
    sys_prompt = library.sys_prompt  # "" = the default one
    n_context = builder.context_tokens(CHUNKS, sys_prompt)
    assert r["question"] == QUESTION and r["chunks"] == CHUNKS and r["context_tokens"] == n_context
    assert r["simulated"] is True and r["note"] == ""
    for key, label in (("lmcache", "🚀 vLLM + LMCache (SIMULATED)"), ("plain", "🐢 plain vLLM (SIMULATED)")):
        e = r[key]
        assert e["label"] == label and e["error"] is None, e
        assert e["answer"].startswith("[SIMULATED]") and e["ttft_s"] > 0 and e["decode_tok_s"] > 0
        assert e["prompt_tokens"] == len(builder.build(CHUNKS, QUESTION, sys_prompt))
    # Greedy, same token ids: the simulated engines give the same answer.
    assert r["lmcache"]["answer"] == r["plain"]["answer"]
    # 🚀 reuses both precomputed chunks in this order (all but the separators and the question);
    # 🐢 only the system prompt, the one prefix it has seen.
    assert r["lmcache"]["cached_tokens"] > 0.95 * n_context
    assert r["plain"]["cached_tokens"] < len(builder.bos_ids + builder.sys_ids(sys_prompt)) + 32
    assert r["speedup"] == pytest.approx(r["plain"]["ttft_s"] / r["lmcache"]["ttft_s"])


@pytest.mark.slow  # the module's app: python app.py --simulate
def test_a_default_client_gets_the_answer_and_default_chunks(app, builder, library, tmp_path):
    """gradio_client as README shows it: download_files on (its default) takes any dict with a string "path"
    for a file and downloads it, so /ask's answer must have none (its telemetry field is "mode")."""
    client = Client(app.url, verbose=False, download_files=str(tmp_path))  # the default, in a test's folder
    r = client.predict(QUESTION, CHUNKS, "", 0.0, 16, api_name="/ask")
    telemetry = r["lmcache"]["lmcache_telemetry"]
    assert telemetry is not None and telemetry["mode"] == "blend" and "path" not in telemetry, telemetry
    assert r["speedup"] == pytest.approx(r["plain"]["ttft_s"] / r["lmcache"]["ttft_s"])
    # Only the question: the page's default selection, system prompt, temperature and max tokens.
    r = client.predict(QUESTION, api_name="/ask")
    assert r["chunks"] == builder.page_selection(SIM_MAX_MODEL_LEN) and r["max_tokens"] == 128 and r["temperature"] == 0.0
    assert r["context_tokens"] == builder.context_tokens(r["chunks"], library.sys_prompt)
    assert all(r[k]["error"] is None for k in ("lmcache", "plain"))
    assert not list(tmp_path.iterdir())  # nothing was taken for a file


@pytest.mark.slow  # the module's app: python app.py --simulate
def test_ask_with_an_edited_system_prompt_caches_it_first(app, builder):
    sys_prompt = "You answer in one short sentence, citing the section you used (test_api)."
    r = call(app, QUESTION, CHUNKS[::-1], sys_prompt, 0.5, 8)
    n_context = builder.context_tokens(CHUNKS[::-1], sys_prompt)
    assert r["context_tokens"] == n_context and r["chunks"] == CHUNKS[::-1]
    assert all(r[k]["error"] is None and r[k]["ttft_s"] > 0 for k in ("lmcache", "plain"))
    assert r["lmcache"]["cached_tokens"] > 0.95 * n_context  # the new system prompt too: it was cached first


@pytest.mark.slow  # the module's app: python app.py --simulate
def test_ask_without_chunks_answers_from_the_question_with_the_pages_note(app):
    r = call(app, QUESTION, [], None, 0.0, 8)
    assert r["note"] == "No chunks selected: answering from the question alone (nothing to reuse)."
    assert r["chunks"] == [] and all(r[k]["error"] is None for k in ("lmcache", "plain"))


@pytest.mark.slow  # the module's app: python app.py --simulate
def test_api_lists_ask_alone(app):
    for all_endpoints in (None, True):
        info = app.client.view_api(all_endpoints=all_endpoints, print_info=False, return_format="dict")
        assert list(info["named_endpoints"]) == ["/ask"] and info["unnamed_endpoints"] == {}, info
    params = info["named_endpoints"]["/ask"]["parameters"]
    assert [(p["parameter_name"], p["parameter_default"]) for p in params] == [
        ("question", None), ("chunks", None), ("sys_prompt", None), ("temperature", 0.0), ("max_tokens", 128)]
    assert [p["parameter_has_default"] for p in params] == [False, True, True, True, True]
    # The page's own events (prepare, stream, move, ...) are private: in the config, but no client may call them.
    deps = httpx.get(f"{app.url}config", timeout=10).json()["dependencies"]
    public = [d["api_name"] for d in deps if d["api_visibility"] != "private"]
    assert public == ["ask"] and len(deps) > 10
    with pytest.raises(ValueError, match="Cannot find a function"):
        app.client.predict(QUESTION, api_name="/prepare")


@pytest.mark.slow  # the module's app: python app.py --simulate
def test_bad_calls_get_the_pages_one_line_message(app, builder, library):
    runtime = make_runtime(builder)  # as the app validates (its engines planned, not started)
    every_chunk = list(library.chunks)  # over the model's limit
    for args in ((" ", CHUNKS, None, 0.0, 8), (QUESTION, every_chunk, None, 0.0, 8), (QUESTION, CHUNKS, "", 0.0, 0),
                 (QUESTION, CHUNKS, "", 2.5, 8)):
        with pytest.raises(UserFacingError) as page:  # what the page shows for the same input
            validate_turn(runtime, *args[:2], library.sys_prompt, *args[3:], [h.spec.label for h in runtime.engines])
        with pytest.raises(AppError) as api:
            call(app, *args)
        assert str(api.value) == str(page.value) and "\n" not in str(api.value)
    with pytest.raises(AppError, match=r"^Unknown chunk 'no-such-chunk': the chunks are 01-data-model, "):
        call(app, QUESTION, ["no-such-chunk"], None, 0.0, 8)
    assert "Traceback" not in app.text()


@pytest.mark.parametrize("args, message", [
    (("", ["01-data-model"]), "Type a question first."),
    ((QUESTION, 5), "Chunks must be a list of chunk names"),
    ((QUESTION, [{"name": "01-data-model"}]), "Chunks must be a list of chunk names"),
    ((QUESTION, ["01-data-model"], 3), "The system prompt must be text"),
    ((QUESTION, ["01-data-model"], None, "hot"), "Temperature must be between 0 and 2.0."),
    ((QUESTION, ["01-data-model"], None, float("nan")), "Temperature must be between 0 and 2.0."),
    ((QUESTION, ["01-data-model"], None, 0.0, 12.5), "Max tokens must be at least 1."),
    ((QUESTION, ["01-data-model"], None, 0.0, 4096), "Max tokens must be at most 2048."),
])
def test_ask_refuses_bad_input_before_any_engine(builder, args, message):
    runtime = make_runtime(builder)  # engines planned, not started: refused before any request
    with pytest.raises(UserFacingError) as exc:
        asyncio.run(ask(runtime, *args))
    assert str(exc.value).startswith(message)
