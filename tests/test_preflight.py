"""Checks before any engine starts: each fails with one line saying what to do."""

from __future__ import annotations

import socket
import subprocess

import pytest

from kvdemo import preflight
from kvdemo.config import DEFAULT_MODEL, REPO_ROOT, Settings
from kvdemo.errors import UserFacingError
from kvdemo.preflight import Gpu, check_lmcache_config, check_model, check_port_free, choose_gpus


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
