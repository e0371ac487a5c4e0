"""The KV store that LMCache engines share in the `share` scenario: a directory (LMCache's fs connector) or a
Redis server. Creates, checks and clears it, and writes the LMCache config that points at it.

A Redis server is reached through one of two LMCache 0.5.3 connectors, chosen by the URL's scheme:
- redis:// (or rediss://): the redis-py connector. It stores each KV chunk as two keys,
  `<CacheEngineKey>metadata` and `<CacheEngineKey>kv_bytes`, and loads KV at ~0.26 GB/s
  (benchmarks/results/share-redis-h100.json).
- resp://host:port: the native batched client (lmcache.lmcache_redis, C++, in the wheel; one connection per
  worker thread, `extra_config.resp_num_threads`, default 8, or $KVDEMO_RESP_NUM_THREADS). It stores each
  chunk as ONE key, `<CacheEngineKey>` itself, whose value is exactly one full chunk's KV bytes: no metadata
  key (the shapes come from the engine's own config), so it cannot store partial chunks (save_unfull_chunk
  must be off, which enable_blending forbids). It never sends SELECT (always database 0) and takes a
  password only from extra_config or LMCACHE_RESP_USERNAME / LMCACHE_RESP_PASSWORD, never from the URL.
The key string is `model@world_size@worker_id@chunk_hash@dtype[@tags]` (lmcache 0.5.3,
`utils.CacheEngineKey.to_string`). Sizing and clearing recognise both forms, whatever the scheme (one Redis
may have served both connectors, and the simulated engines write the redis:// form), and touch those keys
only, never the rest of a Redis database someone may share.

LMCache's `local_disk` backend does not share between processes (each engine only knows what it wrote);
its fs remote connector does, with a URL that needs a host and port it then ignores: fs://localhost:1/DIR/.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from .errors import UserFacingError
from .preflight import check_lmcache_config

MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")
MIN_FREE_GIB = 4.0  # ~2 GiB of KV per 16K tokens of Mistral-7B, stored once per prompt
REDIS_SCHEMES = ("redis://", "rediss://")
RESP_SCHEME = "resp://"  # LMCache's native RESP client (lmcache.lmcache_redis) on a Redis server
RESP_NUM_THREADS = 8  # LMCache 0.5.3's default resp_num_threads, written out so the config says it
ENV_RESP_NUM_THREADS = "KVDEMO_RESP_NUM_THREADS"  # set: resp_num_threads for this run, over the template's
LMCACHE_KEY_GLOB = "*@*@*@*@*"  # model@world_size@worker_id@chunk_hash@dtype...: SCAN's server-side filter
LMCACHE_KEY_SUFFIXES = (b"metadata", b"kv_bytes")  # the redis:// connector's two keys per chunk
# CacheEngineKey.to_string(): model@world_size@worker_id@chunk_hash_hex@dtype, then a LayerCacheEngineKey's
# @layer_id and any @tag%value; checked exactly so that clearing leaves other "a@b@c@d@e" keys alone.
LMCACHE_KEY = re.compile(rb"[^@]+@\d+@\d+@-?[0-9a-f]+@[a-z0-9_]+(?:@\d+)?(?:@[^@%]+%[^@]*)*")


@dataclass
class KvStore:
    directory: Path | None  # None when the store is a server (redis://...)
    url: str | None = None

    @classmethod
    def from_settings(cls, store_dir: Path, store_url: str | None) -> KvStore:
        if store_url:
            if not store_url.startswith((*REDIS_SCHEMES, RESP_SCHEME, "lm://")):
                raise UserFacingError(f"--kv-store {store_url!r}: use redis://host:port or resp://host:port (or "
                                      "leave it out for the shared directory --kv-store-dir).")
            if store_url.startswith(RESP_SCHEME):
                check_resp_url(store_url)
            return cls(None, store_url)
        return cls(store_dir.expanduser().resolve())

    @property
    def remote_url(self) -> str:
        return self.url or f"fs://localhost:1{self.directory}/"

    def location(self) -> str:
        """Where the stored KV bytes physically are, in one line: what "loaded from the store" measures.

        WHY: a directory store on a disk is read from the OS page cache (memory) while its files are cached —
        right after A stored them, typically — and from the disk only when they are not; on tmpfs it is
        memory always. Load speeds mean different things in each case, so the page and the bench say which
        it was.
        """
        if self.is_resp:
            return (f"a Redis server ({self.url}, database 0) through LMCache's native batched RESP client: "
                    "every load goes through its network protocol")
        if self.redis_url:
            return f"a Redis server ({self.redis_url}): every load goes through its network protocol"
        if self.directory is None:
            return f"an LMCache server ({self.url})"
        fstype, device = mount_of(self.directory)
        if fstype in MEMORY_FILESYSTEMS:
            return f"{self.directory} on {fstype}: in memory, so a load from the store is a memory copy"
        return (f"{self.directory} on {fstype or 'an unknown filesystem'}"
                f"{f' ({device})' if device else ''}: loads read the OS page cache (memory) while the files are "
                "cached, e.g. right after they were stored, and the disk only when they are not")

    @property
    def is_resp(self) -> bool:
        """The store is a Redis server that LMCache reaches through its native RESP client (resp://)."""
        return bool(self.url and self.url.startswith(RESP_SCHEME))

    def on_disk(self) -> bool:
        """A directory store on a filesystem that is not memory (loads may come from the disk)."""
        return self.directory is not None and mount_of(self.directory)[0] not in MEMORY_FILESYSTEMS

    @property
    def redis_url(self) -> str | None:
        """The store as a URL redis-py opens (kvdemo's own checks, the simulated engines), or None.

        WHY a different URL for resp://: redis-py knows no resp:// scheme, and LMCache's RESP client never
        sends SELECT, so the keys it writes are in database 0 — the one named here.
        """
        if self.is_resp:
            parts = urlsplit(self.url)
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            return f"redis://{host}:{parts.port}/0"
        return self.url if self.url and self.url.startswith(REDIS_SCHEMES) else None

    def prepare(self, min_free_gib: float = MIN_FREE_GIB) -> None:
        """Create the directory, check it is writable and has room (or that Redis answers); clear messages."""
        if self.redis_url:
            self._redis_call(lambda r: r.ping())
            return
        if self.directory is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserFacingError(f"Cannot create the KV store {self.directory}: {exc.strerror}. "
                                  "Choose another with --kv-store-dir.") from exc
        if not os.access(self.directory, os.W_OK):
            raise UserFacingError(f"The KV store {self.directory} is not writable: choose another with --kv-store-dir.")
        free_gib = shutil.disk_usage(self.directory).free / 2**30
        if free_gib < min_free_gib:
            raise UserFacingError(f"Only {free_gib:.1f} GiB free under {self.directory} (need {min_free_gib:.0f}): "
                                  "free space, run with --clear-kv-store, or choose another --kv-store-dir.")

    def size_bytes(self) -> int:
        """Bytes on disk (allocated blocks, so sparse files count as what they really take), or in Redis the
        length of LMCache's KV values (redis:// `...kv_bytes` keys and resp:// bare keys, not metadata)."""
        if self.redis_url:
            return self._redis_call(lambda r: self._kv_bytes(r, self._lmcache_keys(r)))
        if self.directory is None or not self.directory.is_dir():
            return 0
        return sum(p.stat().st_blocks * 512 for p in self.directory.rglob("*") if p.is_file())

    def clear(self) -> int:
        """Delete every stored entry; returns the bytes freed. The directory itself stays; in Redis only
        LMCache's keys go (both connectors' forms).

        WHY clear only while no engine loads (kvdemo clears at start, or on the page's button): LMCache
        0.5.3's native RESP client reads a GET reply as a header of the expected length, so a key deleted
        between its EXISTS and its GET (a nil reply, shorter) leaves that worker connection waiting forever.
        """
        if self.redis_url:
            def delete(r) -> int:
                keys = self._lmcache_keys(r)
                freed = self._kv_bytes(r, keys)
                for i in range(0, len(keys), 1000):
                    r.delete(*keys[i:i + 1000])
                return freed
            return self._redis_call(delete)
        if self.directory is None:
            raise UserFacingError(f"kvdemo cannot clear {self.url}: clear it where that server runs.")
        freed = self.size_bytes()
        if self.directory.is_dir():
            for p in self.directory.iterdir():
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        return freed

    @staticmethod
    def _lmcache_keys(r) -> list[bytes]:
        return [k for k in r.scan_iter(match=LMCACHE_KEY_GLOB, count=1000) if lmcache_key_kind(k)]

    @staticmethod
    def _kv_bytes(r, keys: list[bytes]) -> int:
        """Length of the KV values among LMCache's keys (one pipelined round trip)."""
        kv_keys = [k for k in keys if lmcache_key_kind(k) in ("kv_bytes", "resp")]
        pipe = r.pipeline(transaction=False)
        for k in kv_keys:
            pipe.strlen(k)
        return sum(pipe.execute()) if kv_keys else 0

    def _redis_call(self, fn):
        """Run fn(client) against the Redis store; any Redis failure becomes one line saying what to do."""
        import redis  # lazy: only the Redis store needs it

        # resp://: the credentials LMCache's RESP client would use (redis_adapter.py reads the same variables).
        auth = {k: v for k, v in (("username", os.environ.get("LMCACHE_RESP_USERNAME")),
                                  ("password", os.environ.get("LMCACHE_RESP_PASSWORD"))) if v} if self.is_resp else {}
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=3, **auth)
        try:
            return fn(client)
        except redis.exceptions.RedisError as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            form = ("resp://host:port, a password in LMCACHE_RESP_PASSWORD" if self.is_resp
                    else "redis://[:password@]host:port[/db]")
            raise UserFacingError(f"The Redis KV store {self.url} failed ({why}): check that redis-server "
                                  f"runs there and the URL (--kv-store {form}).") from exc
        finally:
            client.close()

    def write_lmcache_config(self, template: Path, out_dir: Path) -> Path:
        """A copy of the share template with remote_url pointing at this store (a bad template: one line).

        resp://: also `extra_config.resp_num_threads` ($KVDEMO_RESP_NUM_THREADS if set, else the template's,
        else LMCache's default), so the written config says how many connections each engine opens; and a
        template the RESP connector would refuse with an assert at engine start (it stores whole chunks only,
        without metadata) is refused here.
        """
        data = dict(check_lmcache_config(template))
        data["remote_url"] = self.remote_url
        if self.is_resp:
            extra = dict(data.get("extra_config") or {})
            if data.get("enable_blending") or data.get("save_unfull_chunk") or extra.get("save_chunk_meta"):
                raise UserFacingError(f"--kv-store {self.url}: LMCache's RESP connector stores whole chunks "
                                      f"without metadata; remove enable_blending, save_unfull_chunk and "
                                      f"extra_config.save_chunk_meta from {template}, or use redis://.")
            threads = resp_threads_from_env()
            if threads is not None:
                extra["resp_num_threads"] = threads
            extra.setdefault("resp_num_threads", RESP_NUM_THREADS)
            data["extra_config"] = extra
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "lmcache-share.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path


