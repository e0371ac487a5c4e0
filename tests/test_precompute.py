"""Precompute plan of the blending scenario: chunk segments, then one warm-up request per engine."""

from __future__ import annotations

from conftest import make_runtime

from kvdemo.prompts import DEFAULT_CONTEXT_TOKENS
from kvdemo.runtime import EngineHandle
from kvdemo.scenarios.blend import warm_up_prompts


class RecordingClient:
    """Stands in for EngineClient: records what would be sent."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.sent: list[dict] = []

    async def complete(self, ids, max_tokens=1, skip_save=False, **kw):
        self.sent.append({"ids": list(ids), "max_tokens": max_tokens, "skip_save": skip_save})
        return "", None

    async def close(self) -> None:
        pass


def _contains(haystack: list[int], needle: list[int]) -> bool:
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def test_warm_up_blends_the_default_chunks_on_lmcache_and_caches_no_chunk_on_plain(builder):
    runtime = make_runtime(builder)
    prompts = {h.spec.key: ids for h, ids in warm_up_prompts(runtime)}
    assert set(prompts) == {"lmcache", "plain"}
    names = builder.page_selection(runtime.max_model_len)
    assert len(names) >= 2
    chunk_ids = [builder.chunk_ids(n) for n in names]
    blended, plain = prompts["lmcache"], prompts["plain"]
    assert len(blended) == len(plain) >= DEFAULT_CONTEXT_TOKENS
    # 🚀: every default chunk, in reverse order, after the system prompt (a real blend of stored segments)
    positions = [next(i for i in range(len(blended)) if blended[i:i + 64] == c[:64]) for c in chunk_ids]
    assert positions == sorted(positions, reverse=True)
    assert blended[:len(builder.bos_ids + builder.sys_ids())] == builder.bos_ids + builder.sys_ids()
    # 🐢: no chunk's tokens in order, so its prefix cache gains nothing a question could reuse
    assert not any(_contains(plain, c[:32]) for c in chunk_ids)


def _record_requests(monkeypatch) -> dict[str, RecordingClient]:
    """Every EngineHandle.client() of the runtime hands out one recording client per engine."""
    clients: dict[str, RecordingClient] = {}
    monkeypatch.setattr(EngineHandle, "client",
                        lambda self, timeout_s=600.0: clients.setdefault(self.spec.key, RecordingClient(self.spec.key)))
    return clients


def test_precompute_sends_segments_then_warm_ups_and_reports_them_apart(builder, monkeypatch, capsys):
    runtime = make_runtime(builder)
    clients = _record_requests(monkeypatch)
    progress = runtime.precompute_and_wait()

    segments = runtime.precompute_prompts()
    lm, plain = clients["lmcache"].sent, clients["plain"].sent
    assert [s["ids"] for s in lm[:len(segments)]] == segments
    assert all(s["max_tokens"] == 1 and not s["skip_save"] for s in lm[:len(segments)])  # stored
    warm_ups = {h.spec.key: ids for h, ids in warm_up_prompts(runtime)}
    assert [s["ids"] for s in lm[len(segments):]] == [warm_ups["lmcache"]]
    assert plain[0]["ids"] == warm_ups["plain"]
    assert lm[-1]["skip_save"] and lm[-1]["max_tokens"] == 2  # decodes one token, stores nothing
    assert len(plain) == 1 and plain[0]["max_tokens"] == 2 and not plain[0]["skip_save"]
    assert progress.error is None and progress.finished
    assert progress.warm_ups == 2 and progress.total == len(segments) + 2
    assert progress.line().startswith(f"precomputed {len(segments)} segments in ")
    assert "(+ warm-up" in progress.line()
    out = capsys.readouterr().out
    assert f"precompute {len(segments)}/{len(segments) + 2}" in out and f"warm-up {len(segments) + 2}/" in out


def test_share_scenario_preheats_every_engine_once_without_warm_ups(builder, monkeypatch):
    runtime = make_runtime(builder, "--scenario", "share")
    clients = _record_requests(monkeypatch)
    progress = runtime.precompute_and_wait()
    assert set(clients) == {h.spec.key for h in runtime.engines} and len(clients) == 4
    assert all(len(c.sent) == 1 and c.sent[0]["max_tokens"] == 1 and not c.sent[0]["skip_save"]
               for c in clients.values())
    assert progress.warm_ups == 0 and progress.line().startswith("preheated with 4 requests")
