"""The KV store that LMCache engines share in the `share` scenario: a directory (LMCache's fs connector) or a
Redis server. Creates, checks and clears it, and writes the LMCache config that points at it.

In Redis, LMCache's connector stores each KV chunk as two keys, `<CacheEngineKey>metadata` and
`<CacheEngineKey>kv_bytes`, where the key string is `model@world_size@worker_id@chunk_hash@dtype[@tags]`
(lmcache 0.5.3, `utils.CacheEngineKey.to_string`). Sizing and clearing touch those keys only, never the
rest of a Redis database someone may share.

LMCache's `local_disk` backend does not share between processes (each engine only knows what it wrote);
its fs remote connector does, with a URL that needs a host and port it then ignores: fs://localhost:1/DIR/.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import UserFacingError
from .preflight import check_lmcache_config

MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")
MIN_FREE_GIB = 4.0  # ~2 GiB of KV per 16K tokens of Mistral-7B, stored once per prompt
REDIS_SCHEMES = ("redis://", "rediss://")
LMCACHE_KEY_GLOB = "*@*@*@*@*"  # model@world_size@worker_id@chunk_hash@dtype...
LMCACHE_KEY_SUFFIXES = (b"metadata", b"kv_bytes")


@dataclass
class KvStore:
    directory: Path | None  # None when the store is a server (redis://...)
    url: str | None = None

    @classmethod
    def from_settings(cls, store_dir: Path, store_url: str | None) -> KvStore:
        if store_url:
            if not store_url.startswith((*REDIS_SCHEMES, "lm://")):
                raise UserFacingError(f"--kv-store {store_url!r}: use redis://host:port (or leave it out for "
                                      "the shared directory --kv-store-dir).")
            return cls(None, store_url)
        return cls(store_dir.expanduser().resolve())

    @property
    def remote_url(self) -> str:
        return self.url or f"fs://localhost:1{self.directory}/"

    def location(self) -> str:
        """Where the stored KV bytes physically are, in one line: what "loaded from the store" measures.

        WHY: a directory store on a disk is read from the OS page cache (memory) while its files are cached —
        right after A stored them, typically — and from the disk only when they are not; on tmpfs it is
        memory always. Load speeds mean different things in each case (issue #17), so the page and the bench
        say which it was.
        """
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
    def redis_url(self) -> str | None:
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
        length of LMCache's kv_bytes values."""
        if self.redis_url:
            return self._redis_call(lambda r: self._kv_bytes(r, self._lmcache_keys(r)))
        if self.directory is None or not self.directory.is_dir():
            return 0
        return sum(p.stat().st_blocks * 512 for p in self.directory.rglob("*") if p.is_file())

    def clear(self) -> int:
        """Delete every stored entry; returns the bytes freed. The directory itself stays; in Redis only
        LMCache's keys go."""
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
        return [k for k in r.scan_iter(match=LMCACHE_KEY_GLOB, count=1000) if k.endswith(LMCACHE_KEY_SUFFIXES)]

    @staticmethod
    def _kv_bytes(r, keys: list[bytes]) -> int:
        """Length of the KV values among LMCache's keys (one pipelined round trip)."""
        kv_keys = [k for k in keys if k.endswith(b"kv_bytes")]
        pipe = r.pipeline(transaction=False)
        for k in kv_keys:
            pipe.strlen(k)
        return sum(pipe.execute()) if kv_keys else 0

    def _redis_call(self, fn):
        """Run fn(client) against the Redis store; any Redis failure becomes one line saying what to do."""
        import redis  # lazy: only the Redis store needs it

        client = redis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=3)
        try:
            return fn(client)
        except redis.exceptions.RedisError as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserFacingError(f"The Redis KV store {self.redis_url} failed ({why}): check that redis-server "
                                  "runs there and the URL (--kv-store redis://[:password@]host:port[/db]).") from exc
        finally:
            client.close()

    def write_lmcache_config(self, template: Path, out_dir: Path) -> Path:
        """A copy of the share template with remote_url pointing at this store (a bad template: one line)."""
        data = dict(check_lmcache_config(template))
        data["remote_url"] = self.remote_url
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "lmcache-share.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path


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
