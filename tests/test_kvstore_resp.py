"""The share scenario's KV store on LMCache's native RESP client (--kv-store resp://host:port).

LMCache 0.5.3's resp:// connector writes one Redis key per chunk, the CacheEngineKey string itself (no
`metadata` / `kv_bytes` pair as redis:// writes), always in database 0. kvdemo must size and clear those keys,
and only those, and say clearly when the server does not answer.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT
from helpers import free_ports, wait_until

from kvdemo.config import parse_settings
from kvdemo.errors import UserFacingError
from kvdemo.kvstore import KvStore, lmcache_key_kind
from kvdemo.runtime import Runtime

KEY = "mistralai/Mistral-7B-Instruct-v0.2@1@0@5f3a@bfloat16"  # CacheEngineKey.to_string()

# ----- the URL --------------------------------------------------------------------------------------------


def test_resp_url_is_accepted_and_checked_through_redis_database_0(tmp_path):
    store = KvStore.from_settings(tmp_path, "resp://10.0.0.5:6390")
    assert store.is_resp and store.directory is None
    assert store.remote_url == "resp://10.0.0.5:6390"  # what LMCache gets
    assert store.redis_url == "redis://10.0.0.5:6390/0"  # what kvdemo's own checks open (no SELECT in resp)
    assert store.location().startswith("a Redis server (resp://10.0.0.5:6390, database 0) through LMCache's "
                                       "native batched RESP client")
    assert not KvStore.from_settings(tmp_path, "redis://10.0.0.5:6379").is_resp


@pytest.mark.parametrize("url", ["resp://h", "resp://:secret@h:6390", "resp://user:pw@h:6390", "resp://h:6390/2",
                                 "resp://h:6390?db=1", "resp://h:port", "resp://:6390"])
def test_resp_url_takes_host_and_port_only(tmp_path, url):
    """LMCache's RESP connector ignores a password or /db in the URL, and asserts on a missing port."""
    with pytest.raises(UserFacingError, match=r"use resp://host:port .*LMCACHE_RESP_PASSWORD") as info:
        KvStore.from_settings(tmp_path, url)
    assert "\n" not in str(info.value)


def test_unknown_scheme_names_both_redis_forms(tmp_path):
    with pytest.raises(UserFacingError, match="redis://host:port or resp://host:port"):
        KvStore.from_settings(tmp_path, "ftp://somewhere")


# ----- which keys are LMCache's --------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "kind"), [
    (KEY, "resp"),
    (KEY + "kv_bytes", "kv_bytes"),
    (KEY + "metadata", "metadata"),
    ("models/smollm2-135m@2@1@-3fa9c@half@tenant%acme", "resp"),  # negative hash, a tag
    ("m@1@0@ab12@bfloat16@7", "resp"),  # LayerCacheEngineKey: @layer_id
    ("m@1@0@ab12@fp8_e4m3fn@tenant%acmekv_bytes", "kv_bytes"),
    ("simulated@1@0@0123456789abcdef0123@simulated", "resp"),  # kvdemo's simulated engines' key
    ("simulated@1@0@0123456789abcdef0123@simulatedmetadata", "metadata"),
    ("someone-else:data", None),
    ("alice@bob@carol@dave@eve", None),  # five fields, but not LMCache's
    ("user@1@2@not-hex@bfloat16", None),
    ("m@1@0@ab12@bfloat16:other", None),
])
def test_lmcache_keys_are_recognised_exactly(key, kind):
    assert lmcache_key_kind(key.encode()) == kind


# ----- the share config ----------------------------------------------------------------------------------


def test_resp_config_says_its_threads_and_keeps_the_template(tmp_path, monkeypatch):
    monkeypatch.delenv("KVDEMO_RESP_NUM_THREADS", raising=False)
    store = KvStore.from_settings(tmp_path, "resp://127.0.0.1:6390")
    path = store.write_lmcache_config(REPO_ROOT / "lmcache_configs" / "share.yaml", tmp_path / "logs")
    data = yaml.safe_load(path.read_text())
    assert data["remote_url"] == "resp://127.0.0.1:6390"
    assert data["extra_config"] == {"use_exists_sync": True, "resp_num_threads": 8}
    assert not data.get("save_unfull_chunk", False) and not data.get("enable_blending", False)

    own = tmp_path / "own.yaml"
    own.write_text("chunk_size: 256\nextra_config:\n  resp_num_threads: 16\n")
    data = yaml.safe_load(store.write_lmcache_config(own, tmp_path / "logs2").read_text())
    assert data["extra_config"] == {"resp_num_threads": 16}  # the template's own choice wins


