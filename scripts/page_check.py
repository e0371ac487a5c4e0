"""GPU check of the blend page's ask path, through the page's own handlers (no browser there).

The lent GPU machine has no browser, so this drives the same handler functions the page's events call
(kvdemo.ui.handlers: add_file, prepare, stream), against real engines started by the same Runtime, and
prints what the page shows: with ``--upload FILE`` the upload status lines and questions over uploaded and
shipped chunks, without it the page's default chunks (``--context-tokens``) and questions about them; then
each pane's stats markdown, whose 🔎 line is the per-answer LMCache telemetry (with the request ids to find
LMCache's own log lines), the speedup badge and the agreement line. The browser tests cover the page itself
against simulated engines in CI.

Usage (GPU machine): python scripts/page_check.py --model DIR [app flags] [--upload FILE]
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvdemo.config import parse_settings
from kvdemo.runtime import Runtime
from kvdemo.ui import handlers
from kvdemo.ui.labels import PANES, agreement_markdown, pane_stats_markdown, speedup_markdown
from kvdemo.ui.session import ChatState
from kvdemo.uploads import Uploads

UPLOAD_QUESTIONS = ("Summarize what the uploaded document says, in two sentences.",
                    "What does the uploaded text say about patents?")
DEFAULT_QUESTIONS = ("Which section explains how names are bound, and what does it say?",
                     "How does Python resolve a name used inside a class body?")


async def check(runtime: Runtime, upload: Path | None) -> int:
    up, state = Uploads(), ChatState()
    questions = DEFAULT_QUESTIONS
    assert runtime.builder is not None
    names = runtime.builder.page_selection(runtime.max_model_len)
    if upload is not None:
        async for status, *_ in handlers.add_file(runtime, str(upload), up, []):
            print(f"upload: {status}", flush=True)
        uploaded = list(up.ids())
        if not uploaded:
            print("kvdemo page check: the upload gave no chunks", flush=True)
            return 1
        shipped = list(runtime.library.chunks)[:1]
        names, questions = [uploaded[0], *shipped, *uploaded[1:2]], UPLOAD_QUESTIONS  # interleaved
    sys_prompt = runtime.library.sys_prompt
    for question in questions:
        _, notice, *_ = handlers.prepare(runtime, question, names, sys_prompt, 0.0, 64,
                                         [h.spec.label for h in runtime.engines], state, up)
        if notice:
            print(f"notice: {notice}", flush=True)
        async for _ in handlers.stream(runtime, sys_prompt, state):
            pass
        tokens = runtime.builder.context_tokens(names, extra=up.ids())
        print(f"\nQ: {question}\nchunks: {names} ({tokens} context tokens)", flush=True)
        for key in PANES:
            stats = state.last_stats.get(key)
            rid = stats.request_id if stats else None
            print(f"[{key}] request {rid}\n{pane_stats_markdown(state, key, runtime)}\n"
                  f"{state.answers.get(key, '').strip()[:300]}", flush=True)
        print(f"badge: {speedup_markdown(state, runtime)}\nagreement: {agreement_markdown(state, runtime)}",
              flush=True)
        names = list(reversed(names))  # the second question: the same chunks in another order
    return 0


def main() -> int:
    argv = sys.argv[1:]
    upload = None
    if "--upload" in argv:
        upload = Path(argv[argv.index("--upload") + 1])
        del argv[argv.index("--upload"):argv.index("--upload") + 2]
    runtime = Runtime(parse_settings(argv))
    try:
        runtime.start()
        runtime.precompute_and_wait()
        return asyncio.run(check(runtime, upload))
    finally:
        runtime.stop()


if __name__ == "__main__":
    sys.exit(main())
