"""The KV-sharing scenario: the shared store, the 4-engine plan, and the scenario end to end (simulated)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT
from helpers import free_ports, wait_until
from test_browser import CHROMIUM, CHROMIUM_ARGS, App, _interrupt_and_check, _start, _ui_answers

from kvdemo.config import parse_settings
from kvdemo.errors import UserFacingError
from kvdemo.kvstore import KvStore
from kvdemo.runtime import Runtime

# ----- the store ------------------------------------------------------------------------------------------


def test_store_is_created_and_named_as_lmcache_fs_url(tmp_path):
    store = KvStore.from_settings(tmp_path / "kv" / "store", None)
    store.prepare(min_free_gib=0.0)
    assert (tmp_path / "kv" / "store").is_dir()
    assert store.remote_url == f"fs://localhost:1{tmp_path}/kv/store/"  # host:port required, then ignored


def test_store_config_points_lmcache_at_the_store(tmp_path):
    store = KvStore.from_settings(tmp_path / "kv", None)
    path = store.write_lmcache_config(REPO_ROOT / "lmcache_configs" / "share.yaml", tmp_path / "logs")
    data = yaml.safe_load(path.read_text())
    assert data["remote_url"] == store.remote_url
    assert data["chunk_size"] == 256 and not data.get("enable_blending", False)
    assert data["extra_config"] == {"use_exists_sync": True}  # kept: lookups check the store without a loop hop


def test_redis_store_passes_through_and_other_urls_are_refused(tmp_path):
    assert KvStore.from_settings(tmp_path, "redis://10.0.0.5:6379").remote_url == "redis://10.0.0.5:6379"
    with pytest.raises(UserFacingError, match="redis://host:port"):
        KvStore.from_settings(tmp_path, "ftp://somewhere")


def test_page_names_the_store_and_warns_that_redis_measured_slow():
    from kvdemo.ui.share_app import store_line

    line = store_line(KvStore(None, "redis://h:6379"))
    assert line.startswith("Shared KV store: `redis://h:6379`") and "0.26 GB/s" in line and "6.8 s" in line
    assert "resp://" in line and "~1 GB/s" in line


def test_unwritable_store_says_so(tmp_path, monkeypatch):
    store = KvStore.from_settings(tmp_path / "kv", None)
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(UserFacingError, match="not writable.*--kv-store-dir"):
        store.prepare(min_free_gib=0.0)


def test_full_disk_says_what_to_do(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("kvdemo.kvstore.shutil.disk_usage", lambda p: usage(10 * 2**30, 9.5 * 2**30, 2**29))
    with pytest.raises(UserFacingError, match=r"Only 0\.5 GiB free.*--clear-kv-store"):
        KvStore.from_settings(tmp_path / "kv", None).prepare(min_free_gib=4.0)


def test_clear_empties_the_store_and_reports_bytes(tmp_path):
    store = KvStore.from_settings(tmp_path / "kv", None)
    store.prepare(min_free_gib=0.0)
    (store.directory / "a").write_bytes(b"x" * 100_000)
    (store.directory / "sub").mkdir()
    (store.directory / "sub" / "b").write_bytes(b"y" * 50_000)
    assert store.clear() >= 150_000
    assert list(store.directory.iterdir()) == [] and store.size_bytes() == 0


# ----- the plan -------------------------------------------------------------------------------------------


def _plan(*flags: str):
    return Runtime(parse_settings(["--scenario", "share", *flags])).plan()


def test_four_engines_on_one_gpu_split_it_and_cap_context(tmp_path):
    specs = _plan("--dry-run", "--gpus", "0", "--log-dir", str(tmp_path))
    assert [s.key for s in specs] == ["lmcache_a", "lmcache_b", "plain_a", "plain_b"]
    assert all(s.slot.gpu == 0 and s.slot.memory_fraction == 0.22 for s in specs)
    argv = specs[0].argv()
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(3 * 2**30)
    assert int(argv[argv.index("--max-model-len") + 1]) <= 3 * 2**30 // (128 * 1024)
    lm_envs = [s.env()["LMCACHE_CONFIG_FILE"] for s in specs if s.lmcache]
    assert lm_envs[0] == lm_envs[1]  # both LMCache engines use one config, hence one store
    assert "LMCACHE_CONFIG_FILE" not in specs[2].env()


def test_four_gpus_one_engine_each(tmp_path):
    specs = _plan("--dry-run", "--gpus", "0,1,2,3", "--log-dir", str(tmp_path))
    assert [s.slot.gpu for s in specs] == [0, 1, 2, 3] and not any(s.slot.shared for s in specs)


def test_simulated_lmcache_engines_share_the_store_dir(tmp_path):
    specs = _plan("--simulate", "--kv-store-dir", str(tmp_path / "kv"), "--log-dir", str(tmp_path))
    for s in specs:
        argv = s.argv()
        assert ("--store-dir" in argv) == s.lmcache
        if s.lmcache:
            assert argv[argv.index("--store-dir") + 1] == str(tmp_path / "kv")


def test_share_needs_four_ports():
    with pytest.raises(UserFacingError, match="4 ports"):  # the runtime checks it as it takes its scenario
        Runtime(parse_settings(["--scenario", "share", "--engine-ports", "8000,8001"]))


def test_dry_run_prints_the_four_engine_plan(tmp_path):
    r = subprocess.run([sys.executable, "app.py", "--scenario", "share", "--dry-run", "--gpus", "0,1",
                        "--log-dir", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("vllm.entrypoints.cli.main serve") == 4
    assert "LMCache (A)" in r.stdout and "plain vLLM (B)" in r.stdout


# ----- end to end, simulated ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("store", ["directory", "redis"])
def test_b_loads_what_a_stored_plain_engines_do_not_share(tmp_path, request, store):
    ports = free_ports(5)
    store_flags = (["--kv-store", request.getfixturevalue("redis_url")] if store == "redis"
                   else ["--kv-store-dir", str(tmp_path / "kv")])
    settings = parse_settings(["--scenario", "share", "--simulate", "--sim-speed", "4", "--port", str(ports[0]),
                               "--engine-ports", ",".join(map(str, ports[1:])), "--log-dir", str(tmp_path / "logs"),
                               *store_flags])
    runtime = Runtime(settings)
    try:
        runtime.start()
        assert runtime.precompute_and_wait().line().startswith("preheated with 4 requests")
        assert not _holds_entries(runtime.kv_store)  # preheat stores nothing of the document
        builder = runtime.builder
        ids = builder.build(builder.default_selection(16_000, runtime.max_model_len - 512), "Who binds names?")
        handles = {h.spec.key: h for h in runtime.engines}

        async def ttft(key: str):
            client = handles[key].client()
            try:
                _, stats = await client.complete(ids, max_tokens=2, skip_save=runtime.skip_save(handles[key]))
                return stats
            finally:
                await client.close()

        a, b, pa, pb = (asyncio.run(ttft(k)) for k in ("lmcache_a", "lmcache_b", "plain_a", "plain_b"))
        assert _holds_entries(runtime.kv_store)  # A wrote to the shared store
        assert b.cached_tokens and b.cached_tokens > 0.9 * len(ids)
        assert b.ttft_s < 0.8 * a.ttft_s, (a, b)
        assert not pb.cached_tokens and pb.ttft_s > 0.8 * pa.ttft_s, (pa, pb)
        runtime.kv_store.clear()
        assert not _holds_entries(runtime.kv_store)
    finally:
        runtime.stop()


def _holds_entries(store: KvStore) -> bool:
    """Any stored KV? (The simulator's files are sparse, so a directory's size on disk says nothing.)"""
    if store.redis_url:
        return store.size_bytes() > 0
    return store.directory.is_dir() and any(store.directory.iterdir())


# ----- the Redis store, against a real redis-server -----------------------------------------------------


@pytest.fixture
def redis_url(tmp_path):
    """A real Redis server (Debian's redis-server; .ci/run installs it) on a free port, no persistence."""
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_ports(1)[0]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_until(lambda: _pings(url), 10, "redis-server to answer")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _pings(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.exceptions.ConnectionError:
        return False


@pytest.mark.slow  # a real redis-server
def test_redis_store_sizes_and_clears_lmcache_keys_only(redis_url):
    import redis

    store = KvStore.from_settings(Path("/unused"), redis_url)
    store.prepare()
    r = redis.Redis.from_url(redis_url)
    key = "mistralai/Mistral-7B-Instruct-v0.2@1@0@5f3a@bfloat16"  # LMCache's CacheEngineKey.to_string()
    r.set(key + "kv_bytes", b"x" * 1000)
    r.set(key + "metadata", b"m" * 40)
    r.set("someone-else:data", b"y" * 5000)  # a shared Redis may hold other data
    assert store.size_bytes() == 1000
    assert store.clear() == 1000
    assert r.exists(key + "kv_bytes", key + "metadata") == 0
    assert r.get("someone-else:data") == b"y" * 5000


def test_unreachable_redis_is_one_clear_line_before_any_engine_starts(tmp_path):
    dead = f"redis://127.0.0.1:{free_ports(1)[0]}"
    with pytest.raises(UserFacingError, match="check that redis-server runs there"):
        KvStore.from_settings(tmp_path, dead).prepare()
    ports = free_ports(5)
    r = subprocess.run([sys.executable, "app.py", "--scenario", "share", "--simulate", "--kv-store", dead,
                        "--port", str(ports[0]), "--engine-ports", ",".join(map(str, ports[1:])),
                        "--log-dir", str(tmp_path / "logs")],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"The Redis KV store {dead} failed" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout
    assert "waiting for 4 engines" not in r.stdout


# ----- in the browser -------------------------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.slow
def test_share_page_shows_b_faster_after_a(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing")
    from playwright.sync_api import sync_playwright

    ports = free_ports(5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVDEMO_") and k != "SPACE_ID"}
    env.update(PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    output = tmp_path / "app.out"
    with open(output, "wb") as out:
        proc = _start([sys.executable, "app.py", "--scenario", "share", "--simulate", "--sim-speed", "4",
                       "--port", str(ports[0]), "--engine-ports", ",".join(map(str, ports[1:])),
                       "--log-dir", str(tmp_path / "logs"), "--kv-store-dir", str(tmp_path / "kv")],
                      cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                      start_new_session=True)
    import psutil

    app = App(proc, f"http://127.0.0.1:{ports[0]}/", ports, output)
    try:
        wait_until(lambda: proc.poll() is not None or _ui_answers(app.url), 120, "the share UI to answer")
        assert proc.poll() is None, app.text()[-3000:]
        app.pids = {proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))}
        assert len(app.pids) >= 6  # app, watchdog, four engines
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(app.url)
            page.locator("#send").wait_for()
            assert "SIMULATED" in page.locator("#sim-banner").inner_text()
            wait_until(lambda: "preheated" in page.locator("#status").inner_text(), 30, "the preheat")
            ttfts = {}
            for i, name in enumerate(["LMCache (A)", "LMCache (B)", "plain vLLM (A)", "plain vLLM (B)"]):
                page.locator("#engine label").filter(has_text=name).click()
                page.click("#send")
                wait_until(lambda n=name: n in page.locator("#notice").inner_text(), 30, f"{name}'s answer")
                m = re.search(r"TTFT ([0-9.]+) s", page.locator("#notice").inner_text())
                ttfts[name] = float(m.group(1))
            table = page.locator("#results").inner_text()
            assert table.count("LMCache (A)") == 1 and table.count("plain vLLM (B)") == 1
            assert ttfts["LMCache (B)"] < 0.8 * ttfts["LMCache (A)"], ttfts
            assert ttfts["plain vLLM (B)"] > 0.8 * ttfts["plain vLLM (A)"], ttfts
            page.click("#clear-store")
            wait_until(lambda: "Cleared" in page.locator("#notice").inner_text(), 15, "the store to be cleared")
            assert not any((tmp_path / "kv").iterdir())
            browser.close()
    finally:
        app.pids |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)} if proc.poll() is None else set()
        _interrupt_and_check(app)


def test_a_bad_share_template_is_one_line(tmp_path):
    """The share scenario's yaml goes through the same check as every LMCache yaml (kvdemo.preflight)."""
    from kvdemo.errors import UserFacingError
    from kvdemo.kvstore import KvStore

    bad = tmp_path / "share.yaml"
    bad.write_text("chunk_size: [256\n")
    store = KvStore(directory=tmp_path / "store")
    with pytest.raises(UserFacingError, match=r"not valid YAML \(line \d+\)") as info:
        store.write_lmcache_config(bad, tmp_path / "out")
    assert "\n" not in str(info.value)


def test_the_store_says_where_its_kv_lives(monkeypatch, tmp_path):
    """Disk (page cache or disk), tmpfs (memory) or Redis: what a 'load from the store' measures."""
    from types import SimpleNamespace

    import psutil

    from kvdemo.kvstore import KvStore
    from kvdemo.ui.share_app import store_line

    def mounts(*parts):
        return lambda all=True: [SimpleNamespace(device=d, mountpoint=m, fstype=f, opts="rw") for d, m, f in parts]

    store = KvStore(Path("/data/kv"))
    monkeypatch.setattr(psutil, "disk_partitions", mounts(("/dev/vda", "/", "ext4"), ("/dev/nvme0n1", "/data", "xfs"),
                                                          ("tmpfs", "/dev/shm", "tmpfs")))
    disk = store.location()
    assert disk.startswith("/data/kv on xfs (/dev/nvme0n1): loads read the OS page cache (memory)")
    assert "the disk only when they are not" in disk
    assert "in memory" in KvStore(Path("/dev/shm/kv")).location()
    assert KvStore(Path("/srv/kv")).location().startswith("/srv/kv on ext4 (/dev/vda)")
    assert KvStore(None, "redis://h:6379").location().startswith("a Redis server (redis://h:6379)")
    line = store_line(store)
    assert line.startswith(f"Shared KV store: `{store.remote_url}`  \nWhere the KV lives: {disk}  \n")
    assert "1.14 s once they were dropped from it" in line  # a disk: the measured warm and cold loads
    memory = KvStore(Path("/dev/shm/kv"))
    assert store_line(memory) == f"Shared KV store: `{memory.remote_url}`  \nWhere the KV lives: {memory.location()}"