def test_resp_threads_from_the_environment_win_and_are_checked(tmp_path, monkeypatch):
    store = KvStore.from_settings(tmp_path, "resp://127.0.0.1:6390")
    own = tmp_path / "own.yaml"
    own.write_text("chunk_size: 256\nextra_config:\n  resp_num_threads: 16\n")
    for value, expected in (("32", 32), (" ", 16), ("", 16)):
        monkeypatch.setenv("KVDEMO_RESP_NUM_THREADS", value)
        data = yaml.safe_load(store.write_lmcache_config(own, tmp_path / f"o{expected}").read_text())
        assert data["extra_config"]["resp_num_threads"] == expected
    monkeypatch.setenv("KVDEMO_RESP_NUM_THREADS", "4")
    data = yaml.safe_load(store.write_lmcache_config(REPO_ROOT / "lmcache_configs" / "share.yaml",
                                                     tmp_path / "share").read_text())
    assert data["extra_config"] == {"use_exists_sync": True, "resp_num_threads": 4}
    for bad in ("0", "-2", "eight", "2.5"):
        monkeypatch.setenv("KVDEMO_RESP_NUM_THREADS", bad)
        with pytest.raises(UserFacingError, match="KVDEMO_RESP_NUM_THREADS") as info:
            store.write_lmcache_config(own, tmp_path / "bad")
        assert "\n" not in str(info.value)
    monkeypatch.setenv("KVDEMO_RESP_NUM_THREADS", "12")  # a directory store writes no RESP setting
    data = yaml.safe_load(KvStore.from_settings(tmp_path, None).write_lmcache_config(
        REPO_ROOT / "lmcache_configs" / "share.yaml", tmp_path / "dir").read_text())
    assert "resp_num_threads" not in data["extra_config"]


@pytest.mark.parametrize("setting", ["enable_blending: true", "save_unfull_chunk: true",
                                     "extra_config:\n  save_chunk_meta: true"])
def test_resp_refuses_a_template_its_connector_would_assert_on(tmp_path, setting):
    """LMCache's RESPConnectorAdapter asserts save_unfull_chunk and save_chunk_meta are off (whole chunks,
    no metadata); enable_blending turns save_unfull_chunk on. One line before any engine starts."""
    template = tmp_path / "share.yaml"
    template.write_text(f"chunk_size: 256\n{setting}\n")
    with pytest.raises(UserFacingError, match="RESP connector stores whole chunks without metadata") as info:
        KvStore.from_settings(tmp_path, "resp://127.0.0.1:6390").write_lmcache_config(template, tmp_path / "o")
    assert "\n" not in str(info.value)
    KvStore.from_settings(tmp_path, "redis://127.0.0.1:6390").write_lmcache_config(template, tmp_path / "o")


def test_simulated_engines_on_resp_use_its_database(tmp_path):
    """The simulated stand-ins speak redis-py, so they get the redis:// form of the same server and db 0."""
    runtime = Runtime(parse_settings(["--scenario", "share", "--simulate", "--kv-store", "resp://127.0.0.1:6390",
                                      "--log-dir", str(tmp_path)]))
    for spec in runtime.plan():
        argv = spec.argv()
        assert ("--store-url" in argv) == spec.lmcache
        if spec.lmcache:
            assert argv[argv.index("--store-url") + 1] == "redis://127.0.0.1:6390/0"
            config = yaml.safe_load(Path(spec.lmcache_config).read_text())  # what a real engine would get
            assert config["remote_url"] == "resp://127.0.0.1:6390"


# ----- against a real redis-server ------------------------------------------------------------------------


def _redis_server(tmp_path, *args: str):
    """A real Redis server (Debian's redis-server; .ci/run installs it) on a free port, no persistence."""
    import redis

    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_ports(1)[0]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answers() -> bool:
        try:
            redis.Redis(port=port, socket_connect_timeout=0.5).ping()
        except redis.exceptions.AuthenticationError:
            return True  # up, wants a password
        except redis.exceptions.ResponseError as exc:
            return "NOAUTH" in str(exc)
        except redis.exceptions.ConnectionError:
            return False
        return True

    wait_until(answers, 10, "redis-server to answer")
    return proc, port


