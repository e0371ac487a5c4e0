"""kvdemo.client against a scripted OpenAI-compatible endpoint: request body, events, errors, TTFT overhead.

openai's AsyncOpenAI accepts an http client; one with a mock transport (httpx2, openai's own HTTP library)
answers instantly, so whatever TTFT is measured here is the client's own overhead.
"""

from __future__ import annotations

import asyncio
import json

import httpx2
import openai
import pytest

from kvdemo.client import EngineClient, Finished, TextDelta
from kvdemo.errors import EngineError, UserFacingError

MODEL = "sim-model"


def sse(*events: dict) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def text_event(text: str, finish: str | None = None) -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


USAGE = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": MODEL, "choices": [],
         "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


class Engine:
    """Records request bodies; answers /v1/models and streams a fixed completion (or an error)."""

    def __init__(self, status: int = 200, error: str = "") -> None:
        self.bodies: list[dict] = []
        self.status = status
        self.error = error

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/models"):
            return httpx2.Response(200, json={"object": "list", "data": [{"id": MODEL, "object": "model",
                                                                          "created": 0, "owned_by": "t"}]})
        self.bodies.append(json.loads(request.content))
        if self.status != 200:
            return httpx2.Response(self.status, json={"object": "error", "message": self.error, "code": self.status})
        return httpx2.Response(200, headers={"content-type": "text/event-stream"},
                               content=sse(text_event("Hello"), text_event(" there"), text_event("!", "length"), USAGE))


def client_for(engine: Engine) -> EngineClient:
    c = EngineClient("http://engine.test", "🧪 test engine", "test")
    c._client = openai.AsyncOpenAI(base_url="http://engine.test/v1", api_key="EMPTY", max_retries=0,
                                   http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(engine)))
    return c


def run(engine: Engine, coro_fn):
    async def go():
        c = client_for(engine)
        try:
            return await coro_fn(c)
        finally:
            await c.close()

    return asyncio.run(go())


def test_request_body_carries_the_token_ids():
    engine = Engine()
    ids = list(range(1, 300))
    run(engine, lambda c: c.complete(ids, max_tokens=12, temperature=0.5))
    body = engine.bodies[0]
    assert body["prompt"] == ids and body["model"] == MODEL
    assert body["max_tokens"] == 12 and body["temperature"] == 0.5
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert "kv_transfer_params" not in body and "ignore_eos" not in body


def test_skip_save_and_ignore_eos_reach_the_engine():
    engine = Engine()
    run(engine, lambda c: c.complete([1, 2, 3], max_tokens=4, skip_save=True, ignore_eos=True))
    body = engine.bodies[0]
    assert body["kv_transfer_params"] == {"lmcache.skip_save": True}
    assert body["ignore_eos"] is True and body["prompt"] == [1, 2, 3]


def test_stream_events_and_stats():
    async def events(c):
        return [e async for e in c.stream([1, 2, 3, 4, 5, 6, 7], max_tokens=3)]

    out = run(Engine(), events)
    assert [e.text for e in out if isinstance(e, TextDelta)] == ["Hello", " there", "!"]
    assert isinstance(out[-1], Finished)
    stats = out[-1].stats
    assert stats.completion_tokens == 3 and stats.prompt_tokens == 7
    assert 0 <= stats.ttft_s <= stats.total_s


def test_bad_request_is_user_facing_with_the_engine_message():
    engine = Engine(400, "This model's maximum context length is 32768 tokens. However, you requested 40000 tokens")
    with pytest.raises(UserFacingError) as exc:
        run(engine, lambda c: c.complete([1] * 10))
    assert not isinstance(exc.value, EngineError)
    assert str(exc.value).startswith("🧪 test engine refused the request: This model's maximum context length")


def test_server_error_is_an_engine_error():
    with pytest.raises(EngineError, match="🧪 test engine failed: HTTP 500 boom"):
        run(Engine(500, "boom"), lambda c: c.complete([1, 2]))


def test_ttft_is_not_spent_in_the_client(builder):
    """An 18K-token prompt to an engine that answers at once: TTFT must be the engine's, not the client's.

    openai's request transform walks a `prompt` list item by item (~0.15 s of CPU for 18K ids here). That
    time counted as TTFT and, with two engines streaming in one event loop, delayed the other engine's
    first token too, so the UI showed 🚀 slower than 🐢.
    """
    ids = builder.build(builder.default_selection(16_000, 32_000), "Why?")
    assert len(ids) > 16_000
    engine = Engine()

    async def best_ttft(c):
        await c.model()
        return min([(await c.complete(ids))[1].ttft_s for _ in range(3)])

    ttft = run(engine, best_ttft)
    assert engine.bodies[-1]["prompt"] == ids
    assert ttft < 0.06, f"{ttft:.3f} s of client overhead before the first token of an instant engine"
