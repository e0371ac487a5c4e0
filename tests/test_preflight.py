"""Checks before any engine starts: each fails with one line saying what to do."""

from __future__ import annotations

import importlib.metadata
import signal
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvdemo import main as main_module
from kvdemo import preflight
from kvdemo import runtime as runtime_module
from kvdemo.config import DEFAULT_MODEL, REPO_ROOT, Settings, parse_settings
from kvdemo.errors import UserFacingError
from kvdemo.preflight import Gpu, check_lmcache_config, check_model, check_port_free, choose_gpus
from kvdemo.runtime import Runtime


@pytest.fixture
def bound_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_free_port_passes():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check_port_free(port)


def test_port_of_a_server_that_just_stopped_is_free():
    """Restarting the demo right after Ctrl-C: the old server's connections linger in TIME_WAIT for a
    minute, yet a new server (uvicorn and Gradio bind with SO_REUSEADDR) can listen on the port at once."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()  # the server closes first, so its side of the connection waits in TIME_WAIT
    client.close()
    listener.close()
    check_port_free(port, what="engine port (🚀 vLLM + LMCache)")


def test_ui_port_in_use(bound_port):
    with pytest.raises(UserFacingError) as exc:
        check_port_free(bound_port, what="UI port")
    msg = str(exc.value)
    assert f"UI port {bound_port} is already in use" in msg and "--port" in msg


def test_engine_port_in_use(bound_port):
    with pytest.raises(UserFacingError) as exc:
        check_port_free(bound_port, what="engine port (🐢 plain vLLM)")
    msg = str(exc.value)
    assert str(bound_port) in msg and "--engine-ports" in msg and "earlier run" in msg


def test_lmcache_config_shipped_parses():
    data = check_lmcache_config(REPO_ROOT / "lmcache_configs" / "blend.yaml")
    assert data["enable_blending"] is True and data["blend_special_str"] == " # # "


def test_lmcache_config_bad_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_size: 256\nlocal_cpu: true\nblend_special_str: [unclosed\nenable_blending: true\n")
    with pytest.raises(UserFacingError) as exc:
        check_lmcache_config(bad)
    msg = str(exc.value)
    assert "is not valid YAML" in msg and str(bad) in msg
    assert "(line 4)" in msg  # where the parser notices the unclosed list


def test_lmcache_config_tab_indent_names_the_line(tmp_path):
    bad = tmp_path / "tabs.yaml"
    bad.write_text("a: 1\nb:\n\t- 2\n")
    with pytest.raises(UserFacingError, match=r"not valid YAML \(line 3\)"):
        check_lmcache_config(bad)


def test_lmcache_config_missing_or_not_a_mapping(tmp_path):
    with pytest.raises(UserFacingError, match="not found: fix --lmcache-config"):
        check_lmcache_config(tmp_path / "nope.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(UserFacingError, match="must be a mapping"):
        check_lmcache_config(listy)


def test_choose_gpus_without_gpus_suggests_simulate():
    with pytest.raises(UserFacingError) as exc:
        choose_gpus(Settings(), 2, available=[])
    assert "No NVIDIA GPU found" in str(exc.value) and "--simulate" in str(exc.value)


def test_choose_gpus_detects_none_here(monkeypatch):
    monkeypatch.setattr(preflight, "detect_gpus", list)
    with pytest.raises(UserFacingError, match="--simulate"):
        choose_gpus(Settings(), 2)


GPUS = [Gpu(0, "NVIDIA H100", 81559), Gpu(1, "NVIDIA H100", 81559), Gpu(2, "NVIDIA H100", 81559)]


def test_choose_gpus_default_takes_the_first_n():
    assert choose_gpus(Settings(), 2, available=GPUS) == [0, 1]
    assert choose_gpus(Settings(), 2, available=GPUS[:1]) == [0]


def test_choose_gpus_honours_and_checks_flag():
    assert choose_gpus(Settings(gpus=[2]), 2, available=GPUS) == [2]
    with pytest.raises(UserFacingError) as exc:
        choose_gpus(Settings(gpus=[0, 7]), 2, available=GPUS)
    assert "--gpus names GPU 7" in str(exc.value) and "0,1,2" in str(exc.value)


def test_detect_gpus_parses_nvidia_smi(monkeypatch):
    out = "0, NVIDIA H100 80GB HBM3, 81559\n1, NVIDIA H100 80GB HBM3, 81559\n"
    monkeypatch.setattr(preflight.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(preflight.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=out, stderr=""))
    assert preflight.detect_gpus() == [Gpu(0, "NVIDIA H100 80GB HBM3", 81559), Gpu(1, "NVIDIA H100 80GB HBM3", 81559)]


def test_detect_gpus_without_driver(monkeypatch):
    monkeypatch.setattr(preflight.shutil, "which", lambda name: None)
    assert preflight.detect_gpus() == []


def test_check_model_missing_local_dir(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(UserFacingError) as exc:
        check_model(Settings(model=str(missing)))
    assert f"Model directory {missing} does not exist" in str(exc.value) and "--model" in str(exc.value)


def test_check_model_local_dir_without_config(tmp_path):
    with pytest.raises(UserFacingError, match="has no config.json"):
        check_model(Settings(model=str(tmp_path)))
    (tmp_path / "config.json").write_text("{}")
    check_model(Settings(model=str(tmp_path)))


def test_check_model_simulated_default_needs_no_hub():
    check_model(Settings(model=DEFAULT_MODEL, simulate=True))  # no network here: must not try the Hub


# ----- kvdemo's vLLM plugin: installed as an entry point, checked before real LMCache engines start ------


def _entry_points(*installed):
    """importlib.metadata.entry_points as if these (name, value) pairs were in vLLM's plugin group."""
    def entry_points(group: str | None = None, **_):
        return [SimpleNamespace(name=n, value=v, group=group) for n, v in installed] \
            if group == preflight.PLUGIN_GROUP else []
    return entry_points


