"""The upload budget: uploaded chunks share the 🚀 engine's LMCache CPU cache with the shipped chunks.

WHY: the 🚀 engine's LMCache keeps stored KV in one pinned CPU cache of ``max_local_cpu_size`` GiB
(lmcache_configs/blend.yaml) and, when a store does not fit, evicts the least recently used chunks. Every
browser session's uploads are stored in that same cache as the shipped library. Unchecked, a few large
uploads would push the shipped chunks out, and every visitor's questions on them would quietly fall back to
a full prefill: the demo's speed-up would vanish for everyone. So uploads get a budget: the cache size minus
the shipped chunks' KV minus a margin (or ``--upload-budget-gib``), kept by an engine-wide `UploadLedger`
(one per Runtime, since all sessions share the one engine). When a new upload would exceed it, the oldest
uploaded chunks, whichever session added them, are evicted first: taken off their session's picker, which
sees a one-line note the next time it acts.

What eviction does and does not do to the KV itself (read in LMCache 0.5.3's source, not run on a GPU):

* There is no clean way to drop an upload's keys from the LocalCPUBackend from outside the engine process.
  ``LMCacheEngine.clear(tokens=...)`` removes exactly the keys of one token sequence and
  ``LocalCPUBackend.remove(key)`` one key, but both are Python calls inside vLLM's worker process. vLLM's
  OpenAI server has no route to them. LMCache's optional internal API server (``internal_api_server_enabled``,
  off by default) has ``DELETE /cache/clear``, which takes no tokens and empties whole backends (the shipped
  chunks too), and ``POST /run_script``, which execs posted Python inside the engine: it could call
  ``clear(tokens=...)``, but it is a code-execution endpoint (bound to 0.0.0.0 by default) that the demo does
  not turn on. So the ledger stops *offering* an evicted upload; its KV stays in LMCache until LRU drops it.
* So that LRU drops uploads before shipped chunks, `refresh_shipped` sends, after an upload's precompute and
  only once the uploads stored so far could overflow the cache (`UploadLedger.needs_refresh`), a 1-token
  blended request over all shipped chunks with ``skip_save``. Its lookup pins each chunk's keys
  (``LMCacheEngine.lookup(pin=True)``), and ``StorageManager.touch_cache`` → ``LocalCPUBackend.touch_cache``
  → ``cache_policy.update_on_hit`` makes them most recently used, so the next store evicts the least recently
  used uploads first. Its cost is one blended prefill of the shipped chunks (about 33K tokens, in as many
  requests as --max-model-len needs), like one long question. Limits: lookup stops at the first segment it
  misses, so a shipped chunk already evicted leaves the ones after it in that request unrefreshed; LMCache
  evicts by recency while the ledger evicts by upload age, so a recently asked-about old upload can outlive a
  newer one in LMCache; and nothing resets the ledger when the 🚀 engine restarts: the uploads' KV is lost,
  sessions keep offering them, and questions on them prefill those chunks.

Bytes per token: the app has no LMCache engine object, so it uses the formula that LMCache's own metadata
gives inside the engine (lmcache_patches/telemetry.py ``kv_bytes_per_token``: per-layer K and V shapes ×
dtype size) on the model's config.json, or a labelled estimate when that is not at hand.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import Settings
from .errors import UserFacingError
from .lmcache_config import LmcacheConfig
from .preflight import model_config
from .runtime_view import RuntimeView

log = logging.getLogger(__name__)

GIB = 2**30
# Mistral-7B (the default model): 2 (K and V) × 32 layers × 8 KV heads × 128 head dim × 2 bytes (bf16).
ESTIMATED_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2
# Room the budget leaves beside the shipped chunks: edited system prompts that ensure_sys_prompt_cached stores,
# and LMCache's per-chunk allocation overhead. 10% of the cache, at least 0.5 GiB.
MARGIN_FRACTION = 0.10
MIN_MARGIN_BYTES = GIB // 2


def size_text(n_bytes: float) -> str:
    """6.2 GiB, or 187 MiB below 1 GiB (an upload's KV is often far smaller than the budget)."""
    return f"{n_bytes / GIB:.1f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.0f} MiB"


# ----- KV bytes per token -----------------------------------------------------------------------------

@dataclass(frozen=True)
class KvSize:
    """Bytes of KV one token takes in LMCache, and where the number comes from (shown on the page)."""

    bytes_per_token: int
    source: str  # "the model's config" or why it is an estimate

    @property
    def estimated(self) -> bool:
        return self.source != "the model's config"

    def text(self) -> str:
        return f"{self.bytes_per_token / 1024:.0f} KiB/token ({self.source})"


def kv_bytes_per_token(config: Mapping[str, Any], engine_args: Sequence[str] = ()) -> int | None:
    """2 (K and V) × layers × KV heads × head dim × bytes per element, from a Hugging Face config dict.

    None when the config lacks the shape (e.g. an MLA model, whose KV is not per head). The element size is
    vLLM's KV dtype: ``--kv-cache-dtype fp8*`` in the engine args gives 1 byte, ``--dtype float32`` 4; else
    the model's 16-bit dtype (vLLM runs float32 checkpoints in 16 bits by default), 2 bytes.
    """
    cfg = config.get("text_config") or config
    try:
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return 2 * layers * kv_heads * head_dim * _kv_dtype_bytes(engine_args)


def _kv_dtype_bytes(engine_args: Sequence[str]) -> int:
    def flag(name: str) -> str | None:
        for i, arg in enumerate(engine_args):
            if arg == name and i + 1 < len(engine_args):
                return engine_args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
        return None

    if (flag("--kv-cache-dtype") or "").startswith("fp8"):
        return 1
    return 4 if flag("--dtype") in ("float32", "float") else 2


def kv_size(settings: Settings) -> KvSize:
    """KV bytes per token of the configured model, or a labelled estimate (Mistral-7B's 128 KiB)."""
    config = model_config(settings)
    n = kv_bytes_per_token(config, settings.engine_args) if config else None
    if n:
        return KvSize(n, "the model's config")
    why = "no model config" if config is None else "model config without a per-head KV shape"
    return KvSize(ESTIMATED_BYTES_PER_TOKEN, f"estimate: {why}, assumed like Mistral-7B")


def default_budget(cache_bytes: int, shipped_bytes: int) -> int:
    """The cache minus the shipped chunks' KV minus a margin (10% of the cache, at least 0.5 GiB); never < 0."""
    margin = max(MIN_MARGIN_BYTES, int(cache_bytes * MARGIN_FRACTION))
    return max(0, cache_bytes - shipped_bytes - margin)


# ----- the ledger ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LedgerEntry:
    session: str  # Uploads.session of the browser session that uploaded it
    name: str  # "upload: notes (1/3)"
    tokens: int
    kv_bytes: int


class UploadLedger:
    """Every session's uploaded chunks with their KV bytes, oldest first, kept within the upload budget.

    Thread-safe: sessions upload concurrently. Evicted chunks are remembered per session until that session
    collects them (`take_evicted`), because only the session's own event can change its picker.
    """

    def __init__(self, budget_bytes: int, kv: KvSize, cache_bytes: int, shipped_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.kv = kv
        self.cache_bytes = cache_bytes
        self.shipped_bytes = shipped_bytes
        self.stored_bytes = 0  # every upload ever admitted: evicted ones' KV may still sit in LMCache
        self._entries: OrderedDict[tuple[str, str], LedgerEntry] = OrderedDict()
        self._evicted: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_runtime(cls, runtime: RuntimeView) -> UploadLedger:
        """The ledger of a runtime's 🚀 engine: its LMCache CPU cache, the shipped chunks' precompute requests
        ([BOS]+sys, then [BOS]+SEP+chunk each: what precompute stored), the model's KV size."""
        s = runtime.settings
        lmc = getattr(runtime, "lmcache_config", None) or LmcacheConfig.load(s.lmcache_config_path)
        kv = kv_size(s)
        shipped = sum(len(ids) for ids in runtime.precompute_prompts()) * kv.bytes_per_token
        cache = int(lmc.cpu_cache_gib * GIB)
        budget = (int(s.upload_budget_gib * GIB) if s.upload_budget_gib is not None
                  else default_budget(cache, shipped))
        ledger = cls(budget, kv, cache, shipped)
        print(f"kvdemo: upload budget {ledger.budget_text} of {size_text(cache)} LMCache CPU cache "
              f"(shipped chunks {size_text(shipped)}; {kv.text()})", flush=True)
        return ledger

    @property
    def budget_text(self) -> str:
        return size_text(self.budget_bytes)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.kv_bytes for e in self._entries.values())

    def describe(self) -> str:
        """One line for the page: the budget and how it is measured."""
        tokens = self.budget_bytes // self.kv.bytes_per_token
        return f"upload budget {self.budget_text} (~{tokens:,} tokens at {self.kv.text()})"

    def kv_bytes(self, tokens: int) -> int:
        return tokens * self.kv.bytes_per_token

    def check(self, stem: str, tokens: int) -> None:
        """Refuse, before anything is precomputed or evicted, an upload that alone exceeds the budget."""
        need = self.kv_bytes(tokens)
        if need > self.budget_bytes:
            raise UserFacingError(
                f"{stem} would take {size_text(need)} of 🚀's KV cache ({tokens:,} tokens), more than the upload "
                f"budget of {self.budget_text} that keeps the shipped chunks cached: upload a shorter text.")

    def admit(self, session: str, chunks: Sequence[tuple[str, int]]) -> list[LedgerEntry]:
        """Record one upload's (name, tokens) chunks; evict the oldest chunks (any session's) until it fits.

        Returns the evicted entries. Raises UserFacingError, changing nothing, if the upload alone is over the
        budget.
        """
        new = [LedgerEntry(session, name, n, self.kv_bytes(n)) for name, n in chunks]
        self.check(chunks[0][0] if chunks else "the upload", sum(n for _, n in chunks))
        need = sum(e.kv_bytes for e in new)
        evicted: list[LedgerEntry] = []
        with self._lock:
            used = sum(e.kv_bytes for e in self._entries.values())
            while self._entries and used + need > self.budget_bytes:
                _, old = self._entries.popitem(last=False)
                used -= old.kv_bytes
                evicted.append(old)
                self._evicted.setdefault(old.session, []).append(old.name)
            for e in new:
                self._entries[(session, e.name)] = e
            self.stored_bytes += need
        return evicted

    def take_evicted(self, session: str) -> list[str]:
        """The names evicted from this session since it last asked (each is reported once)."""
        with self._lock:
            return self._evicted.pop(session, [])

    def needs_refresh(self) -> bool:
        """Whether LMCache's LRU could have to evict on the next upload: the shipped chunks plus every upload
        stored so far plus one more upload of the whole budget would not fit the cache. Before that, the
        shipped chunks' recency does not matter and `refresh_shipped` would only cost GPU time."""
        with self._lock:
            return self.shipped_bytes + self.stored_bytes + self.budget_bytes > self.cache_bytes

    def note(self, names: Sequence[str]) -> str:
        """'upload: notes (1/3) was evicted to keep the shipped chunks cached (upload budget 6.2 GiB)'."""
        shown = list(names[:3])
        if len(names) > 3:
            listed = f"{', '.join(shown)} and {len(names) - 3} more"
        elif len(shown) > 1:
            listed = f"{', '.join(shown[:-1])} and {shown[-1]}"
        else:
            listed = shown[0]
        verb = "was" if len(names) == 1 else "were"
        return f"{listed} {verb} evicted to keep the shipped chunks cached (upload budget {self.budget_text})"


# ----- keeping the shipped chunks recent ------------------------------------------------------------------

def refresh_requests(runtime: RuntimeView) -> list[list[int]]:
    """Blended prompts over every shipped chunk (library order, as few as --max-model-len allows): each
    looks up, and so touches, the chunks' stored KV. The question is fixed; the answer is 1 token."""
    b = runtime.builder
    assert b is not None
    sys_ids = b.sys_ids()
    question = b.question_ids("Cache refresh: answer with one word.")
    limit = runtime.max_model_len - 64
    groups: list[list[str]] = [[]]
    for name in runtime.library.chunks:
        if groups[-1] and b.context_tokens(groups[-1] + [name]) + len(b.sep_ids) + len(question) > limit:
            groups.append([])
        groups[-1].append(name)
    return [b.assemble(sys_ids, [b.chunk_ids(n) for n in g], question) for g in groups if g]


async def refresh_shipped(runtime: RuntimeView) -> float:
    """Make the shipped chunks LMCache's most recently used entries (see the module docstring); seconds taken.

    Sent with skip_save, like questions: nothing new is stored. Raises EngineError / UserFacingError.
    """
    t0 = time.monotonic()
    client = runtime.lmcache_engine.client()
    try:
        for ids in refresh_requests(runtime):
            await client.complete(ids, max_tokens=1, skip_save=True)
    finally:
        await client.close()
    return time.monotonic() - t0
