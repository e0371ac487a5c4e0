"""Streaming completions from an engine (openai.AsyncOpenAI), with the timings the demo is about.

TTFT is measured at the client, from sending the request to the first streamed token: that is what a
user waits for. Decode speed is (tokens after the first) / (time after the first token).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import openai

from .errors import EngineError, UserFacingError


@dataclass
class RequestStats:
    ttft_s: float
    total_s: float
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int | None = None  # prompt tokens the engine reported as reused (if it reports them)
    request_id: str | None = None  # the X-Request-Id it was sent with: finds its LMCache record (kvdemo.telemetry)

    @property
    def decode_tok_s(self) -> float | None:
        decode_time = self.total_s - self.ttft_s
        if self.completion_tokens < 2 or decode_time <= 0:
            return None
        return (self.completion_tokens - 1) / decode_time


@dataclass
class TextDelta:
    text: str
    tokens: int = 0  # completion tokens streamed so far, this one included


@dataclass
class Finished:
    stats: RequestStats


StreamEvent = TextDelta | Finished


class EngineClient:
    """One engine's OpenAI-compatible endpoint; `skip_save` asks LMCache not to store a request's KV."""

    def __init__(self, base_url: str, label: str, key: str, timeout_s: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.label = label
        self.key = key
        self._client = openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key="EMPTY", timeout=timeout_s,
                                          max_retries=0)
        self._model: str | None = None

    async def model(self) -> str:
        if self._model is None:
            models = await self._call(self._client.models.list())
            self._model = models.data[0].id
        return self._model

    async def stream(self, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0,
                     skip_save: bool = False, ignore_eos: bool = False,
                     request_id: str | None = None) -> AsyncIterator[StreamEvent]:
        # The token ids travel in extra_body: openai's request-param transform walks every element of
        # `prompt` in Python (~200 ms for 16K ids on a 2-core CPU, added to every TTFT); extra_body is merged
        # into the JSON untouched. The server sees the same `prompt: [ids]` either way.
        extra: dict = {"prompt": prompt_ids}
        if skip_save:
            extra["kv_transfer_params"] = {"lmcache.skip_save": True}
        if ignore_eos:
            extra["ignore_eos"] = True
        request_id = request_id or f"kvdemo-{uuid.uuid4().hex}"
        model = await self.model()
        start = time.perf_counter()
        first: float | None = None
        cached: int | None = None
        n_tokens = 0
        prompt_tokens = len(prompt_ids)
        stream = await self._call(self._client.completions.create(
            model=model, prompt=[], max_tokens=max_tokens, temperature=temperature, stream=True,
            stream_options={"include_usage": True}, extra_body=extra, extra_headers={"X-Request-Id": request_id}))
        # The finally closes the HTTP stream however this generator ends: vLLM aborts a request whose stream
        # is closed, so a consumer that stops early (the page's Stop button) stops the engine's work too.
        try:
            async for chunk in stream:
                if chunk.usage is not None:
                    n_tokens = chunk.usage.completion_tokens or n_tokens
                    prompt_tokens = chunk.usage.prompt_tokens or prompt_tokens
                    details = getattr(chunk.usage, "prompt_tokens_details", None)
                    cached = getattr(details, "cached_tokens", None) if details else None
                for choice in chunk.choices:
                    if first is None:
                        first = time.perf_counter()
                    if not chunk.usage:
                        n_tokens += 1
                    if choice.text:
                        yield TextDelta(choice.text, n_tokens)
        except (openai.APIConnectionError, openai.APITimeoutError, httpx.HTTPError) as exc:
            # A dying engine breaks the stream: openai does not wrap errors raised while iterating it.
            raise EngineError(f"{self.label} stopped answering mid-stream ({type(exc).__name__}).",
                              self.key) from exc
        finally:
            await stream.close()
        end = time.perf_counter()
        yield Finished(RequestStats(ttft_s=(first or end) - start, total_s=end - start,
                                    completion_tokens=n_tokens, prompt_tokens=prompt_tokens, cached_tokens=cached,
                                    request_id=request_id))

    async def complete(self, prompt_ids: list[int], max_tokens: int = 1, **kw) -> tuple[str, RequestStats]:
        """Whole answer and its stats (precompute, benchmarks, headless mode)."""
        parts: list[str] = []
        stats: RequestStats | None = None
        async for event in self.stream(prompt_ids, max_tokens, **kw):
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                stats = event.stats
        assert stats is not None
        return "".join(parts), stats

    async def scored(self, prompt_ids: list[int], max_tokens: int, top_k: int = 20,
                     skip_save: bool = False) -> tuple[list[str], list[dict[str, float]]]:
        """Greedy answer of exactly max_tokens tokens with each token's top-k log-probs (quality benchmark).

        Tokens come back as ``token_id:N`` (``return_tokens_as_token_ids``) so both engines are compared on
        ids, not on detokenized text; vLLM 0.22 caps top-k at 20.
        """
        extra: dict = {"prompt": prompt_ids, "return_tokens_as_token_ids": True, "ignore_eos": True}
        if skip_save:
            extra["kv_transfer_params"] = {"lmcache.skip_save": True}
        completion = await self._call(self._client.completions.create(
            model=await self.model(), prompt=[], max_tokens=max_tokens, temperature=0.0, logprobs=top_k,
            extra_body=extra))
        lp = completion.choices[0].logprobs
        if lp is None or not lp.tokens or lp.top_logprobs is None:
            raise EngineError(f"{self.label} returned no log-probs.", self.key)
        return list(lp.tokens), [dict(entry or {}) for entry in lp.top_logprobs]

    async def _call(self, awaitable):
        try:
            return await awaitable
        except openai.BadRequestError as exc:
            raise UserFacingError(f"{self.label} refused the request: {_api_message(exc)}") from exc
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            raise EngineError(f"{self.label} at {self.base_url} does not answer.", self.key) from exc
        except openai.APIStatusError as exc:
            raise EngineError(f"{self.label} failed: HTTP {exc.status_code} {_api_message(exc)}",
                              self.key) from exc

    async def close(self) -> None:
        await self._client.close()


def _api_message(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    msg = body.get("message") or (body.get("error") or {}).get("message") if body else None
    return str(msg or exc.message).splitlines()[0][:300]