@pytest.fixture
def resp_port(tmp_path):
    proc, port = _redis_server(tmp_path)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.slow  # a real redis-server
def test_resp_store_sizes_and_clears_lmcache_keys_only(resp_port):
    import redis

    store = KvStore.from_settings(Path("/unused"), f"resp://127.0.0.1:{resp_port}")
    store.prepare()
    r = redis.Redis(port=resp_port)
    r.set(KEY, b"x" * 1000)  # resp://: one key, the whole chunk's KV
    r.set(KEY.replace("@5f3a@", "@5f3b@"), b"x" * 1000)
    r.set("m@1@0@ab@half" + "kv_bytes", b"k" * 300)  # an earlier redis:// run on the same server ...
    r.set("m@1@0@ab@half" + "metadata", b"m" * 40)  # ... its metadata is not KV
    foreign = {"someone-else:data": b"y" * 5000, "alice@bob@carol@dave@eve": b"z" * 700}  # a shared Redis
    for k, v in foreign.items():
        r.set(k, v)
    other_db = redis.Redis(port=resp_port, db=1)
    other_db.set(KEY, b"d" * 900)  # LMCache's RESP client never SELECTs: not its database
    assert store.size_bytes() == 2300
    assert store.clear() == 2300
    assert store.size_bytes() == 0
    assert sorted(r.keys()) == sorted(k.encode() for k in foreign)
    assert all(r.get(k) == v for k, v in foreign.items())
    assert other_db.get(KEY) == b"d" * 900


def test_unreachable_resp_store_is_one_clear_line(tmp_path):
    dead = f"resp://127.0.0.1:{free_ports(1)[0]}"
    with pytest.raises(UserFacingError, match=r"The Redis KV store resp://127\.0\.0\.1:\d+ failed \(.*\): check "
                                              r"that redis-server runs there .*--kv-store resp://host:port") as info:
        KvStore.from_settings(tmp_path, dead).prepare()
    assert "\n" not in str(info.value) and dead in str(info.value)


@pytest.mark.slow  # a real redis-server
def test_resp_store_with_a_password_uses_lmcaches_variables(tmp_path, monkeypatch):
    """The password LMCache's RESP client reads (LMCACHE_RESP_PASSWORD) is the one kvdemo's checks use."""
    proc, port = _redis_server(tmp_path, "--requirepass", "s3cret")
    try:
        store = KvStore.from_settings(tmp_path, f"resp://127.0.0.1:{port}")
        monkeypatch.delenv("LMCACHE_RESP_USERNAME", raising=False)
        monkeypatch.delenv("LMCACHE_RESP_PASSWORD", raising=False)
        with pytest.raises(UserFacingError, match="LMCACHE_RESP_PASSWORD"):
            store.prepare()
        monkeypatch.setenv("LMCACHE_RESP_PASSWORD", "s3cret")
        store.prepare()
        assert store.size_bytes() == 0
        assert "s3cret" not in store.location() and "s3cret" not in (store.redis_url or "")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow  # a real redis-server and four simulated engines
def test_share_scenario_runs_on_a_resp_url_simulated(tmp_path, resp_port):
    """--kv-store resp://: prepare pings it, A's stored KV shows in size_bytes, clear empties it (simulated
    engines write the redis:// form into the same database 0, which kvdemo recognises too)."""
    ports = free_ports(5)
    settings = parse_settings(["--scenario", "share", "--simulate", "--sim-speed", "4", "--port", str(ports[0]),
                               "--engine-ports", ",".join(map(str, ports[1:])), "--log-dir", str(tmp_path / "logs"),
                               "--kv-store", f"resp://127.0.0.1:{resp_port}", "--clear-kv-store"])
    runtime = Runtime(settings)
    try:
        runtime.start()
        runtime.precompute_and_wait()
        assert runtime.kv_store.size_bytes() == 0
        builder = runtime.builder
        ids = builder.build(builder.default_selection(8_000, runtime.max_model_len - 512), "Who binds names?")
        handle = next(h for h in runtime.engines if h.spec.key == "lmcache_a")

        async def ask() -> None:
            client = handle.client()
            try:
                await client.complete(ids, max_tokens=2, skip_save=runtime.skip_save(handle))
            finally:
                await client.close()

        asyncio.run(ask())
        assert runtime.kv_store.size_bytes() > 0
        assert runtime.kv_store.clear() > 0 and runtime.kv_store.size_bytes() == 0
    finally:
        runtime.stop()
