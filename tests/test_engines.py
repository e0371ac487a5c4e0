"""Engine command lines and env, --dry-run, and the engine process life cycle (fail fast, stop the tree)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from helpers import alive, describe, free_port, is_gone, kill_all, wait_until

from kvdemo import main as main_module
from kvdemo import preflight
from kvdemo import runtime as runtime_module
from kvdemo.config import REPO_ROOT, GpuSlot, parse_settings
from kvdemo.engines import EngineProcess, EngineSpec
from kvdemo.errors import EngineError, UserFacingError
from kvdemo.main import dry_run
from kvdemo.preflight import Gpu
from kvdemo.runtime import Runtime

MODEL = "mistralai/Mistral-7B-Instruct-v0.2"
CONFIG = Path("/cfg/blend.yaml")


OWN_GPU = GpuSlot(0, 0.9, 1)


def spec(lmcache: bool, slot: GpuSlot = OWN_GPU, **kw) -> EngineSpec:
    return EngineSpec(key="lmcache" if lmcache else "plain", label="x", lmcache=lmcache, port=8000 + (not lmcache),
                      slot=slot, model=MODEL, max_model_len=32768,
                      lmcache_config=CONFIG if lmcache else None, **kw)


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# ----- argv and env ------------------------------------------------------------------------------

def test_lmcache_engine_argv():
    argv = spec(True).argv()
    assert argv[:5] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", MODEL]
    assert flag_value(argv, "--port") == "8000" and flag_value(argv, "--host") == "127.0.0.1"
    assert flag_value(argv, "--max-model-len") == "32768"
    assert flag_value(argv, "--gpu-memory-utilization") == "0.90"
    assert json.loads(flag_value(argv, "--kv-transfer-config")) == {"kv_connector": "LMCacheConnectorV1",
                                                                    "kv_role": "kv_both"}
    assert "--no-enable-prefix-caching" in argv and "--enable-prefix-caching" not in argv
    assert flag_value(argv, "--attention-backend") == "FLASH_ATTN"
    assert "--kv-cache-memory-bytes" not in argv  # own GPU: let vLLM profile
    assert "--enable-prompt-tokens-details" in argv  # per-request cached tokens (LMCache's loads included)


def test_plain_engine_argv():
    argv = spec(False).argv()
    assert "--enable-prefix-caching" in argv
    assert "--no-enable-prefix-caching" not in argv and "--kv-transfer-config" not in argv
    assert "--attention-backend" not in argv
    assert flag_value(argv, "--port") == "8001"
    assert "--enable-prompt-tokens-details" in argv  # per-request prefix-cache hits


def test_lmcache_engine_env():
    env = spec(True, GpuSlot(1, 0.9, 1)).env()
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["LMCACHE_CONFIG_FILE"] == str(CONFIG)
    assert env["KVDEMO_LMCACHE_PLUGIN"] == "1"
    assert env["VLLM_USE_FLASHINFER_SAMPLER"] == "0" and env["PYTHONHASHSEED"] == "0"
    assert "HF_HUB_OFFLINE" not in env


def test_plain_engine_env():
    env = spec(False, GpuSlot(0, 0.9, 1)).env()
    assert env["CUDA_VISIBLE_DEVICES"] == "0"
    assert "KVDEMO_LMCACHE_PLUGIN" not in env and "LMCACHE_CONFIG_FILE" not in env


def test_local_model_is_offline():
    assert spec(False, local_model=True).env()["HF_HUB_OFFLINE"] == "1"


def test_shared_gpu_fixes_kv_cache_size():
    shared = GpuSlot(0, 0.45, 2)
    for lmcache in (True, False):
        argv = spec(lmcache, shared).argv()
        assert flag_value(argv, "--kv-cache-memory-bytes") == str(12 * 2**30)
        assert flag_value(argv, "--gpu-memory-utilization") == "0.45"
    argv = spec(True, shared, kv_cache_gib=4.5, gpu_memory_utilization=0.4).argv()
    assert flag_value(argv, "--kv-cache-memory-bytes") == str(int(4.5 * 2**30))
    assert flag_value(argv, "--gpu-memory-utilization") == "0.40"


def test_extra_engine_args_are_appended():
    for lmcache in (True, False):
        argv = spec(lmcache, extra_args=["--load-format", "dummy", "--enforce-eager"]).argv()
        assert argv[-3:] == ["--load-format", "dummy", "--enforce-eager"]


def test_simulated_engine_argv_and_env():
    s = spec(True, GpuSlot(None, 0.0, 1), simulate=True, sim_speed=4.0)
    argv = s.argv()
    assert argv[:3] == [sys.executable, "-m", "kvdemo.simulate"]
    assert flag_value(argv, "--mode") == "lmcache" and flag_value(argv, "--speed") == "4.0"
    assert flag_value(argv, "--lmcache-config") == str(CONFIG)
    assert s.env() == {}  # no GPU, no plugin
    assert flag_value(spec(False, GpuSlot(None, 0.0, 1), simulate=True).argv(), "--mode") == "plain"


def test_describe_is_a_runnable_line():
    text = spec(True, GpuSlot(0, 0.45, 2)).describe()
    header, line = text.splitlines()
    assert "GPU 0 (shared by 2 engines)" in header and "port 8000" in header
    assert "CUDA_VISIBLE_DEVICES=0" in line and "KVDEMO_LMCACHE_PLUGIN=1" in line
    assert "'{\"kv_connector\":\"LMCacheConnectorV1\",\"kv_role\":\"kv_both\"}'" in line  # shell-quoted JSON


# ----- dry run -----------------------------------------------------------------------------------

def fake_gpus(monkeypatch, n: int) -> None:
    """nvidia-smi lists n GPUs (patched wherever detect_gpus was imported)."""
    gpus = [Gpu(i, "NVIDIA H100 80GB HBM3", 81559) for i in range(n)]
    for module in (preflight, runtime_module, main_module):
        monkeypatch.setattr(module, "detect_gpus", lambda: list(gpus), raising=False)


def dry_run_output(capsys, *flags: str) -> tuple[list[EngineSpec], str]:
    runtime = Runtime(parse_settings(["--dry-run", *flags]))
    specs = runtime.plan()
    assert dry_run(runtime) == 0
    return specs, capsys.readouterr().out


def engine_blocks(out: str) -> tuple[str, str]:
    lm, plain = (b for b in out.split("\n# ") if "[lmcache]" in b or "[plain]" in b)
    return lm, plain


def check_two_gpu_plan(out: str) -> None:
    lm, plain = engine_blocks(out)
    assert "on GPU 0, port 8000" in lm and "CUDA_VISIBLE_DEVICES=0" in lm and "LMCACHE_CONFIG_FILE=" in lm
    assert "KVDEMO_LMCACHE_PLUGIN=1" in lm and "--kv-transfer-config" in lm and "--no-enable-prefix-caching" in lm
    assert "on GPU 1, port 8001" in plain and "CUDA_VISIBLE_DEVICES=1" in plain
    assert "--enable-prefix-caching" in plain and "KVDEMO_LMCACHE_PLUGIN" not in plain
    assert out.count("--gpu-memory-utilization 0.90") == 2 and "--kv-cache-memory-bytes" not in out
    assert "answer mode: concurrent" in out


def test_dry_run_two_gpus_detected(monkeypatch, capsys):
    fake_gpus(monkeypatch, 2)
    specs, out = dry_run_output(capsys, "--engine-args", "--load-format dummy")
    assert [(s.key, s.slot.gpu, s.slot.memory_fraction, s.slot.shared) for s in specs] == [
        ("lmcache", 0, 0.9, False), ("plain", 1, 0.9, False)]
    assert "nothing is started" in out and "No GPU detected" not in out
    check_two_gpu_plan(out)
    assert all(b.rstrip().endswith("--load-format dummy") for b in engine_blocks(out))


def test_dry_run_one_gpu_detected_is_shared(monkeypatch, capsys):
    fake_gpus(monkeypatch, 1)
    _, out = dry_run_output(capsys)
    assert out.count("GPU 0 (shared by 2 engines)") == 2
    assert out.count("--gpu-memory-utilization 0.45") == 2 and out.count("--kv-cache-memory-bytes") == 2
    assert "answer mode: sequential" in out


def test_dry_run_gpus_flag_plans_for_another_machine(monkeypatch, capsys):
    fake_gpus(monkeypatch, 1)  # this machine has one GPU; the plan is for a machine with two
    _, out = dry_run_output(capsys, "--gpus", "0,1")
    check_two_gpu_plan(out)


def test_real_start_checks_gpus_flag(monkeypatch):
    fake_gpus(monkeypatch, 1)
    with pytest.raises(UserFacingError, match="--gpus names GPU 1"):
        Runtime(parse_settings(["--gpus", "0,1"])).plan()


def test_real_start_without_gpus_suggests_simulate(monkeypatch):
    fake_gpus(monkeypatch, 0)
    with pytest.raises(UserFacingError, match="--simulate"):
        Runtime(parse_settings([])).plan()


def test_dry_run_attach(capsys):
    runtime = Runtime(parse_settings(["--dry-run", "--attach", "http://gpu-a:8000,http://gpu-b:8000/"]))
    assert dry_run(runtime) == 0
    out = capsys.readouterr().out
    assert "attached at http://gpu-a:8000" in out and "attached at http://gpu-b:8000" in out
    assert "vllm.entrypoints" not in out


def run_app(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py", *args], check=False, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_simulate_dry_run_subprocess():
    port, a, b = free_port(), free_port(), free_port()
    r = run_app("--simulate", "--dry-run", "--port", str(port), "--engine-ports", f"{a},{b}", "--sim-speed", "3")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "-m kvdemo.simulate" in out and "vllm.entrypoints" not in out
    assert f"--port {a} --mode lmcache" in out and f"--port {b} --mode plain" in out
    assert "--speed 3.0" in out and "CUDA_VISIBLE_DEVICES" not in out
    assert f"UI: http://127.0.0.1:{port}" in out
    assert "SIMULATED engines" not in out  # a dry run starts nothing


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU driver")
def test_dry_run_for_a_two_gpu_machine_from_here():
    """No GPU here: `--dry-run --gpus 0,1` still prints the exact plan for a 2-GPU machine."""
    r = run_app("--dry-run", "--gpus", "0,1")
    assert r.returncode == 0, r.stderr
    check_two_gpu_plan(r.stdout)
    assert "-m vllm.entrypoints.cli.main serve" in r.stdout


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU driver")
def test_dry_run_without_gpus_shows_the_one_gpu_plan():
    r = run_app("--dry-run")
    assert r.returncode == 0, r.stderr
    assert "No GPU detected here" in r.stdout and r.stdout.count("GPU 0 (shared by 2 engines)") == 2


def test_cli_user_error_is_one_line_without_traceback():
    r = run_app("--simulate", "--dry-run", "--max-model-len", "10")
    assert r.returncode == 2
    assert r.stderr.strip() == "kvdemo: --max-model-len 10 is too small; use at least 256."


# ----- process life cycle ------------------------------------------------------------------------

@dataclass
class ScriptSpec(EngineSpec):
    """An 'engine' that runs a small Python script instead of vllm serve."""

    script: str = ""

    def argv(self) -> list[str]:
        return [sys.executable, "-c", self.script]


def script_spec(script: str, key: str = "fake") -> ScriptSpec:
    return ScriptSpec(key=key, label=f"fake engine {key}", lmcache=False, port=free_port(),
                      slot=GpuSlot(None, 0.0, 1), model=MODEL, max_model_len=1024, simulate=True,
                      script=textwrap.dedent(script))


def test_wait_healthy_fails_fast_when_the_engine_exits(tmp_path):
    proc = EngineProcess(script_spec("""
        import sys
        print("loading model weights", flush=True)
        print("RuntimeError: CUDA out of memory (fake)", flush=True)
        sys.exit(3)
    """), tmp_path)
    proc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(EngineError) as exc:
            proc.wait_healthy(timeout_s=120, poll_s=0.1)
    finally:
        proc.stop(grace_s=2)
    assert time.monotonic() - t0 < 20  # well under the timeout
    err = exc.value
    assert "exited with code 3" in str(err) and str(proc.log_path) in str(err)
    assert "CUDA out of memory (fake)" in err.log_tail and "CUDA out of memory (fake)" in str(err)
    assert err.engine == "fake" and "last lines of its log" in str(err)
    assert "kvdemo starting fake" in proc.log_path.read_text()


def test_wait_healthy_times_out_with_log_tail(tmp_path):
    proc = EngineProcess(script_spec("""
        import time
        print("still compiling", flush=True)
        while True:
            time.sleep(1)
    """), tmp_path)
    proc.start()
    try:
        with pytest.raises(EngineError) as exc:
            proc.wait_healthy(timeout_s=1.0, poll_s=0.1)
    finally:
        proc.stop(grace_s=2)
    assert "did not become healthy within 1 s" in str(exc.value) and "--health-timeout" in str(exc.value)
    assert "still compiling" in exc.value.log_tail
    assert not proc.alive()


TREE_SCRIPT = """
    import signal, subprocess, sys, time
    # A grandchild in its own session that ignores SIGTERM, as a stubborn vLLM worker might.
    grandchild = subprocess.Popen(
        [sys.executable, "-c", "import signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
         "print('grandchild up', flush=True)\\nwhile True: time.sleep(1)"],
        start_new_session=True)
    # A plain child in the engine's own process group.
    child = subprocess.Popen([sys.executable, "-c", "import time\\nwhile True: time.sleep(1)"])
    print("engine up", grandchild.pid, child.pid, flush=True)
    while True:
        time.sleep(1)