def test_plugin_entry_point_is_the_one_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert declared[preflight.PLUGIN_GROUP] == {preflight.PLUGIN_NAME: preflight.PLUGIN_TARGET}


def test_plugin_problems(monkeypatch):
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.setattr(importlib.metadata, "entry_points", _entry_points())
    with pytest.raises(UserFacingError, match=r"not installed .*run `pip install -e \.`") as exc:
        preflight.check_plugin_installed()
    assert "\n" not in str(exc.value)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        _entry_points((preflight.PLUGIN_NAME, "old.module:f")))
    assert "points at old.module:f" in preflight.plugin_problem()
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        _entry_points((preflight.PLUGIN_NAME, preflight.PLUGIN_TARGET)))
    preflight.check_plugin_installed()
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    assert "VLLM_PLUGINS" in preflight.plugin_problem()


def test_require_gpu(monkeypatch):
    monkeypatch.setattr(preflight, "detect_gpus", list)
    message = r"^No NVIDIA GPU found \(nvidia-smi lists none\): it needs one\. Try `python app\.py"
    with pytest.raises(UserFacingError, match=message) as exc:
        preflight.require_gpu("it needs one")
    assert str(exc.value).endswith("`python app.py --simulate` for a GPU-free demo.")
    gpus = [Gpu(0, "NVIDIA H100 80GB HBM3", 81559)]
    monkeypatch.setattr(preflight, "detect_gpus", lambda: gpus)
    assert preflight.require_gpu("it needs one") == gpus


class _PastPreflight(Exception):
    """Raised by the first check after the plugin check: start() got past it."""


@pytest.fixture
def app_flags(tmp_path, monkeypatch) -> list[str]:
    """Flags for a local model on one fake GPU, kvdemo's plugin not installed; start() stops right after
    the plugin check (at the port checks)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.setattr(preflight, "detect_gpus", lambda: [Gpu(0, "NVIDIA H100 80GB HBM3", 81559)])
    monkeypatch.setattr(importlib.metadata, "entry_points", _entry_points())
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)

    def past(*_a, **_k):
        raise _PastPreflight

    monkeypatch.setattr(runtime_module, "check_port_free", past)
    return ["--model", str(model), "--log-dir", str(tmp_path / "logs")]


def test_app_refuses_real_engines_without_the_plugin(app_flags, capsys):
    with pytest.raises(UserFacingError, match=r"pip install -e \.") as exc:
        Runtime(parse_settings(app_flags)).start()
    assert "\n" not in str(exc.value)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        assert main_module.main(app_flags) == 2
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvdemo: ") and "pip install -e ." in err and "\n" not in err


@pytest.mark.parametrize("flags", [["--simulate"], ["--attach", "http://gpu-a:8000,http://gpu-b:8000"]])
def test_app_needs_no_plugin_for_simulated_or_attached_engines(app_flags, flags):
    with pytest.raises(_PastPreflight):
        Runtime(parse_settings([*app_flags, *flags])).start()


def test_blending_refuses_an_architecture_lmcache_cannot_blend(tmp_path):
    """One line before any engine starts, instead of a NotImplementedError in the 🚀 engine's log."""
    import json

    from kvdemo.config import parse_settings
    from kvdemo.errors import UserFacingError
    from kvdemo.preflight import check_blending_architecture, model_architectures

    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"):
        (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch]}))
        settings = parse_settings(["--model", str(tmp_path)])
        assert model_architectures(settings) == [arch]
        check_blending_architecture(settings)  # supported: no error
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma2ForCausalLM"]}))
    with pytest.raises(UserFacingError) as info:
        check_blending_architecture(parse_settings(["--model", str(tmp_path)]))
    message = str(info.value)
    assert "\n" not in message and "Gemma2ForCausalLM" in message and "Qwen3ForCausalLM" in message
    assert "--scenario share" in message
    (tmp_path / "config.json").write_text("{not json")
    check_blending_architecture(parse_settings(["--model", str(tmp_path)]))  # unknown: vLLM will say


def test_app_refuses_an_unblendable_model_before_engines_start(app_flags, monkeypatch):
    """The blend scenario stops at the architecture check; the share scenario (no blending) goes past it."""
    import json

    monkeypatch.setattr(preflight, "check_plugin_installed", lambda: None)
    monkeypatch.setattr(runtime_module, "check_plugin_installed", lambda: None)
    model = app_flags[app_flags.index("--model") + 1]
    (Path(model) / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(UserFacingError, match="GPTNeoXForCausalLM.*blends only"):
        Runtime(parse_settings(app_flags)).start()
    monkeypatch.setattr(preflight, "detect_gpus", lambda: [Gpu(i, "NVIDIA H100 80GB HBM3", 81559) for i in range(4)])
    with pytest.raises(_PastPreflight):
        Runtime(parse_settings([*app_flags, "--scenario", "share"])).start()
