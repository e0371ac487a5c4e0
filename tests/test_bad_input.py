"""Bad input and a bad environment: each gets one clear message that says what to do, never a traceback.

Start-up problems are tested as a person meets them, with `python app.py ...` in a subprocess: the exit code
is non-zero and stderr has exactly one `kvdemo: ...` line naming the problem and the fix. A gated model
without (or with a useless) HF_TOKEN is tested in-process against the Hub check, which is monkeypatched
(there is no network here). Mistakes made in the page go through `validate_turn`, as the page's callback
does (the browser side of them is in test_reliability_browser.py).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import psutil
import pytest
from conftest import LABELS, REPO_ROOT, make_runtime
from helpers import app_env, free_ports

from kvdemo.config import Settings
from kvdemo.errors import UserFacingError
from kvdemo.preflight import check_model
from kvdemo.ui.session import MAX_TEMPERATURE, validate_turn

GATED_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def run_app(tmp_path: Path, *args: str, ports: list[int] | None = None) -> subprocess.CompletedProcess:
    """`python app.py` with its own free ports and log dir, so nothing of a real setup is touched."""
    ui_port, lm_port, plain_port = ports or free_ports(3)
    argv = [sys.executable, "app.py", "--port", str(ui_port), "--engine-ports", f"{lm_port},{plain_port}",
            "--log-dir", str(tmp_path / "logs"), *args]
    return subprocess.run(argv, cwd=REPO_ROOT, env=app_env(), capture_output=True, text=True, timeout=120,
                          check=False)


def assert_one_clear_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, no traceback, and exactly one `kvdemo: ` line on stderr that contains every needle."""
    everything = r.stdout + r.stderr
    assert r.returncode != 0, f"exit code 0:\n{everything[-3000:]}"
    assert "Traceback" not in everything, everything[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("kvdemo: ")]
    assert len(lines) == 1, f"expected one 'kvdemo: ' line on stderr:\n{r.stderr[-3000:]}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def data_copy(tmp_path) -> Path:
    """A copy of data/ that a test may break."""
    return Path(shutil.copytree(REPO_ROOT / "data", tmp_path / "data"))


# ----- start-up: data, config, ports, model -----------------------------------------------------------

def test_missing_data_dir(tmp_path):
    missing = tmp_path / "no-such-data"
    r = run_app(tmp_path, "--simulate", "--data-dir", str(missing))
    assert_one_clear_line(r, f"Missing {missing / 'sys_prompt.txt'}", "--data-dir")


