"""scripts/gpu_background.sh: gpu_run.sh steps run detached, reported and collected step by step.

Driven here against simulated engines (the bench step with --simulate) so the script's own plumbing is what is
tested: the detached start, per-step environment, STATUS lines, and one archive per finished step."""

from __future__ import annotations

import os
import subprocess
import tarfile

import pytest
from helpers import REPO_ROOT, free_ports, wait_until

SCRIPT = REPO_ROOT / "scripts" / "gpu_background.sh"


@pytest.mark.slow
def test_a_step_runs_detached_and_is_collected(tmp_path):
    runs, site, results = tmp_path / "runs", tmp_path / "site", tmp_path / "results"
    site.mkdir()
    lm_port, plain_port = free_ports(2)
    (site / "kvdemo_done").touch()  # wheels "installed": gpu_run.sh skips its install
    env = {**os.environ, "RUNS": str(runs), "SITE": str(site), "RESULTS": str(results),
           "STEP_ENV_before": f"BENCH_ARGS='--simulate --model mistralai/Mistral-7B-Instruct-v0.2 --contexts 4000 --repeats 2 --decode-tokens 8 "
                              f"--skip-app-question --name before --engine-ports {lm_port},{plain_port}'"}
    env.pop("PYTHONPATH", None)

    def run(*args: str) -> str:
        return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=60, check=True).stdout

    assert "started before=bench" in run("start", "before=bench")
    wait_until(lambda: "DONE" in run("status"), 180, "the detached bench step")
    assert "end before rc=0" in run("status"), (runs / "before" / "out.txt").read_text()[-3000:]
    assert "before.tgz" in run("collect", str(tmp_path / "got"))
    with tarfile.open(tmp_path / "got" / "before.tgz") as t:
        out = t.extractfile("before/out.txt").read().decode()
        names = t.getnames()
    assert "kvdemo.bench: wrote" in out and "kvdemo.bench.spread: every blended repeat" in out
    # the result is written outside the working tree (RESULTS) and comes back with the step
    assert (results / "before-simulated.json").is_file() and "before/before-simulated.json" in names
    assert not list((REPO_ROOT / "benchmarks" / "results").glob("before-simulated*"))
    assert "before.tgz" not in run("collect", str(tmp_path / "again"))  # each finished step is sent once


def test_lanes_run_at_once_and_a_step_waits_for_its_inputs(tmp_path):
    """Lanes start together; WAIT_FOR_<name> holds a step until its files exist, or skips it after WAIT_MAX."""
    runs, site, smol = tmp_path / "runs", tmp_path / "site", tmp_path / "smol"
    site.mkdir(), smol.mkdir()
    (site / "kvdemo_done").touch()
    (smol / "config.json").write_text("{}")  # smol-model finds the model made: nothing to convert
    gate, never = tmp_path / "gate.done", tmp_path / "never.done"
    env = {**os.environ, "RUNS": str(runs), "SITE": str(site), "RESULTS": str(tmp_path / "results"),
           "SMOL_DIR": str(smol), "WAIT_MAX": "4", "WAIT_FOR_b": str(gate), "WAIT_FOR_c": str(never)}
    env.pop("PYTHONPATH", None)

    def run(*args: str) -> str:
        return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=60, check=True).stdout

    assert "started" in run("lanes", "a=smol-model b=smol-model", "c=smol-model")
    assert " end a rc=0" in run("wait", "20")  # wait returns once a step ends
    assert "start b" not in run("status")  # b's input has not arrived
    gate.touch()
    wait_until(lambda: " DONE" in run("status"), 60, "the lanes")
    status = run("status")
    assert " end b rc=0" in status and f"skip c: no {never} after 4 s" in status
    assert "start c" not in status
    first = run("collect", str(tmp_path / "got"))
    assert "a.tgz" in first and "b.tgz" in first and "c.tgz" not in first
    env["COLLECT_MAX"] = "1"  # caps the archives of one collect (a remote command brings back a few files)
    (runs / "a.collected").unlink()
    (runs / "b.collected").unlink()
    assert run("collect", str(tmp_path / "capped")).count(".tgz") == 1
