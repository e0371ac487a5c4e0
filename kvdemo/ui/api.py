"""The demo's one scriptable endpoint, /ask: the page's turn on every engine, answered in one JSON-able dict.

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    r = client.predict("How does Python resolve a name used inside a class body?",
                       ["06-names-scopes", "09-functions-classes"], "", 0.0, 128, api_name="/ask")
    print(r["speedup"], r["lmcache"]["ttft_s"], r["plain"]["ttft_s"])
    r = client.predict("How are names bound?", api_name="/ask")  # the page's default chunks and settings

No dict in the answer has a string field ``path``: gradio_client (download_files on, its default) would take
it for a file and try to download it.

`ask` is a plain coroutine of the Runtime (tests call it directly); `register` adds it to the page's Blocks.
"""

# No `from __future__ import annotations` here: gr.api reads the endpoint's type hints to describe /ask in the
# API page and the client, and needs them as real types, not strings.

import dataclasses

import gradio as gr

from ..errors import UserFacingError
from ..runtime import Runtime
from ..telemetry import LoadRecord
from .session import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    EngineReply,
    speedup,
    stream_turn,
    validate_turn,
)

API_NAME = "ask"


async def ask(runtime: Runtime, question: str, chunks: list[str] | None = None, sys_prompt: str | None = None,
              temperature: float | None = DEFAULT_TEMPERATURE, max_tokens: int | None = DEFAULT_MAX_TOKENS) -> dict:
    """One turn, as the page's Ask button runs it, on every engine; the answers once all are done.

    ``chunks`` None: the page's default selection; ``[]``: no chunks (the question alone).

    Raises UserFacingError, with the message the page shows, for input the page would refuse. An engine
    that fails does not raise: its entry has the error and no timings, and the other engines answer.
    """
    assert runtime.builder is not None
    names = runtime.builder.page_selection(runtime.max_model_len) if chunks is None else _chunk_names(chunks)
    if sys_prompt is not None and not isinstance(sys_prompt, str):
        raise UserFacingError("The system prompt must be text (empty or None for the default one).")
    sys_text = sys_prompt if sys_prompt and sys_prompt.strip() else runtime.library.sys_prompt
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    unknown = [n for n in names if n not in runtime.library.chunks]
    if unknown:  # the page says "reload the page" (its list is stale); a script needs the names
        raise UserFacingError(f"Unknown chunk {unknown[0]!r}: the chunks are {', '.join(runtime.library.chunks)}.")
    labels = [h.spec.label for h in runtime.engines]
    turn = validate_turn(runtime, question, names, sys_text, temperature, max_tokens, labels)
    notes = [turn.note] if turn.note else []
    if not runtime.progress.finished:
        notes.append(f"Precompute still running ({runtime.progress.line()}): 🚀 may not reuse every chunk yet.")
    try:  # as the page does: an edited system prompt is a new first segment, cached before the question
        await runtime.ensure_sys_prompt_cached(sys_text)
    except UserFacingError:
        pass  # the LMCache engine's own reply will carry the error
    replies: dict[str, EngineReply] = {}
    async for replies in stream_turn(runtime, turn):
        pass
    sim = " (SIMULATED)" if runtime.settings.simulate else ""
    out: dict = {"question": turn.question, "chunks": turn.chunk_names,
                 "context_tokens": runtime.builder.context_tokens(turn.chunk_names, sys_text),
                 "temperature": turn.temperature, "max_tokens": turn.max_tokens}
    stats = {}
    for h in runtime.engines:
        reply = replies.get(h.spec.key, EngineReply(error="no reply"))
        ok = reply.stats if not reply.error else None
        if ok is not None:
            stats[h.spec.key] = ok
        out[h.spec.key] = {
            "label": h.spec.label + sim,
            "answer": reply.text,
            "ttft_s": ok.ttft_s if ok else None,
            "decode_tok_s": ok.decode_tok_s if ok else None,
            "prompt_tokens": ok.prompt_tokens if ok else None,
            "cached_tokens": ok.cached_tokens if ok else None,
            "lmcache_telemetry": _telemetry(reply.load) if ok and h.spec.lmcache else None,
            "error": reply.error.splitlines()[0] if reply.error else None,
        }
    out["speedup"] = speedup(stats)
    out["note"] = " ".join(notes)
    out["simulated"] = bool(runtime.settings.simulate)
    return out


def _telemetry(load: LoadRecord | None) -> dict | None:
    """The answer's LMCache record as plain JSON (kvdemo.telemetry.LoadRecord), with the page's one-line summary."""
    if load is None:
        return None
    return {**dataclasses.asdict(load), "fresh_tokens": load.fresh_tokens, "summary": load.summary()}


def _chunk_names(chunks) -> list[str]:
    if isinstance(chunks, str):  # one name, or a client that sent the list as one string
        chunks = [chunks]
    if not isinstance(chunks, list | tuple) or not all(isinstance(n, str) for n in chunks):
        raise UserFacingError("Chunks must be a list of chunk names, in prompt order (e.g. [\"01-data-model\"]).")
    return list(chunks)


def register(runtime: Runtime) -> None:
    """Add /ask to the Blocks being built (call it inside `with gr.Blocks()`): an event of no component."""

    async def ask_endpoint(question: str, chunks: list[str] | None = None, sys_prompt: str | None = None,
                           temperature: float = DEFAULT_TEMPERATURE, max_tokens: int = DEFAULT_MAX_TOKENS) -> dict:
        """Ask both engines one question over the given chunks, as the page does; returns answers and timings.

        Args:
            question: the question
            chunks: chunk names in prompt order (the page's chunk picker values, e.g. "01-data-model"); omitted or None: the page's default selection, []: none
            sys_prompt: system prompt; empty or None for the default one
            temperature: 0 to 2 (page default 0)
            max_tokens: tokens to generate, 1 to 2048 (page default 128)
        Returns:
            dict: question, chunks, context_tokens, speedup (plain TTFT / LMCache TTFT or null), note, simulated, and per engine ("lmcache", "plain"): label, answer, ttft_s, decode_tok_s, prompt_tokens, cached_tokens, lmcache_telemetry (LMCache engines: what LMCache loaded and recomputed for this answer, or null when it loaded nothing), error
        """
        try:
            return await ask(runtime, question, chunks, sys_prompt, temperature, max_tokens)
        except UserFacingError as exc:
            raise gr.Error(str(exc).splitlines()[0], print_exception=False) from None

    gr.api(ask_endpoint, api_name=API_NAME)