"""


def test_stop_kills_the_whole_process_tree(tmp_path):
    proc = EngineProcess(script_spec(TREE_SCRIPT), tmp_path)
    proc.start()
    pids: list[int] = []
    try:
        root = psutil.Process(proc.pid)
        children = wait_until(lambda: len(root.children(recursive=True)) >= 2 and root.children(recursive=True),
                              30, "the fake engine to start its children")
        wait_until(lambda: "grandchild up" in proc.log_path.read_text(), 30, "the grandchild to ignore SIGTERM")
        pids = [proc.pid, *(c.pid for c in children)]
        assert any(os.getsid(p) != os.getsid(proc.pid) for p in pids[1:])  # one left the engine's session
        t0 = time.monotonic()
        proc.stop(grace_s=1.0)
        assert time.monotonic() - t0 < 10
        try:
            wait_until(lambda: not alive(pids), 10, "the whole tree to be gone")
        except AssertionError:
            pytest.fail(f"left running after stop(): {describe(alive(pids))}")
        assert not proc.alive() and proc.proc.returncode is not None
    finally:
        kill_all(alive(pids))


def test_stop_is_safe_before_start_and_twice(tmp_path):
    proc = EngineProcess(script_spec("import time\nwhile True: time.sleep(1)"), tmp_path)
    proc.stop()
    proc.start()
    proc.stop(grace_s=1)
    proc.stop(grace_s=1)
    assert is_gone(proc.pid)


APP_SCRIPT = """
    import sys, time
    from pathlib import Path
    from kvdemo.config import GpuSlot
    from kvdemo.engines import EngineProcess, EngineSpec, Watchdog

    class Sleeper(EngineSpec):
        def argv(self):
            return [sys.executable, "-c", "import time\\nwhile True: time.sleep(1)"]

    watchdog = Watchdog()
    procs = []
    for i in range(2):
        spec = Sleeper(key=f"e{i}", label=f"e{i}", lmcache=False, port=1, slot=GpuSlot(None, 0.0, 1),
                       model="m", max_model_len=1024, simulate=True)
        p = EngineProcess(spec, Path(sys.argv[1]), watchdog)
        p.start()
        procs.append(p)
    print("pids", watchdog.proc.pid, *(p.pid for p in procs), flush=True)
    while True:
        time.sleep(1)
"""


def test_watchdog_stops_engines_when_the_app_is_killed(tmp_path):
    """SIGKILL of the app cannot run any cleanup: the watchdog must stop the engines."""
    app = subprocess.Popen([sys.executable, "-c", textwrap.dedent(APP_SCRIPT), str(tmp_path)], cwd=REPO_ROOT,
                           stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    pids: list[int] = []
    try:
        line = app.stdout.readline()  # blocks until the app prints, or exits (then it is empty)
        assert line.startswith("pids "), f"the app did not start its engines: {line!r}"
        pids = [int(x) for x in line.split()[1:]]
        watchdog_pid, engine_pids = pids[0], pids[1:]
        assert len(alive(engine_pids)) == 2
        app.send_signal(signal.SIGKILL)
        app.wait(timeout=10)
        wait_until(lambda: not alive(engine_pids), 20, "the watchdog to stop the engines")
        wait_until(lambda: is_gone(watchdog_pid), 20, "the watchdog to exit")
    finally:
        app.kill()
        app.wait(timeout=10)
        kill_all(alive(pids))
