"""Optional tracing of one blend (``KVDEMO_TRACE_DIR=DIR``): the torch profiler, armed one request at a time.

Whenever ``DIR/arm`` exists, the blend that finds it deletes it and writes ``DIR/<label>.json.gz`` (Chrome
trace; label = the arm file's text) and ``DIR/<label>-summary.json`` (kvdemo.trace_summary).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from .hooks import logger, wrap_method

TRACE_ARM_FILE = "arm"


def patch_blend_trace(module: ModuleType, trace_dir: Path) -> None:
    """Wrap ``LMCBlender.blend``: when ``trace_dir/arm`` exists, run that one blend under the torch profiler.

    WHY: whether LMCache's layerwise loads overlap the recompute can only be seen on a GPU timeline
    without added syncs; arming one request at a time keeps every other request untouched."""
    def make(original: Any) -> Any:
        def blend(self: Any, tokens: Any, *args: Any, **kwargs: Any) -> Any:
            label = take_trace_arm(trace_dir)
            if label is None:
                return original(self, tokens, *args, **kwargs)
            return traced_call(functools.partial(original, self, tokens, *args, **kwargs), trace_dir, label,
                               n_tokens=len(tokens))
        return blend

    wrap_method(module, "LMCBlender.blend", "trace", make, f"is traced when {trace_dir / TRACE_ARM_FILE} exists")


def take_trace_arm(trace_dir: Path) -> str | None:
    """The label in ``trace_dir/arm`` if it exists (and delete it: one trace per arming), else None."""
    arm = trace_dir / TRACE_ARM_FILE
    try:
        label = arm.read_text().strip()
        arm.unlink()
    except OSError:
        return None
    return "".join(ch for ch in label if ch.isalnum() or ch in "-_.") or "blend"


def traced_call(call: Callable[[], Any], trace_dir: Path, label: str, n_tokens: int) -> Any:
    """Run ``call`` under torch.profiler (CPU + CUDA), then write the trace and its summary."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from kvdemo.trace_summary import BLEND_ANNOTATION, load_events, summarize

    try:
        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        prof.__enter__()
    except Exception:  # noqa: BLE001 - an untraced blend beats a failed one
        logger.exception("kvdemo plugin: torch profiler did not start; blend runs untraced")
        return call()
    try:
        with record_function(BLEND_ANNOTATION):
            result = call()
        torch.cuda.synchronize()  # after the annotation: the GPU work of the blend is all recorded
    finally:
        prof.__exit__(None, None, None)
    try:
        path = trace_dir / f"{label}.json.gz"
        prof.export_chrome_trace(str(path))
        summary = {"label": label, "blend_tokens": n_tokens, "trace": path.name,
                   **summarize(load_events(path))}
        (trace_dir / f"{label}-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        logger.info("kvdemo plugin: traced blend of %d tokens -> %s", n_tokens, path)
    except Exception:  # noqa: BLE001 - the blend's result stands without its trace
        logger.exception("kvdemo plugin: writing the blend trace failed")
    return result