def resp_threads_from_env() -> int | None:
    """$KVDEMO_RESP_NUM_THREADS as a whole number of 1 or more, None when unset or empty (else one line)."""
    value = os.environ.get(ENV_RESP_NUM_THREADS, "").strip()
    if not value:
        return None
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise UserFacingError(f"{ENV_RESP_NUM_THREADS}={value!r}: give the number of Redis connections (worker "
                              "threads) per LMCache engine, 1 or more.")
    return int(value)


def check_resp_url(url: str) -> None:
    """resp://host:port and nothing else, or one line saying why.

    WHY: LMCache's RESP connector takes only the host and port from the URL; a password or a /db there
    would be silently ignored (it authenticates from extra_config or LMCACHE_RESP_PASSWORD and never
    SELECTs a database), and a missing port fails inside the engine with an assert.
    """
    try:
        parts = urlsplit(url)
        ok = bool(parts.hostname and parts.port is not None and not (parts.username or parts.password)
                  and not parts.path.strip("/") and not parts.query)
    except ValueError:  # a port that is not a number, a broken [IPv6]
        ok = False
    if not ok:
        raise UserFacingError(f"--kv-store {url!r}: use resp://host:port (LMCache's RESP client uses database 0; "
                              "put a password in LMCACHE_RESP_PASSWORD, not the URL).")


def lmcache_key_kind(key: bytes) -> str | None:
    """Which LMCache key this Redis key is: "kv_bytes" / "metadata" (the redis:// connector's pair), "resp"
    (the resp:// connector's single key, the CacheEngineKey itself), or None (not LMCache's)."""
    for suffix in LMCACHE_KEY_SUFFIXES:
        if key.endswith(suffix) and LMCACHE_KEY.fullmatch(key[:-len(suffix)]):
            return suffix.decode()
    return "resp" if LMCACHE_KEY.fullmatch(key) else None


def mount_of(path: Path) -> tuple[str | None, str | None]:
    """(filesystem type, device) of the mount holding ``path`` (the longest mount point above it)."""
    import psutil

    target = str(path.resolve())
    best = None
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint.rstrip("/") or "/"
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and \
                (best is None or len(mount) > len(best.mountpoint.rstrip("/") or "/")):
            best = part
    return (best.fstype, best.device) if best else (None, None)
