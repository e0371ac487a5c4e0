"""Settings from flags and KVDEMO_* env, validation, and the GPU plan."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvdemo.config import (
    DEFAULT_MODEL,
    REPO_ROOT,
    SCENARIO_NAMES,
    SIM_TOKENIZER_DIR,
    GpuSlot,
    Settings,
    parse_settings,
    plan_gpus,
)
from kvdemo.errors import UserFacingError
from kvdemo.scenarios import SCENARIOS


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No KVDEMO_*, SPACE_ID or HF_TOKEN from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("KVDEMO_") or name in ("SPACE_ID", "HF_TOKEN"):
            monkeypatch.delenv(name)


# ----- GPU plan ----------------------------------------------------------------------------------

def test_plan_one_gpu_two_engines_share_it():
    slots = plan_gpus(2, [0])
    assert slots == [GpuSlot(0, 0.45, 2), GpuSlot(0, 0.45, 2)]
    assert all(s.shared for s in slots)


def test_plan_two_gpus_one_engine_each():
    slots = plan_gpus(2, [0, 1])
    assert [s.gpu for s in slots] == [0, 1]
    assert [s.memory_fraction for s in slots] == [0.9, 0.9]
    assert not any(s.shared for s in slots)


def test_plan_uses_the_given_gpu_indices():
    assert [s.gpu for s in plan_gpus(2, [3, 5])] == [3, 5]


def test_plan_four_engines_on_one_gpu():
    slots = plan_gpus(4, [0])
    assert [s.gpu for s in slots] == [0, 0, 0, 0]
    assert [s.memory_fraction for s in slots] == [0.22] * 4  # 0.9/4 rounded down: never over-commit
    assert sum(s.memory_fraction for s in slots) <= 0.9
    assert all(s.engines_on_gpu == 4 for s in slots)


def test_plan_four_engines_on_two_gpus():
    slots = plan_gpus(4, [0, 1])
    assert [s.gpu for s in slots] == [0, 1, 0, 1]  # round-robin
    assert all(s.memory_fraction == 0.45 and s.engines_on_gpu == 2 and s.shared for s in slots)


def test_plan_three_engines_on_two_gpus_uneven():
    slots = plan_gpus(3, [0, 1])
    assert [(s.gpu, s.memory_fraction, s.engines_on_gpu) for s in slots] == [(0, 0.45, 2), (1, 0.9, 1), (0, 0.45, 2)]


def test_plan_without_gpus():
    slots = plan_gpus(2, [])
    assert all(s.gpu is None and not s.shared for s in slots)


# ----- flags -------------------------------------------------------------------------------------

def test_defaults():
    s = parse_settings([])
    assert s == Settings()
    assert (s.scenario, s.model, s.port, s.server_name, s.simulate) == ("blend", DEFAULT_MODEL, 7860, "127.0.0.1", False)
    assert s.engine_ports[:2] == [8000, 8001]
    assert s.lmcache_config_path == REPO_ROOT / "lmcache_configs" / "blend.yaml"


def test_flags():
    s = parse_settings([
        "--simulate", "--gpus", "0,1", "--port", "7000", "--engine-ports", "9000,9001",
        "--max-model-len", "16384", "--gpu-memory-utilization", "0.8", "--kv-cache-gib", "8",
        "--data-dir", "/tmp/d", "--lmcache-config", "/tmp/c.yaml", "--share", "--server-name", "0.0.0.0",
        "--auth", "me:secret:with:colons", "--attach", "http://a:1/, http://b:2", "--log-dir", "/tmp/l",
        "--engine-args", "--load-format dummy --enforce-eager", "--fairness", "sequential",
        "--health-timeout", "30", "--no-ui", "--ask", "Why?", "--sim-speed", "4",
    ])
    assert s.simulate and s.share and s.no_ui
    assert s.gpus == [0, 1] and s.port == 7000 and s.engine_ports == [9000, 9001]
    assert s.max_model_len == 16384 and s.gpu_memory_utilization == 0.8 and s.kv_cache_gib == 8.0
    assert s.data_dir == Path("/tmp/d") and s.lmcache_config_path == Path("/tmp/c.yaml")
    assert s.server_name == "0.0.0.0" and s.auth == ("me", "secret:with:colons")
    assert s.attach == ["http://a:1", "http://b:2"]
    assert s.log_dir == Path("/tmp/l")
    assert s.engine_args == ["--load-format", "dummy", "--enforce-eager"]
    assert s.fairness == "sequential" and s.health_timeout_s == 30.0 and s.ask == "Why?" and s.sim_speed == 4.0


def test_env_overrides(monkeypatch):
    env = {"KVDEMO_MODEL": "/models/m", "KVDEMO_SIMULATE": "true", "KVDEMO_GPUS": "1", "KVDEMO_PORT": "7001",
           "KVDEMO_ENGINE_PORTS": "9100,9101", "KVDEMO_MAX_MODEL_LEN": "8192", "KVDEMO_SHARE": "1",
           "KVDEMO_AUTH": "u:p", "KVDEMO_ENGINE_ARGS": "--load-format dummy", "KVDEMO_FAIRNESS": "concurrent",
           "KVDEMO_GPU_MEMORY_UTILIZATION": "0.5", "KVDEMO_KV_CACHE_GIB": "4", "KVDEMO_SIM_SPEED": "3",
           "KVDEMO_SCENARIO": "blend", "KVDEMO_ATTACH": "http://x:1,http://y:2", "HF_TOKEN": "hf_abc",
           "KVDEMO_LMCACHE_CONFIG": "/cfg/mine.yaml"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = parse_settings([])
    assert s.model == "/models/m" and s.simulate and s.gpus == [1] and s.port == 7001
    assert s.engine_ports == [9100, 9101] and s.max_model_len == 8192 and s.share and s.auth == ("u", "p")
    assert s.engine_args == ["--load-format", "dummy"] and s.fairness == "concurrent"
    assert s.gpu_memory_utilization == 0.5 and s.kv_cache_gib == 4.0 and s.sim_speed == 3.0
    assert s.scenario == "blend" and s.attach == ["http://x:1", "http://y:2"] and s.hf_token == "hf_abc"
    assert s.lmcache_config_path == Path("/cfg/mine.yaml")


def test_flags_beat_env(monkeypatch):
    monkeypatch.setenv("KVDEMO_PORT", "7001")
    monkeypatch.setenv("KVDEMO_MODEL", "env/model")
    s = parse_settings(["--port", "7002", "--model", "flag/model"])
    assert s.port == 7002 and s.model == "flag/model"


@pytest.mark.parametrize("value", ["0", "false", "no", ""])
def test_env_bool_false(monkeypatch, value):
    monkeypatch.setenv("KVDEMO_SIMULATE", value)
    assert parse_settings([]).simulate is False


def test_hugging_face_space_binds_all_interfaces_on_7860(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/kvdemo")
    s = parse_settings([])
    assert (s.server_name, s.port) == ("0.0.0.0", 7860)
    # An explicit choice still wins.
    s = parse_settings(["--server-name", "127.0.0.1", "--port", "9999"])
    assert (s.server_name, s.port) == ("127.0.0.1", 9999)


def test_simulated_default_model_uses_bundled_tokenizer(tmp_path):
    assert parse_settings(["--simulate"]).tokenizer_source == str(SIM_TOKENIZER_DIR)
    assert parse_settings([]).tokenizer_source == DEFAULT_MODEL
    s = parse_settings(["--model", str(tmp_path)])
    assert s.is_local_model and s.tokenizer_source == str(tmp_path)
    assert parse_settings(["--model", "./relative/dir"]).is_local_model
    assert not parse_settings(["--model", "org/name"]).is_local_model


# ----- bad values --------------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "message"), [
    (["--max-model-len", "100"], "--max-model-len 100 is too small"),
    (["--gpu-memory-utilization", "1.5"], "between 0.05 and 0.98"),
    (["--gpu-memory-utilization", "0"], "between 0.05 and 0.98"),
    (["--engine-ports", "9000,9000"], "must all be different"),
    (["--port", "9000", "--engine-ports", "9000,9001"], "must all be different"),
    (["--sim-speed", "0"], "--sim-speed must be positive"),
    (["--no-ui"], '--no-ui needs a question: add --ask "..."'),
])
def test_invalid_combinations_are_user_facing_errors(argv, message):
    with pytest.raises(UserFacingError) as exc:
        parse_settings(argv)
    assert message in str(exc.value)


def test_config_names_every_scenario():
    """config checks --scenario by these names without importing the scenarios (they build on config)."""
    assert tuple(SCENARIOS) == SCENARIO_NAMES
    assert all(SCENARIOS[name].name == name for name in SCENARIO_NAMES)


def test_unknown_scenario_from_env_is_a_user_facing_error(monkeypatch):
    monkeypatch.setenv("KVDEMO_SCENARIO", "sharing")  # argparse checks no default against --scenario's choices
    with pytest.raises(UserFacingError, match="Unknown scenario 'sharing'.*use one of blend, share"):
        parse_settings([])


@pytest.mark.parametrize("argv", [
    ["--gpus", "a,b"], ["--engine-ports", "80x"], ["--auth", "nocolon"], ["--auth", ":pw"],
    ["--scenario", "nope"], ["--fairness", "fast"], ["--port", "http"], ["--unknown-flag"],
])
def test_malformed_flags_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_settings(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_malformed_env_list_exits_with_usage(monkeypatch, capsys):
    monkeypatch.setenv("KVDEMO_GPUS", "zero")
    with pytest.raises(SystemExit):
        parse_settings([])
    assert "expected comma-separated integers" in capsys.readouterr().err


# ----- the same mistakes from the command line: a message, never a traceback ----------------------

def run_dry(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVDEMO_") and k != "SPACE_ID"}
    return subprocess.run([sys.executable, "app.py", "--simulate", "--dry-run", *args], cwd=REPO_ROOT, check=False,
                          capture_output=True, text=True, timeout=120, env={**clean, **env})


@pytest.mark.parametrize(("args", "env", "expected"), [
    ((), {"KVDEMO_PORT": "abc"}, "abc"),
    ((), {"KVDEMO_MAX_MODEL_LEN": "32k"}, "32k"),
    (("--engine-ports", "9000"), {}, "--engine-ports"),
    ((), {"KVDEMO_SCENARIO": "sharing"}, "sharing"),  # env must not bypass the flag's choices
    ((), {"KVDEMO_FAIRNESS": "fastest"}, "fastest"),
])
def test_cli_mistakes_get_a_message_not_a_traceback(args, env, expected):
    r = run_dry(*args, **env)
    assert r.returncode == 2, r.stdout
    assert "Traceback" not in r.stderr, r.stderr[-1500:]
    assert expected in r.stderr
    assert r.stdout == ""  # refused before --dry-run prints anything


@pytest.mark.parametrize("argv", [["--engine-args", "--enforce-eager"], ["--engine-args=--enforce-eager"]])
def test_engine_args_may_be_a_single_vllm_flag(argv):
    """`--engine-args "--enforce-eager"`: one value (argparse alone took it for a flag: "expected one argument")."""
    s = parse_settings(["--simulate", *argv, "--port", "7861"])
    assert s.engine_args == ["--enforce-eager"] and s.port == 7861


def test_engine_args_single_flag_in_bench_and_offline():
    from kvdemo.bench.cli import build_bench_parser
    from kvdemo.config import with_pass_through_values
    from kvdemo.offline.cli import build_parser as offline_parser

    argv = with_pass_through_values(["--model", "m", "--engine-args", "--enforce-eager"])
    assert build_bench_parser().parse_args(argv).engine_args == "--enforce-eager"
    offline = offline_parser().parse_args([*argv, "--chunks", "a.txt", "--question", "q"])
    assert offline.engine_args == "--enforce-eager"


def test_context_tokens_flag_env_and_bad_value(monkeypatch):
    assert parse_settings([]).context_tokens == 16_000
    assert parse_settings(["--context-tokens", "30000"]).context_tokens == 30_000
    monkeypatch.setenv("KVDEMO_CONTEXT_TOKENS", "24000")
    assert parse_settings([]).context_tokens == 24_000
    with pytest.raises(UserFacingError, match="--context-tokens 0: give the default context's size in tokens"):
        parse_settings(["--context-tokens", "0"])
