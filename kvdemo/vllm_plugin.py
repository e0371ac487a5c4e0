"""vLLM general plugin that makes LMCache KV blending work with vllm 0.22.0 + lmcache 0.5.3.

vLLM calls :func:`register` (entry point ``kvdemo_lmcache`` in group ``vllm.general_plugins``) in every
vLLM process: the API server, the engine core and the workers. The plugin does nothing unless
``KVDEMO_LMCACHE_PLUGIN=1`` (kvdemo sets it for its LMCache engines only) and LMCache is importable.

Why a plugin at all: blending in lmcache 0.5.3 needs the loaded vLLM model registered with LMCache's
``VLLMModelTracker`` and knows only Llama/Qwen2/Qwen3 model classes, and LMCache bugs and slow paths are
on the critical path of every blended request (each fix: docs/plugin.md). Patching from a plugin keeps
both wheels unmodified. The fixes live in :mod:`kvdemo.lmcache_patches`, one module each; this module only
decides which run. Nothing is imported eagerly: each patch is attached to the import of the module it
patches, so the API server, which never imports the worker or the blender, pays nothing.

Environment:

``KVDEMO_LMCACHE_PLUGIN=1``
    switch the plugin on (otherwise :func:`register` returns at once).
``KVDEMO_PLUGIN_FIXES``
    comma list of fixes, default ``all`` =
    ``register,mistral,split,short,mask,rope,sync,kernels,tokens,lookup,pipeline,selection,quiet,telemetry``;
    ``-name`` removes one (``all,-sync``), ``none`` applies nothing. ``register``/``mistral``/``split`` are
    needed for blending to work at all; ``short`` stores prompts shorter than one LMCache chunk (an upload's
    last chunk was never stored without it); ``mask`` gives recomputed tokens the causal mask of their true
    positions (it changes answers, on purpose: see kvdemo.blend_mask); the others are speed fixes a benchmark
    can switch off (``pipeline`` acts on the KV-sharing scenario's loads from the shared store,
    the rest on blending; ``telemetry`` writes the per-request records below). ``selection`` picks the
    recomputed tokens by the policy ``KVDEMO_RECOMPUTE_POLICY`` names (kvdemo.lmcache_patches.selection:
    ``epic:K``, ``first:K``, ``per_chunk``); unset, it changes nothing. ``async_save`` is not in ``all``
    until a GPU run has measured it (``all,async_save`` switches it on): a request's KV is copied off the GPU
    behind the step and put into LMCache's store by a worker thread (kvdemo.lmcache_patches.async_save).
    ``loadcopy`` (also opt-in until measured, on top of ``sync``): the layerwise load builds its buffer views
    once per request and copies each segment as two byte slices (kvdemo.lmcache_patches.load_copies).
``KVDEMO_TELEMETRY_DIR=DIR``
    one JSON line per request LMCache loads for (kvdemo.lmcache_patches.telemetry): what the app shows
    under each answer.
``KVDEMO_PROFILE=1``
    log one ``kvdemo-profile: ...`` line per engine step that did LMCache work, with CUDA-synchronized
    per-phase times (adds synchronizations: use it for a breakdown, never for TTFT numbers).
``KVDEMO_TRACE_DIR=DIR``
    trace one blend with the torch profiler whenever the file ``DIR/arm`` exists
    (kvdemo.lmcache_patches.trace; ``python -m kvdemo.bench --trace-contexts`` arms it).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path

from kvdemo.lmcache_patches import (
    async_save,
    hooks,
    kernels,
    layerwise_sync,
    load_copies,
    lookup,
    mask,
    model,
    pipeline,
    profile,
    quiet,
    rope,
    selection,
    short_save,
    split,
    telemetry,
    tokens,
    trace,
)
from kvdemo.lmcache_patches.hooks import Patch, logger
from kvdemo.lmcache_patches.targets import MOD_BLENDER

ENV_ENABLE = "KVDEMO_LMCACHE_PLUGIN"
ENV_FIXES = "KVDEMO_PLUGIN_FIXES"
ENV_PROFILE = "KVDEMO_PROFILE"
ENV_TRACE_DIR = "KVDEMO_TRACE_DIR"
ENV_TELEMETRY_DIR = telemetry.ENV_TELEMETRY_DIR

# The fixes, in the order they are armed (fixes that wrap the same method stack up in it), with their
# (target module, patch) pairs; 'quiet' patches no module (a log filter).
FIXES: dict[str, tuple[tuple[str, Patch], ...]] = {
    "register": model.REGISTER_PATCHES,
    "mistral": model.MISTRAL_PATCHES,
    "split": split.PATCHES,
    "short": short_save.PATCHES,
    "mask": mask.PATCHES,
    "rope": rope.PATCHES,
    "sync": layerwise_sync.PATCHES,
    "loadcopy": load_copies.PATCHES,  # after "sync": it installs that fix's copy with its edits
    "kernels": kernels.PATCHES,
    "tokens": tokens.PATCHES,
    "lookup": lookup.PATCHES,
    "pipeline": pipeline.PATCHES,
    "selection": selection.PATCHES,  # after "sync": it wraps the connector method sync replaces
    "quiet": (),
    "telemetry": (),
    "async_save": async_save.PATCHES,
}
# Fixes that "all" leaves out: named ones only (all,async_save).
OPT_IN_FIXES: tuple[str, ...] = ("async_save", "loadcopy")
ALL_FIXES: tuple[str, ...] = tuple(fix for fix in FIXES if fix not in OPT_IN_FIXES)
# Fixes blending needs to run at all, and fixes that change answers on purpose: the "minimal" plugin the
# quality benchmark's fix-equivalence check compares the speed-only fixes against.
REQUIRED_FIXES: tuple[str, ...] = ("register", "mistral", "split")
ANSWER_FIXES: tuple[str, ...] = ("mask",)


def register() -> None:
    """vLLM general-plugin entry point: arm the LMCache fixes in this process.

    Does nothing unless ``KVDEMO_LMCACHE_PLUGIN=1`` (the plain engine must stay untouched) and nothing
    but one log line when LMCache is not importable. Safe to call any number of times.
    """
    if os.environ.get(ENV_ENABLE, "") != "1":
        return
    with hooks.lock:
        if hooks.state.registered:
            return
        hooks.state.registered = True
        hooks.ensure_log_handler()
        if not hooks.module_available("lmcache"):
            logger.info("kvdemo plugin: lmcache is not importable; nothing patched")
            return
        fixes = parse_fixes(os.environ.get(ENV_FIXES))
        profiling = os.environ.get(ENV_PROFILE, "") == "1"
        logger.info("kvdemo plugin: armed fixes=%s profile=%s (pid %d)", ",".join(sorted(fixes)) or "none",
                    profiling, os.getpid())
        for fix, patches in FIXES.items():
            if fix in fixes:
                for module_name, patch in patches:
                    hooks.when_imported(module_name, patch)
        if "quiet" in fixes:
            quiet.install_quiet_filter()
        if "telemetry" in fixes and os.environ.get(ENV_TELEMETRY_DIR):
            telemetry.arm(os.environ[ENV_TELEMETRY_DIR], hooks.when_imported)
        if profiling:
            profile.arm_profiling()
        trace_dir = os.environ.get(ENV_TRACE_DIR)
        if trace_dir:
            hooks.when_imported(MOD_BLENDER, functools.partial(trace.patch_blend_trace,
                                                                     trace_dir=Path(trace_dir)))


def parse_fixes(value: str | None) -> frozenset[str]:
    """Parse ``KVDEMO_PLUGIN_FIXES``: ``all`` (default), ``none``, names (opt-in ones too), ``-name``."""
    if value is None or not value.strip():
        return frozenset(ALL_FIXES)
    chosen: set[str] = set()
    for raw in value.split(","):
        item = raw.strip().lower()
        if not item:
            continue
        remove = item.startswith("-")
        name = item[1:] if remove else item
        if name == "all":
            names: Iterable[str] = ALL_FIXES
        elif name == "none":
            names = ()
            if not remove:
                chosen.clear()
        elif name in FIXES:
            names = (name,)
        else:
            logger.warning("kvdemo plugin: unknown fix %r in %s (known: %s)", name, ENV_FIXES,
                           ",".join(FIXES))
            continue
        if remove:
            chosen.difference_update(names)
        else:
            chosen.update(names)
    return frozenset(chosen)


def _reset_for_tests() -> None:
    """Forget this process's plugin state (hooks, finder, handler, once-only log lines) and put every
    patched target back (the quiet filter too)."""
    with hooks.lock:
        hooks.unpatch_all()
        quiet.remove_quiet_filter()
        hooks.reset()
        profile.PROFILER.__init__()  # type: ignore[misc]
        mask.reset()
        async_save.reset()