def test_chunk_file_that_is_not_utf8(tmp_path, data_copy):
    bad = data_copy / "chunks" / "99-latin1.txt"
    bad.write_bytes("# Caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    r = run_app(tmp_path, "--simulate", "--data-dir", str(data_copy))
    assert_one_clear_line(r, str(bad), "is not UTF-8", "fix or remove it")


def test_empty_chunk_file(tmp_path, data_copy):
    empty = data_copy / "chunks" / "99-empty.txt"
    empty.write_text("  \n\n")
    r = run_app(tmp_path, "--simulate", "--data-dir", str(data_copy))
    assert_one_clear_line(r, f"Chunk file {empty} is empty", "remove it or put text in it")


def test_bad_yaml_lmcache_config(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("chunk_size: 256\nenable_blending: [true\nblend_special_str: ' # # '\n")
    r = run_app(tmp_path, "--simulate", "--lmcache-config", str(config))
    assert_one_clear_line(r, f"LMCache config {config} is not valid YAML (line", "fix the file")


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A socket listening on 127.0.0.1, as another server would."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s


@pytest.mark.parametrize("which", ["UI port", "engine port"])
def test_port_already_in_use(tmp_path, listener, which):
    busy = listener.getsockname()[1]
    ui_port, lm_port, plain_port = free_ports(3)
    ports = [busy, lm_port, plain_port] if which == "UI port" else [ui_port, lm_port, busy]
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    r = run_app(tmp_path, "--simulate", ports=ports)
    if which == "UI port":
        assert_one_clear_line(r, f"UI port {busy} is already in use", "stop whatever uses it", "--port")
    else:
        assert_one_clear_line(r, f"engine port (🐢 plain vLLM) {busy} is already in use", "an engine left from",
                              "--engine-ports")
    assert "started" not in r.stderr  # refused before any engine was started
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def test_model_dir_that_does_not_exist(tmp_path):
    missing = tmp_path / "no-such-model"
    r = run_app(tmp_path, "--simulate", "--model", str(missing))
    assert_one_clear_line(r, f"Model directory {missing} does not exist", "fix --model")


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine would start real engines")
def test_no_gpu_and_no_simulate_suggests_simulate(tmp_path):
    r = run_app(tmp_path)
    assert_one_clear_line(r, "No NVIDIA GPU found", "python app.py --simulate")


# ----- a gated model without access (Hub check monkeypatched: no network here) --------------------------

def _gated_error():
    from huggingface_hub.errors import GatedRepoError

    try:  # huggingface_hub >= 1.0 builds its errors from an httpx2 (or httpx) response
        import httpx2 as http
    except ImportError:
        import httpx as http
    url = f"https://huggingface.co/api/models/{GATED_MODEL}/auth-check"
    response = http.Response(403, request=http.Request("GET", url))
    return GatedRepoError(f"Access to model {GATED_MODEL} is restricted.", response=response)


@pytest.fixture
def gated_hub(monkeypatch) -> list[str | None]:
    """The Hub says the model is gated for whatever token is sent; records the tokens it was asked with."""
    tokens: list[str | None] = []

    def auth_check(repo_id: str, *, token=None, **_kw) -> None:
        tokens.append(token)
        raise _gated_error()

    monkeypatch.setattr(huggingface_hub, "auth_check", auth_check)
    return tokens


def test_gated_model_without_hf_token(gated_hub):
    with pytest.raises(UserFacingError) as exc:
        check_model(Settings(model=GATED_MODEL, hf_token=None))
    msg = str(exc.value)
    assert gated_hub == [None]
    assert "gated model" in msg and "no HF_TOKEN is set" in msg, msg
    assert f"huggingface.co/{GATED_MODEL}" in msg and "export HF_TOKEN=" in msg, msg


def test_gated_model_with_a_token_without_access(gated_hub):
    with pytest.raises(UserFacingError) as exc:
        check_model(Settings(model=GATED_MODEL, hf_token="hf_not_granted"))
    msg = str(exc.value)
    assert gated_hub == ["hf_not_granted"]
    assert "gated model" in msg and "HF_TOKEN has no access to it" in msg, msg
    assert f"accept its licence on huggingface.co/{GATED_MODEL}" in msg, msg


# ----- mistakes in the page: what the Ask button's callback gets from validate_turn ----------------------

@pytest.fixture
def runtime(builder):
    return make_runtime(builder)


def _turn(runtime, question="What is a closure?", names=None, temperature=0.0, max_tokens=128):
    names = builder_default(runtime) if names is None else names
    return validate_turn(runtime, question, names, runtime.library.sys_prompt, temperature, max_tokens, LABELS)


def builder_default(runtime) -> list[str]:
    return runtime.builder.default_selection(16_000, runtime.settings.max_model_len - 512)


def test_no_chunks_is_allowed_and_said(runtime):
    t = _turn(runtime, names=[])
    assert t.note == "No chunks selected: answering from the question alone (nothing to reuse)."
    assert t.prompt_ids == runtime.builder.build([], "What is a closure?", runtime.library.sys_prompt)


@pytest.mark.parametrize("question", ["", "  \n "])
def test_empty_question(runtime, question):
    with pytest.raises(UserFacingError, match="^Type a question first.$"):
        _turn(runtime, question=question)


def test_context_longer_than_max_model_len_shows_the_count(builder):
    runtime = make_runtime(builder, "--max-model-len", "4096")
    names = builder_default(runtime)
    names += [next(n for n in runtime.library.chunks if n not in names)]
    n = len(builder.build(names, "What is a closure?"))
    assert n > 4096 - 128
    with pytest.raises(UserFacingError) as exc:
        _turn(runtime, names=names)
    assert str(exc.value) == (f"Context is {n:,} tokens + 128 to generate, over the model's limit of 4,096 "
                              "(--max-model-len): deselect chunks or lower max tokens.")


@pytest.mark.parametrize("temperature", [-0.5, MAX_TEMPERATURE + 0.5, 100, None])
def test_temperature_out_of_range(runtime, temperature):
    with pytest.raises(UserFacingError, match=f"^Temperature must be between 0 and {MAX_TEMPERATURE}.$"):
        _turn(runtime, temperature=temperature)


def test_unknown_chunk(runtime):
    """A chunk name the page sent that the server does not know (a stale page after the data changed)."""
    with pytest.raises(UserFacingError, match="^Unknown chunk '99-gone': reload the page.$"):
        _turn(runtime, names=["01-data-model", "99-gone"])
