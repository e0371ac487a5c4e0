"""Entry point: flags → runtime (engines, precompute) → UI or headless answer; always stops engines.

Ctrl-C and SIGTERM both end in `Runtime.stop()`; SIGKILL of this process is covered by the watchdog.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from contextlib import ExitStack

from .cli_shell import run_cli
from .config import Settings, parse_settings, sharing_warning
from .errors import UserFacingError
from .lmcache_config import LmcacheConfig
from .preflight import detect_gpus
from .runtime import Runtime

log = logging.getLogger("kvdemo")


def main(argv: list[str] | None = None) -> int:
    """The app: 0, 1 when an engine fails, 2 for a problem the user can fix, 130 on Ctrl-C (cli_shell.py)."""
    return run_cli("kvdemo", lambda cleanup: run(argv, cleanup), interrupted="interrupted, stopping engines…",
                   engine_error_status=1)


def run(argv: list[str] | None, cleanup: ExitStack) -> int:
    """Flags → runtime → dry run, headless answer or UI; ``cleanup`` stops the engines whatever happens."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C works even if started with SIGINT ignored
    settings = parse_settings(argv)
    runtime = Runtime(settings)
    cleanup.callback(runtime.stop)
    if settings.dry_run:
        return dry_run(runtime)
    if settings.simulate:
        print("kvdemo: SIMULATED engines — no GPU is used and every timing shown is SIMULATED.", flush=True)
    warning = None if settings.no_ui else sharing_warning(settings)
    if warning:  # before engines start: with vLLM that takes minutes
        print(f"kvdemo: WARNING: {warning}", flush=True)
    runtime.start()
    if settings.no_ui:
        return headless(runtime, settings.ask or "")
    return serve_ui(runtime)


def dry_run(runtime: Runtime) -> int:
    s = runtime.settings
    specs = runtime.plan()
    print(f"# kvdemo --dry-run: scenario {s.scenario}, model {s.model}; nothing is started.")
    print("# Every engine also inherits this process's environment.")
    if not s.simulate and not s.attach and not s.gpus and not detect_gpus():
        print("# No GPU detected here: showing the 1-GPU plan (use --gpus 0,1 for a 2-GPU machine).")
    for spec in specs:
        print(spec.describe() if not spec.url_override else f"# {spec.label}: attached at {spec.url}")
    lmc = LmcacheConfig.load(s.lmcache_config_path)
    print(f"# LMCache config {s.lmcache_config_path}: chunks separated by blend_special_str {lmc.separator!r} "
          f"(the prompts splice its token ids), blending {'on' if lmc.blending else 'off'}")
    mode = "sequential (engines share a GPU)" if any(sp.slot.shared for sp in specs) else "concurrent"
    if s.fairness != "auto":
        mode = s.fairness
    print(f"# UI: http://{s.server_name}:{s.port}  answer mode: {mode}")
    return 0


def headless(runtime: Runtime, question: str) -> int:
    """Precompute, then ask the question of each engine in turn and print answers and TTFTs."""
    runtime.precompute_and_wait()
    if runtime.progress.error:
        raise UserFacingError(f"Precompute failed: {runtime.progress.error}")
    builder = runtime.builder
    assert builder is not None
    chunks = builder.page_selection(runtime.max_model_len)
    ids = builder.build(chunks, question)
    tag = " (SIMULATED)" if runtime.settings.simulate else ""
    print(f"kvdemo: {len(chunks)} chunks, {len(ids)} prompt tokens; precompute {runtime.progress.seconds:.2f} s{tag}")
    ttfts = {}

    async def ask_all() -> None:
        for h in runtime.engines:
            client = h.client()
            try:
                text, stats = await client.complete(ids, max_tokens=128, skip_save=runtime.skip_save(h))
            finally:
                await client.close()
            ttfts[h.spec.key] = stats.ttft_s
            tok_s = f"{stats.decode_tok_s:.1f} tok/s" if stats.decode_tok_s else "n/a"
            print(f"\n{h.spec.label}: TTFT {stats.ttft_s:.3f} s, decode {tok_s}{tag}\n{text.strip()[:400]}",
                  flush=True)
            if h.spec.lmcache:  # what LMCache did for this very request (kvdemo.telemetry)
                record = await asyncio.to_thread(h.load_record, stats.request_id, 2.0)
                print(f"  [{stats.request_id}] " + (record.summary() if record else "LMCache loaded nothing"),
                      flush=True)

    asyncio.run(ask_all())
    if "lmcache" in ttfts and "plain" in ttfts and ttfts["lmcache"] > 0:
        print(f"\nkvdemo: TTFT speedup {ttfts['plain'] / ttfts['lmcache']:.2f}x{tag}")
    return 0


def serve_ui(runtime: Runtime) -> int:
    from .ui.app import launch_kwargs  # lazy: gradio is slow to import
    from .ui.pages import build_page

    s: Settings = runtime.settings
    demo = build_page(runtime)
    runtime.precompute_in_background()
    demo.queue(default_concurrency_limit=16, max_size=64)
    _, local_url, share_url = demo.launch(**launch_kwargs(s), prevent_thread_lock=True)
    print(f"kvdemo: UI at {local_url}" + (f" and {share_url}" if share_url else ""), flush=True)
    try:
        while True:
            time.sleep(0.5)
    finally:
        demo.close()
