"""kvdemo.offline on CPU: arguments, engine-args mapping, prompt assembly, bad input, and the session's flow.

vLLM and LMCache are not installed here. The CLI must reject bad input before it imports either (an
import blocker records any attempt), and the engine flow (env before import, engine kwargs, skip_save on
questions, baseline before precompute, shutdown) runs against a FAKE `vllm` module put into sys.modules —
it checks what kvdemo.offline asks of vLLM, not vLLM itself.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.abc
import importlib.metadata
import json
import os
import shutil
import signal
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import yaml

from kvdemo import offline, preflight
from kvdemo.config import SIM_TOKENIZER_DIR
from kvdemo.errors import UserFacingError
from kvdemo.prompts import ChunkLibrary, PromptBuilder, read_chunk

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = REPO_ROOT / "data"
CHUNK_A = DATA / "chunks" / "01-data-model.txt"
CHUNK_B = DATA / "chunks" / "06-names-scopes.txt"
SEP_IDS = [938, 938, 223]  # " # # " with the bundled tokenizer, minus the BOS
QUESTION = "How are names bound in a class body?"
FAKE_GPU = preflight.Gpu(0, "NVIDIA H100 80GB HBM3", 81559)
ENGINE_ENV_KEYS = ("KVDEMO_LMCACHE_PLUGIN", "LMCACHE_CONFIG_FILE", "PYTHONHASHSEED",
                   "VLLM_USE_FLASHINFER_SAMPLER", "VLLM_NO_USAGE_STATS", "HF_HUB_OFFLINE")


def split_on(ids: list[int], sep: list[int]) -> list[list[int]]:
    out, start, i = [], 0, 0
    while i <= len(ids) - len(sep):
        if ids[i:i + len(sep)] == sep:
            out.append(ids[start:i])
            i += len(sep)
            start = i
        else:
            i += 1
    out.append(ids[start:])
    return out


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A local "model" directory: the bundled tokenizer plus a config.json with a 32K context."""
    path = tmp_path / "model"
    shutil.copytree(SIM_TOKENIZER_DIR, path)
    (path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"],
                                                  "max_position_embeddings": 32768}))
    return path


