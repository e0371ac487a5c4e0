"""The KV store that LMCache engines share in the `share` scenario: a directory (LMCache's fs connector) or a
Redis server. Creates, checks and clears it, and writes the LMCache config that points at it.

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

MIN_FREE_GIB = 4.0  # ~2 GiB of KV per 16K tokens of Mistral-7B, stored once per prompt


@dataclass
class KvStore:
    directory: Path | None  # None when the store is a server (redis://...)
    url: str | None = None

    @classmethod
    def from_settings(cls, store_dir: Path, store_url: str | None) -> KvStore:
        if store_url:
            if not store_url.startswith(("redis://", "rediss://", "lm://")):
                raise UserFacingError(f"--kv-store {store_url!r}: use redis://host:port (or leave it out for "
                                      "the shared directory --kv-store-dir).")
            return cls(None, store_url)
        return cls(store_dir.expanduser().resolve())

    @property
    def remote_url(self) -> str:
        return self.url or f"fs://localhost:1{self.directory}/"

    def prepare(self, min_free_gib: float = MIN_FREE_GIB) -> None:
        """Create the directory, check it is writable and has room; clear messages otherwise."""
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
        """Bytes on disk (allocated blocks, so sparse files count as what they really take)."""
        if self.directory is None or not self.directory.is_dir():
            return 0
        return sum(p.stat().st_blocks * 512 for p in self.directory.rglob("*") if p.is_file())

    def clear(self) -> int:
        """Delete every stored entry; returns the bytes freed. The directory itself stays."""
        if self.directory is None:
            raise UserFacingError("Clearing a Redis store is not done by kvdemo: use redis-cli FLUSHDB on it.")
        freed = self.size_bytes()
        if self.directory.is_dir():
            for p in self.directory.iterdir():
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        return freed

    def write_lmcache_config(self, template: Path, out_dir: Path) -> Path:
        """A copy of the share template with remote_url pointing at this store."""
        data = yaml.safe_load(template.read_text()) or {}
        data["remote_url"] = self.remote_url
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "lmcache-share.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path