class _ImportBlocker(importlib.abc.MetaPathFinder):
    """Records and refuses any import of vllm/lmcache (not installed on CI; must not even be tried)."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname.partition(".")[0] in ("vllm", "lmcache"):
            self.attempts.append(fullname)
            raise ImportError(f"test blocks importing {fullname}")
        return None


@pytest.fixture
def blocker(monkeypatch):
    for name in [m for m in sys.modules if m.partition(".")[0] in ("vllm", "lmcache")]:
        monkeypatch.delitem(sys.modules, name)
    finder = _ImportBlocker()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    return finder


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setattr(preflight, "detect_gpus", lambda: [FAKE_GPU])


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(preflight, "detect_gpus", list)  # nvidia-smi lists nothing


def _entry_points(installed: bool):
    def entry_points(group: str | None = None, **_: Any) -> list:
        if installed and group == offline.PLUGIN_GROUP:
            return [SimpleNamespace(name=offline.PLUGIN_NAME, value=offline.PLUGIN_TARGET, group=group)]
        return []
    return entry_points


@pytest.fixture
def plugin(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "entry_points", _entry_points(True))
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)


@pytest.fixture
def clean_env(monkeypatch):
    """The engine variables unset, so a test can see that a session sets and then restores them."""
    for key in ENGINE_ENV_KEYS:
        monkeypatch.delenv(key, raising=False)


def cli(model_dir: Path, *chunks: Path | str) -> list[str]:
    """--model/--chunks/--question, the arguments every CLI test starts from."""
    return ["--model", str(model_dir), "--chunks", *map(str, chunks), "--question", QUESTION]


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    rc = offline.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("kvdemo.offline: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------------------------------
# Arguments and engine-args mapping
# --------------------------------------------------------------------------------------------------


def test_parser_defaults_and_required_flags():
    argv = ["--model", "m", "--chunks", "a.txt", "b.txt", "--question", "q"]
    args = offline.build_parser().parse_args(argv)
    assert args.model == "m" and args.chunks == [Path("a.txt"), Path("b.txt")] and args.question == "q"
    assert args.config == REPO_ROOT / "lmcache_configs" / "offline.yaml"
    assert args.sys_prompt_file == REPO_ROOT / "data" / "sys_prompt.txt"
    assert (args.max_tokens, args.repeats) == (128, 3)
    assert args.max_model_len is None and args.gpu_memory_utilization is None
    assert not args.json and not args.dry_run and args.engine_args == "" and args.output is None


@pytest.mark.parametrize("argv", [
    ["--chunks", "a.txt"],  # no --question
    ["--question", "q"],  # no --chunks
    ["--chunks", "a.txt", "--question", "q", "--repeats", "0"],
    ["--chunks", "a.txt", "--question", "q", "--max-tokens", "many"],
    ["--chunks", "a.txt", "--question", "q", "--max-model-len", "-5"],
])
def test_parser_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        offline.build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_engine_args_mapping():
    assert offline.parse_engine_args("--load-format dummy --enforce-eager") == {
        "load_format": "dummy", "enforce_eager": True}
    kwargs = offline.parse_engine_args(
        "--max-num-seqs 4 --gpu-memory-utilization=0.5 --no-enable-prefix-caching --dtype bfloat16 "
        "--seed -1 --hf-overrides '{\"rope_theta\": 1e6}' --trust-remote-code")
    assert kwargs == {"max_num_seqs": 4, "gpu_memory_utilization": 0.5, "enable_prefix_caching": False,
                      "dtype": "bfloat16", "seed": -1, "hf_overrides": {"rope_theta": 1e6},
                      "trust_remote_code": True}
    assert offline.parse_engine_args(["--enforce-eager", "--max-model-len", "8192"]) == {
        "enforce_eager": True, "max_model_len": 8192}
    assert offline.parse_engine_args("") == {} and offline.parse_engine_args(None) == {}


@pytest.mark.parametrize("text, fragment", [
    ("dummy", "expected a --flag"),
    ("-tp 2", "expected a --flag"),
    ("--load-format dummy extra", "expected a --flag"),
    ("--kv-transfer-config {broken", "does not parse"),
    ("--bad!name 1", "not a valid flag name"),
])
def test_engine_args_errors(text, fragment):
    with pytest.raises(UserFacingError, match=fragment):
        offline.parse_engine_args(text)


def test_engine_kwargs_carry_the_blending_settings():
    extra = {"load_format": "dummy", "enforce_eager": True, "max_model_len": 8192}
    kw = offline.build_engine_kwargs("m", extra)
    assert kw == {"model": "m",
                  "kv_transfer_config": {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"},
                  "enable_prefix_caching": False, "attention_backend": "FLASH_ATTN",
                  "disable_log_stats": False, **extra}
    # attention_config and attention_backend are mutually exclusive in vLLM 0.22.
    kw = offline.build_engine_kwargs("m", {"attention_config": {"backend": "FLASH_ATTN"}})
    assert "attention_backend" not in kw and kw["attention_config"] == {"backend": "FLASH_ATTN"}
    with pytest.raises(UserFacingError, match="--model"):
        offline.build_engine_kwargs("m", {"model": "other"})


def test_engine_kwargs_override_of_a_blending_setting_warns(caplog):
    kw = offline.build_engine_kwargs("m", {"enable_prefix_caching": True})
    assert kw["enable_prefix_caching"] is True
    assert "blending may not work" in caplog.text


def test_engine_env_matches_the_server_engine(model_dir):
    relative = Path("lmcache_configs/offline.yaml")
    env = offline.engine_env(relative, str(model_dir))
    assert env == {"KVDEMO_LMCACHE_PLUGIN": "1", "LMCACHE_CONFIG_FILE": str(relative.resolve()),
                   "PYTHONHASHSEED": "0", "VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_NO_USAGE_STATS": "1",
                   "HF_HUB_OFFLINE": "1"}
    assert Path(env["LMCACHE_CONFIG_FILE"]).is_absolute()  # a relative path would depend on the cwd
    hub = offline.engine_env(offline.DEFAULT_CONFIG, "mistralai/Mistral-7B-Instruct-v0.2")
    assert "HF_HUB_OFFLINE" not in hub and hub["KVDEMO_LMCACHE_PLUGIN"] == "1"


def test_skip_save_goes_into_kv_transfer_params():
    assert offline.with_skip_save(None) == {"kv_transfer_params": {"lmcache.skip_save": True}}
    extra = {"other": 1, "kv_transfer_params": {"lmcache.tag": "x"}}
    assert offline.with_skip_save(extra) == {"other": 1, "kv_transfer_params": {"lmcache.tag": "x",
                                                                                "lmcache.skip_save": True}}
    assert extra == {"other": 1, "kv_transfer_params": {"lmcache.tag": "x"}}  # not mutated


def test_ttft_from_request_metrics():
    with_metrics = SimpleNamespace(metrics=SimpleNamespace(first_token_latency=0.25))
    assert offline.ttft_from_output(with_metrics) == 0.25
    assert offline.ttft_from_output(SimpleNamespace(metrics=None)) is None
    assert offline.ttft_from_output(SimpleNamespace(metrics=SimpleNamespace(first_token_latency=0.0))) is None
    assert offline.ttft_from_output(SimpleNamespace()) is None


def test_offline_yaml_carries_the_example_settings():
    cfg = yaml.safe_load((REPO_ROOT / "lmcache_configs" / "offline.yaml").read_text())
    assert cfg == {"chunk_size": 256, "local_cpu": True, "max_local_cpu_size": 5, "enable_blending": True,
                   "blend_special_str": " # # ", "use_layerwise": True, "blend_check_layers": [1],
                   "blend_recompute_ratios": [0.15], "blend_min_tokens": 64, "min_retrieve_tokens": 1024}
    server = yaml.safe_load((REPO_ROOT / "lmcache_configs" / "blend.yaml").read_text())
    assert {k: v for k, v in cfg.items() if k != "max_local_cpu_size"} == {
        k: v for k, v in server.items() if k != "max_local_cpu_size"}


def test_plugin_check(monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.setattr(importlib.metadata, "entry_points", _entry_points(False))
    assert "pip install -e ." in offline.plugin_problem()
    monkeypatch.setattr(importlib.metadata, "entry_points", _entry_points(True))
    assert offline.plugin_problem() is None
    monkeypatch.setenv("VLLM_PLUGINS", "someone_else")
    assert "VLLM_PLUGINS" in offline.plugin_problem()
    monkeypatch.setenv("VLLM_PLUGINS", "someone_else,kvdemo_lmcache")
    assert offline.plugin_problem() is None


def test_model_context_limit_from_config_json(model_dir):
    assert offline.model_context_limit(str(model_dir)) == 32768
    (model_dir / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 4096}}))
    assert offline.model_context_limit(str(model_dir)) == 4096
    (model_dir / "config.json").write_text("{}")
    assert offline.model_context_limit(str(model_dir)) is None


# --------------------------------------------------------------------------------------------------
# Prompt assembly (the server path's PromptBuilder, bundled tokenizer)
# --------------------------------------------------------------------------------------------------


def test_prompt_is_the_server_paths_prompt(tokenizer):
    """Same files + same question → the exact ids the app sends its LMCache engine."""
    sys_prompt = offline.read_sys_prompt(DATA / "sys_prompt.txt")
    built = offline.ChunkPrompts(tokenizer, sys_prompt).build([CHUNK_B, CHUNK_A], QUESTION)
    server = PromptBuilder(tokenizer, ChunkLibrary.load(DATA))
    assert built.prompt == server.build([CHUNK_B.stem, CHUNK_A.stem], QUESTION)
    assert built.precompute == server.precompute_prompts([CHUNK_B.stem, CHUNK_A.stem])


def test_prompt_layout_and_counts(tokenizer):
    prompts = offline.ChunkPrompts(tokenizer, "You answer from the sections below.")
    p = prompts.build([CHUNK_A, CHUNK_B], QUESTION)
    bos = [tokenizer.bos_token_id]
    a_ids = tokenizer.encode(read_chunk(CHUNK_A).text, add_special_tokens=False)
    b_ids = tokenizer.encode(read_chunk(CHUNK_B).text, add_special_tokens=False)
    assert p.chunk_names == [CHUNK_A.stem, CHUNK_B.stem]
    assert split_on(p.prompt, SEP_IDS) == [bos + p.sys_ids, a_ids, b_ids, p.question_ids]
    assert p.precompute == [bos + p.sys_ids, bos + SEP_IDS + a_ids, bos + SEP_IDS + b_ids]
    assert tokenizer.decode(p.sys_ids).lstrip().startswith("[INST]")  # chat template prefix
    assert tokenizer.decode(p.question_ids).rstrip().endswith("[/INST]")
    b = p.breakdown()
    assert b["chunks"] == [len(a_ids), len(b_ids)] and b["separators"] == 3 * len(SEP_IDS)
    parts = b["bos"] + b["system"] + sum(b["chunks"]) + b["separators"] + b["question"]
    assert parts == b["total"] == len(p.prompt)
    assert f"{b['total']} tokens" in p.describe()


def test_chunks_as_text_path_or_chunk_objects(tokenizer, tmp_path):
    prompts = offline.ChunkPrompts(tokenizer, "System.")
    chunk = read_chunk(CHUNK_A)
    by_path = prompts.build([CHUNK_A], QUESTION)
    by_obj = prompts.build([chunk], QUESTION)
    by_text = prompts.build([chunk.text], QUESTION)
    assert by_path.prompt == by_obj.prompt == by_text.prompt
    assert by_text.chunk_names[0].startswith("text-")
    with pytest.raises(TypeError, match="not one chunk"):
        prompts.build("just one string", QUESTION)  # type: ignore[arg-type]
    with pytest.raises(UserFacingError, match="empty text"):
        prompts.build(["   "], QUESTION)


def test_same_file_name_in_two_folders_stays_two_chunks(tokenizer, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("# Alpha\nThe first folder's notes about apples.")
    (tmp_path / "b" / "notes.txt").write_text("# Beta\nThe second folder's notes about bananas.")
    p = offline.ChunkPrompts(tokenizer, "System.").build(
        [tmp_path / "a" / "notes.txt", tmp_path / "b" / "notes.txt"], QUESTION)
    assert len(set(p.chunk_names)) == 2
    texts = [tokenizer.decode(ids) for ids in p.chunk_ids]
    assert "apples" in texts[0] and "bananas" in texts[1]


def test_empty_question_or_system_prompt_or_no_chunks(tokenizer):
    prompts = offline.ChunkPrompts(tokenizer, "")
    with pytest.raises(UserFacingError, match="system prompt is empty"):
        prompts.build([CHUNK_A], QUESTION)
    with pytest.raises(UserFacingError, match="question is empty"):
        prompts.build([CHUNK_A], "  ", sys_prompt="S.")
    with pytest.raises(UserFacingError, match="No chunks"):
        prompts.build([], QUESTION, sys_prompt="S.")


def test_check_fits_counts(tokenizer):
    p = offline.ChunkPrompts(tokenizer, "System.").build([CHUNK_A], QUESTION)
    offline.check_fits(p, 16, p.total + 16)  # exactly fits
    offline.check_fits(p, 16, None)  # unknown limit: checked after the engine starts
    with pytest.raises(UserFacingError) as exc:
        offline.check_fits(p, 16, p.total + 15, "--max-model-len")
    msg = str(exc.value)
    assert f"{p.total} tokens" in msg and f"needs {p.total + 16} tokens" in msg
    assert f"allows {p.total + 15} (--max-model-len)" in msg


# --------------------------------------------------------------------------------------------------
# Bad input through the real CLI: one clear line, exit 2, vLLM never imported
# --------------------------------------------------------------------------------------------------


def test_missing_chunk_file(capsys, blocker, model_dir, no_gpu):
    rc, out, err = run_main(capsys, *cli(model_dir, CHUNK_A, "data/chunks/nope.txt"))
    assert rc == 2 and out == ""
    assert one_line_error(err) == ("kvdemo.offline: Chunk file data/chunks/nope.txt does not exist: "
                                   "check the paths given to --chunks.")
    assert blocker.attempts == []


def test_empty_chunk_file(capsys, blocker, model_dir, tmp_path, gpu):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    rc, _, err = run_main(capsys, "--model", str(model_dir), "--chunks", str(empty), "--question", QUESTION)
    assert rc == 2
    assert one_line_error(err) == f"kvdemo.offline: Chunk file {empty} is empty: remove it or put text in it."
    assert blocker.attempts == []


def test_non_utf8_chunk_file_and_directory(capsys, blocker, model_dir, tmp_path, gpu):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    rc, _, err = run_main(capsys, "--model", str(model_dir), "--chunks", str(bad), "--question", QUESTION)
    assert rc == 2 and "is not UTF-8 text" in one_line_error(err)
    rc, _, err = run_main(capsys, *cli(model_dir, tmp_path))
    assert rc == 2 and "is a directory" in one_line_error(err)
    assert blocker.attempts == []


def test_missing_sys_prompt_file(capsys, blocker, model_dir, tmp_path, gpu):
    rc, _, err = run_main(capsys, "--model", str(model_dir), "--chunks", str(CHUNK_A), "--question", QUESTION,
                          "--sys-prompt-file", str(tmp_path / "none.txt"))
    assert rc == 2 and "--sys-prompt-file" in one_line_error(err)


def test_no_gpu(capsys, blocker, model_dir, no_gpu, plugin):
    rc, out, err = run_main(capsys, *cli(model_dir, CHUNK_A))
    assert rc == 2 and out == ""
    line = one_line_error(err)
    assert line.startswith("kvdemo.offline: No NVIDIA GPU found")
    assert "offline blending needs one" in line and "`python app.py --simulate`" in line
    assert blocker.attempts == []


def test_prompt_longer_than_max_model_len(capsys, blocker, model_dir, gpu, plugin):
    rc, _, err = run_main(capsys, "--model", str(model_dir), "--chunks", str(CHUNK_A), str(CHUNK_B),
                          "--question", QUESTION, "--max-model-len", "1000", "--max-tokens", "50")
    assert rc == 2
    line = one_line_error(err)
    assert "too long" in line and "2 chunk(s)" in line and "allows 1000 (--max-model-len)" in line
    assert blocker.attempts == []


def test_prompt_longer_than_the_models_config(capsys, blocker, model_dir, gpu, plugin):
    (model_dir / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    rc, _, err = run_main(capsys, "--model", str(model_dir), "--chunks", str(CHUNK_A), str(CHUNK_B),
                          "--question", QUESTION)
    assert rc == 2 and "allows 2048 (the model's config.json)" in one_line_error(err)
    assert blocker.attempts == []


def test_plugin_not_installed(capsys, blocker, model_dir, gpu, monkeypatch):
    monkeypatch.setattr(importlib.metadata, "entry_points", _entry_points(False))
    rc, _, err = run_main(capsys, "--model", str(model_dir), "--chunks", str(CHUNK_A), "--question", QUESTION)
    assert rc == 2 and "pip install -e ." in one_line_error(err)
    assert blocker.attempts == []


@pytest.mark.parametrize("extra, fragment", [
    (["--engine-args", "dummy"], "expected a --flag"),
    (["--max-model-len", "4096", "--engine-args", "--max-model-len 2048"], "both as a flag and in"),
    (["--gpu-memory-utilization", "1.5"], "between 0.05 and 0.98"),
    (["--config", "lmcache_configs/nope.yaml"], "not found"),
    (["--question", "   "], "--question is empty"),
])
def test_bad_flags(capsys, blocker, model_dir, gpu, plugin, extra, fragment):
    argv = ["--model", str(model_dir), "--chunks", str(CHUNK_A), "--question", QUESTION, *extra]
    rc, _, err = run_main(capsys, *argv)
    assert rc == 2 and fragment in one_line_error(err)
    assert blocker.attempts == []


def test_dry_run_json_needs_no_gpu(capsys, blocker, model_dir, no_gpu, tokenizer):
    before = signal.getsignal(signal.SIGTERM)
    rc, out, err = run_main(capsys, "--model", str(model_dir), "--chunks", str(CHUNK_A), str(CHUNK_B),
                            "--question", QUESTION, "--engine-args", "--load-format dummy --enforce-eager",
                            "--dry-run", "--json")
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["dry_run"] is True and plan["chunks"] == [CHUNK_A.stem, CHUNK_B.stem]
    assert plan["engine_kwargs"]["load_format"] == "dummy" and plan["engine_kwargs"]["enforce_eager"] is True
    assert plan["engine_kwargs"]["kv_transfer_config"]["kv_connector"] == "LMCacheConnectorV1"
    assert plan["env"]["KVDEMO_LMCACHE_PLUGIN"] == "1"
    assert plan["lmcache_config"]["enable_blending"] is True
    assert plan["context_limit"] == 32768
    sys_prompt = offline.read_sys_prompt(DATA / "sys_prompt.txt")
    expected = offline.ChunkPrompts(tokenizer, sys_prompt).build([CHUNK_A, CHUNK_B], QUESTION)
    assert plan["prompt_tokens"] == expected.breakdown()
    assert plan["precompute_requests"] == [len(r) for r in expected.precompute]
    assert blocker.attempts == []
    assert signal.getsignal(signal.SIGTERM) is before


# --------------------------------------------------------------------------------------------------
# The engine flow against a FAKE vllm module
# --------------------------------------------------------------------------------------------------


class FakeSamplingParams:
    def __init__(self, temperature: float = 1.0, max_tokens: int | None = 16,
                 extra_args: dict | None = None) -> None:
        self.temperature, self.max_tokens, self.extra_args = temperature, max_tokens, extra_args

    def clone(self) -> FakeSamplingParams:
        return copy.deepcopy(self)


@dataclass
class FakeKVTransferConfig:
    kv_connector: str
    kv_role: str


@dataclass
class FakeEngineArgs:
    """The EngineArgs fields these tests use (the real class has ~200)."""

    model: str = ""
    kv_transfer_config: Any = None
    enable_prefix_caching: bool | None = None
    attention_backend: str | None = None
    disable_log_stats: bool = False
    load_format: str = "auto"
    enforce_eager: bool = False
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.92


def _contains(haystack: list[int], needle: list[int]) -> bool:
    n = len(needle)
    first = needle[0] if needle else None
    return n > 0 and any(haystack[i] == first and haystack[i:i + n] == needle
                         for i in range(len(haystack) - n + 1))


class FakeLLM:
    """Records every request; TTFT shrinks with the tokens a stored (not skip_save) request covers."""

    instances: ClassVar[list[FakeLLM]] = []
    with_metrics: ClassVar[bool] = True

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.model, self.kwargs = model, kwargs
        self.env_at_start = {k: os.environ.get(k) for k in ENGINE_ENV_KEYS}
        self.calls: list[dict] = []
        self.stored: list[list[int]] = []
        self.shutdowns = 0
        self.llm_engine = SimpleNamespace(
            model_config=SimpleNamespace(max_model_len=kwargs.get("max_model_len") or 32768),
            engine_core=SimpleNamespace(shutdown=self._shutdown))
        FakeLLM.instances.append(self)

    def _shutdown(self) -> None:
        self.shutdowns += 1

    def generate(self, prompt: dict, params: FakeSamplingParams, use_tqdm: bool = True) -> list:
        assert use_tqdm is False
        ids = list(prompt["prompt_token_ids"])
        kv = (params.extra_args or {}).get("kv_transfer_params") or {}
        skip = bool(kv.get("lmcache.skip_save"))
        reused = sum(len(seg) - 1 for seg in self.stored if _contains(ids, seg[1:]))
        ttft = 1e-4 * (len(ids) - 0.85 * min(reused, len(ids)))
        self.calls.append({"ids": ids, "max_tokens": params.max_tokens, "skip_save": skip})
        if not skip:
            self.stored.append(ids)
        os.write(1, b"fake engine noise on fd 1\n")  # what vLLM's logs and engine-core process do
        completion = SimpleNamespace(text=f"fake answer over {len(ids)} tokens", token_ids=[7] * 3,
                                     finish_reason="length")
        metrics = SimpleNamespace(first_token_latency=ttft) if self.with_metrics else None
        return [SimpleNamespace(outputs=[completion], metrics=metrics, prompt_token_ids=ids)]


@pytest.fixture
def fake_vllm(monkeypatch, plugin):
    """A fake vllm (+ empty lmcache) package in sys.modules; yields the FakeLLM class."""
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, FakeSamplingParams
    config = types.ModuleType("vllm.config")
    config.KVTransferConfig = FakeKVTransferConfig
    engine = types.ModuleType("vllm.engine")
    arg_utils = types.ModuleType("vllm.engine.arg_utils")
    arg_utils.EngineArgs = FakeEngineArgs
    for name, module in {"vllm": vllm, "vllm.config": config, "vllm.engine": engine,
                         "vllm.engine.arg_utils": arg_utils, "lmcache": types.ModuleType("lmcache")}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(FakeLLM, "instances", [])
    monkeypatch.setattr(FakeLLM, "with_metrics", True)
    return FakeLLM


def test_cli_run_with_fake_vllm(capfd, fake_vllm, model_dir, gpu, clean_env, tmp_path):
    out_file = tmp_path / "results" / "offline.json"
    rc = offline.main([*cli(model_dir, CHUNK_A, CHUNK_B), "--repeats", "2",
                       "--engine-args", "--load-format dummy --enforce-eager", "--max-tokens", "32",
                       "--json", "--output", str(out_file)])
    out, err = capfd.readouterr()
    assert rc == 0, err
    record = json.loads(out)  # stdout is the JSON alone: engine output on fd 1 went to stderr
    assert "fake engine noise on fd 1" in err and "fake engine noise" not in out
    assert json.loads(out_file.read_text()) == record

    [llm] = fake_vllm.instances
    # Engine: blending settings + pass-through args; env set before vLLM was "imported" and started.
    assert llm.model == str(model_dir)
    assert llm.kwargs["kv_transfer_config"] == FakeKVTransferConfig("LMCacheConnectorV1", "kv_both")
    assert llm.kwargs["enable_prefix_caching"] is False and llm.kwargs["attention_backend"] == "FLASH_ATTN"
    assert llm.kwargs["load_format"] == "dummy" and llm.kwargs["enforce_eager"] is True
    assert llm.kwargs["disable_log_stats"] is False
    assert llm.env_at_start["KVDEMO_LMCACHE_PLUGIN"] == "1"
    assert llm.env_at_start["LMCACHE_CONFIG_FILE"] == str(REPO_ROOT / "lmcache_configs" / "offline.yaml")
    assert llm.env_at_start["PYTHONHASHSEED"] == "0"
    assert llm.env_at_start["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    # Clean exit: shut down once, env restored.
    assert llm.shutdowns == 1
    assert all(k not in os.environ for k in ENGINE_ENV_KEYS)

    # Request order: warm-up (3 kinds), baseline x2, precompute (sys + 2 chunks), blended x2.
    sys_prompt = offline.read_sys_prompt(DATA / "sys_prompt.txt")
    tok = offline.load_tokenizer(str(model_dir))
    expected = offline.ChunkPrompts(tok, sys_prompt).build([CHUNK_A, CHUNK_B], QUESTION)
    real = [i for i, c in enumerate(llm.calls) if c["ids"] == expected.prompt]
    pre = [i for i, c in enumerate(llm.calls) if c["ids"] in expected.precompute]
    assert len(real) == 4 and len(pre) == 3
    assert real[:2] == [pre[0] - 2, pre[0] - 1] and real[2:] == [pre[-1] + 1, pre[-1] + 2]
    assert all(i < real[0] for i in range(len(llm.calls)) if i not in real + pre)  # warm-up comes first
    assert [llm.calls[i]["ids"] for i in pre] == expected.precompute  # sys first, then chunks in order
    assert all(llm.calls[i]["skip_save"] and llm.calls[i]["max_tokens"] == 32 for i in real)
    assert all(not llm.calls[i]["skip_save"] and llm.calls[i]["max_tokens"] == 1 for i in pre)
    # Nothing of the real prompt was stored before the baseline (warm-up used its own system text).
    assert not any(_contains(expected.prompt, s[1:]) for s in llm.stored[:len(llm.stored) - 3])

    assert record["ttft_source"] == offline.TTFT_FROM_METRICS
    assert len(record["baseline_ttft_runs_s"]) == len(record["blended_ttft_runs_s"]) == 2
    assert record["baseline_ttft_s"] > record["blended_ttft_s"] > 0
    assert record["speedup"] == pytest.approx(record["baseline_ttft_s"] / record["blended_ttft_s"])
    assert record["prompt_tokens"] == expected.breakdown()
    assert record["precompute"]["requests"] == 3 and record["weights"] == "dummy"
    assert record["device"] == FAKE_GPU.name and record["answer"].startswith("fake answer")
    assert "noise" in record["note"]


def test_cli_text_report(capsys, fake_vllm, model_dir, gpu, clean_env):
    rc, out, err = run_main(capsys, *cli(model_dir, CHUNK_A), "--repeats", "1")
    assert rc == 0, err
    assert "Answer (blended):\nfake answer" in out
    assert "TTFT full prefill (baseline):" in out and "TTFT blended:" in out and "Speedup: " in out
    assert offline.TTFT_FROM_METRICS in out


def test_session_api_and_wall_clock_fallback(fake_vllm, model_dir, tokenizer, clean_env):
    fake_vllm.with_metrics = False
    with offline.BlendSession(str(model_dir), tokenizer=tokenizer, sys_prompt="Use the sections.",
                              check_gpu=False, max_tokens=8, load_format="dummy") as session:
        [llm] = fake_vllm.instances
        assert os.environ["KVDEMO_LMCACHE_PLUGIN"] == "1"
        pre = session.precompute([CHUNK_A, "A chunk given as text, long enough to matter."])
        assert pre.requests == 3
        result = session.generate(None, [CHUNK_A, "A chunk given as text, long enough to matter."], QUESTION)
        assert result.ttft_source == offline.TTFT_FROM_WALL_CLOCK and result.ttft_s > 0
        # No metrics and max_tokens 8: the TTFT comes from an extra 1-token run of the same prompt.
        assert [(c["max_tokens"], c["skip_save"]) for c in llm.calls[-2:]] == [(8, True), (1, True)]
        assert llm.calls[-1]["ids"] == llm.calls[-2]["ids"]
        assert result.prompt_tokens == len(llm.calls[-1]["ids"]) and result.output_tokens == 3
    assert llm.shutdowns == 1 and "KVDEMO_LMCACHE_PLUGIN" not in os.environ
    session.close()  # twice is fine
    assert llm.shutdowns == 1
    with pytest.raises(RuntimeError, match="closed"):
        session.generate("S.", [CHUNK_A], QUESTION)


def test_session_refuses_too_long_prompt_after_start(fake_vllm, model_dir, tokenizer, clean_env):
    with offline.BlendSession(str(model_dir), tokenizer=tokenizer, sys_prompt="S.", check_gpu=False,
                              max_model_len=600) as session:
        with pytest.raises(UserFacingError, match="engine allows 600"):
            session.generate(None, [CHUNK_A], QUESTION)
        assert fake_vllm.instances[0].calls == []


def test_session_unknown_engine_argument(fake_vllm, model_dir, tokenizer, clean_env):
    with pytest.raises(UserFacingError, match="--no-such-flag"):
        offline.BlendSession(str(model_dir), tokenizer=tokenizer, check_gpu=False, no_such_flag=1)
    assert fake_vllm.instances == [] and "KVDEMO_LMCACHE_PLUGIN" not in os.environ


def test_session_without_gpu_fails_before_importing_vllm(blocker, no_gpu, model_dir, tokenizer, clean_env):
    with pytest.raises(UserFacingError, match="No NVIDIA GPU found"):
        offline.BlendSession(str(model_dir), tokenizer=tokenizer)
    assert blocker.attempts == [] and "KVDEMO_LMCACHE_PLUGIN" not in os.environ


def test_session_without_vllm_installed(blocker, gpu, plugin, model_dir, tokenizer, clean_env):
    with pytest.raises(UserFacingError, match="vllm is not installed"):
        offline.BlendSession(str(model_dir), tokenizer=tokenizer)


def test_close_destroys_an_in_process_lmcache_engine(fake_vllm, model_dir, tokenizer, clean_env, monkeypatch):
    destroyed: list[str] = []
    cache_engine = types.ModuleType("lmcache.v1.cache_engine")
    cache_engine.LMCacheEngineBuilder = SimpleNamespace(destroy=destroyed.append)
    utils = types.ModuleType("lmcache.integration.vllm.utils")
    utils.ENGINE_NAME = "vllm-instance"
    for name in ("lmcache.v1", "lmcache.integration", "lmcache.integration.vllm"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "lmcache.v1.cache_engine", cache_engine)
    monkeypatch.setitem(sys.modules, "lmcache.integration.vllm.utils", utils)
    offline.BlendSession(str(model_dir), tokenizer=tokenizer, check_gpu=False).close()
    assert destroyed == ["vllm-instance"]


def test_separator_must_match_the_config(fake_vllm, model_dir, tokenizer, clean_env):
    prompts = offline.ChunkPrompts(tokenizer, "S.", separator=" ## ")
    with pytest.raises(UserFacingError, match="blend_special_str"):
        offline.BlendSession(str(model_dir), prompts=prompts, check_gpu=False)


def test_result_record_fields_are_json(fake_vllm, model_dir, gpu, clean_env, capsys):
    rc, out, _ = run_main(capsys, "--model", str(model_dir), "--chunks", str(CHUNK_A), "--question", QUESTION,
                          "--repeats", "1", "--json")
    assert rc == 0
    record = json.loads(out)
    for key in ("model", "weights", "device", "versions", "lmcache_config", "engine_kwargs", "prompt_tokens",
                "baseline_ttft_s", "blended_ttft_s", "speedup", "ttft_source", "answer", "precompute",
                "warm_up_s", "startup_s", "engine_max_model_len"):
        assert key in record, key
    assert dataclasses.is_dataclass(offline.GenerateResult)
