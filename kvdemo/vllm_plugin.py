"""vLLM general plugin that makes LMCache KV blending work with vllm 0.22.0 + lmcache 0.5.3.

vLLM calls :func:`register` (entry point ``kvdemo_lmcache`` in group ``vllm.general_plugins``) in every
vLLM process: the API server, the engine core and the workers. The plugin does nothing unless
``KVDEMO_LMCACHE_PLUGIN=1`` (kvdemo sets it for its LMCache engines only) and LMCache is importable.

Why a plugin at all: blending in lmcache 0.5.3 needs the loaded vLLM model registered with LMCache's
``VLLMModelTracker`` and knows only Llama/Qwen2/Qwen3 model classes, and two LMCache bugs/slow paths are
on the critical path of every blended request (see /work/shared/GPU.md). Patching from a plugin keeps
both wheels unmodified.

Nothing is imported eagerly: each patch is attached to the import of the module it patches (a small
post-import hook on ``sys.meta_path``), or applied at once when that module is already imported. So the
API server, which never imports the worker or the blender, pays nothing, and no import order inside
vLLM/LMCache is disturbed.

Environment:

``KVDEMO_LMCACHE_PLUGIN=1``
    switch the plugin on (otherwise :func:`register` returns at once).
``KVDEMO_PLUGIN_FIXES``
    comma list of fixes, default ``all`` =
    ``register,mistral,split,mask,rope,sync,kernels,tokens,lookup,pipeline,quiet``. ``-name`` removes one
    (``all,-sync``), ``none`` applies nothing. ``register``/``mistral``/``split`` are needed for blending to
    work at all; ``mask`` gives recomputed tokens the causal mask of their true positions (it changes
    answers, on purpose: see kvdemo.blend_mask); the others are speed fixes a benchmark can switch off
    (``pipeline`` acts on the KV-sharing scenario's loads from the shared store, the rest on blending).
``KVDEMO_PROFILE=1``
    log one ``kvdemo-profile: ...`` line per engine step that did LMCache work, with CUDA-synchronized
    per-phase times (adds synchronizations: use it for a breakdown, never for TTFT numbers).
``KVDEMO_TRACE_DIR=DIR``
    trace one blend with the torch profiler (no added syncs) whenever the file ``DIR/arm`` exists: the
    blend that finds it deletes it, writes ``DIR/<label>.json.gz`` (Chrome trace; label = the arm file's
    text) and ``DIR/<label>-summary.json`` (kvdemo.trace_summary: compute vs copy overlap, idle, waits).
    ``python -m kvdemo.bench --trace-contexts`` arms it for one extra request per context.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from kvdemo import blend_mask, pipelined_load

logger = logging.getLogger(__name__)

ENV_ENABLE = "KVDEMO_LMCACHE_PLUGIN"
ENV_FIXES = "KVDEMO_PLUGIN_FIXES"
ENV_PROFILE = "KVDEMO_PROFILE"
ENV_TRACE_DIR = "KVDEMO_TRACE_DIR"
TRACE_ARM_FILE = "arm"

ALL_FIXES: tuple[str, ...] = ("register", "mistral", "split", "mask", "rope", "sync", "kernels", "tokens",
                              "lookup", "pipeline", "quiet")
# Fixes blending needs to run at all, and fixes that change answers on purpose: the "minimal" plugin the
# quality benchmark's fix-equivalence check compares the speed-only fixes against.
REQUIRED_FIXES: tuple[str, ...] = ("register", "mistral", "split")
ANSWER_FIXES: tuple[str, ...] = ("mask",)

# vLLM model classes that LMCache's Llama path (LMCLlamaModel) computes correctly. vLLM 0.22's
# MistralForCausalLM subclasses its LlamaForCausalLM with the same submodule names
# (qkv_proj/rotary_emb/o_proj/mlp/norms); only its optional Llama-4 attention scaling differs, which is
# checked per model below.
LLAMA_LIKE_CLASS_NAMES: tuple[str, ...] = ("MistralForCausalLM",)

# The sync and pipeline fixes replace whole LMCache methods with edited copies, so they are only applied
# to the LMCache versions whose source the copies were taken from.
COPIED_LMCACHE_VERSIONS: tuple[str, ...] = ("0.5.3",)

# Marker attribute set on every function this plugin installs (value: the fix name). A patch whose
# target already carries it is skipped, so register() and the import hooks are idempotent even if this
# module is re-imported.
_MARK = "_kvdemo_fix"
_MARKS = "_kvdemo_fixes"

# Module paths patched (lmcache 0.5.3 / vllm 0.22.0).
MOD_WORKER = "vllm.v1.worker.gpu_worker"
MOD_LMC_VLLM_UTILS = "lmcache.integration.vllm.utils"
MOD_MODEL_UTILS = "lmcache.v1.compute.models.utils"
MOD_LLAMA = "lmcache.v1.compute.models.llama"
MOD_BLENDER = "lmcache.v1.compute.blend.blender"
MOD_TOKEN_DB = "lmcache.v1.token_database"
MOD_ROPE = "lmcache.v1.compute.positional_encoding"
MOD_GPU_CONNECTORS = "lmcache.v1.gpu_connector.gpu_connectors"
MOD_MEMORY = "lmcache.v1.memory_management"
MOD_ADAPTER = "lmcache.integration.vllm.vllm_v1_adapter"
MOD_CACHE_ENGINE = "lmcache.v1.cache_engine"
MOD_MODEL_BASE = "lmcache.v1.compute.models.base"
MOD_LOOKUP_CLIENT = "lmcache.v1.lookup_client.lmcache_lookup_client"
MOD_ATTN_METADATA = "lmcache.v1.compute.attention.metadata"
MOD_FLASH_ATTN = "lmcache.v1.compute.attention.flash_attn"

# The "Double unpin" warning is logged by this module's logger (lmcache.logging.init_logger(__name__)).
DOUBLE_UNPIN_LOGGER = MOD_MEMORY
DOUBLE_UNPIN_TEXT = "Double unpin occurred"


class _State:
    """Process-wide plugin state (vLLM may call register() several times per process)."""

    def __init__(self) -> None:
        self.registered = False
        self.hooks: dict[str, list[Callable[[ModuleType], None]]] = {}
        self.finder: _PostImportFinder | None = None
        self.quiet_filter: DoubleUnpinFilter | None = None
        self.handler: logging.Handler | None = None


_state = _State()
_lock = threading.RLock()


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def register() -> None:
    """vLLM general-plugin entry point: arm the LMCache fixes in this process.

    Does nothing unless ``KVDEMO_LMCACHE_PLUGIN=1`` (the plain engine must stay untouched) and nothing
    but one log line when LMCache is not importable. Safe to call any number of times.
    """
    if os.environ.get(ENV_ENABLE, "") != "1":
        return
    with _lock:
        if _state.registered:
            return
        _state.registered = True
        _ensure_log_handler()
        if not _module_available("lmcache"):
            logger.info("kvdemo plugin: lmcache is not importable; nothing patched")
            return
        fixes = parse_fixes(os.environ.get(ENV_FIXES))
        profile = os.environ.get(ENV_PROFILE, "") == "1"
        logger.info("kvdemo plugin: armed fixes=%s profile=%s (pid %d)", ",".join(sorted(fixes)) or "none",
                    profile, os.getpid())
        patches = _module_patches()
        for fix in ALL_FIXES:  # in this order: fixes that wrap the same method stack up in it
            if fix in fixes:
                for module_name, patch in patches.get(fix, ()):
                    _when_imported(module_name, patch)
        if "quiet" in fixes:
            _install_quiet_filter()
        if profile:
            _arm_profiling()
        trace_dir = os.environ.get(ENV_TRACE_DIR)
        if trace_dir:
            _when_imported(MOD_BLENDER, functools.partial(_patch_blend_trace, trace_dir=Path(trace_dir)))


def _module_patches() -> dict[str, tuple[tuple[str, Callable[[ModuleType], None]], ...]]:
    """Each fix's (module, patch) pairs; a patch runs when its module is imported ('quiet' patches no module)."""
    return {
        "register": ((MOD_WORKER, _patch_worker_load_model),),
        "mistral": ((MOD_MODEL_UTILS, _patch_infer_model), (MOD_BLENDER, _patch_infer_model)),
        "split": ((MOD_TOKEN_DB, _patch_split),),
        "mask": ((MOD_ATTN_METADATA, _patch_mask_metadata), (MOD_FLASH_ATTN, _patch_mask_attention)),
        "rope": ((MOD_ROPE, _patch_fused_rope),),
        "sync": ((MOD_GPU_CONNECTORS, _patch_batched_to_gpu),),
        "kernels": ((MOD_BLENDER, _patch_blend_kernels),),
        "tokens": ((MOD_TOKEN_DB, _patch_process_tokens), (MOD_BLENDER, _patch_blend_tokens)),
        "lookup": ((MOD_LOOKUP_CLIENT, _patch_direct_lookup),),
        "pipeline": ((MOD_CACHE_ENGINE, _patch_pipelined_retrieve),),
    }


def parse_fixes(value: str | None) -> frozenset[str]:
    """Parse ``KVDEMO_PLUGIN_FIXES``: ``all`` (default), ``none``, names, and ``-name`` to remove one."""
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
        elif name in ALL_FIXES:
            names = (name,)
        else:
            logger.warning("kvdemo plugin: unknown fix %r in %s (known: %s)", name, ENV_FIXES,
                           ",".join(ALL_FIXES))
            continue
        if remove:
            chosen.difference_update(names)
        else:
            chosen.update(names)
    return frozenset(chosen)


def _ensure_log_handler() -> None:
    """Make this module's INFO lines visible in the engine log.

    vLLM configures only its own ``vllm`` logger; the root logger has no handler in engine processes,
    so INFO records of ``kvdemo.*`` would be dropped (``logging.lastResort`` shows WARNING and up only).
    When nothing else would print them, attach one stderr handler (and stop propagation so a root handler
    added later does not print each line twice).
    """
    if _state.handler is not None or logger.handlers or logging.getLogger().handlers:
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [kvdemo] %(message)s", "%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    _state.handler = handler


def _module_available(name: str) -> bool:
    """True when ``name`` is importable, without importing it (lmcache's __init__ loads torch/CUDA ops)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------
# Post-import hooks
# --------------------------------------------------------------------------------------------------


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder that runs callbacks right after a watched module has executed.

    It finds the module's spec through the rest of ``sys.meta_path`` and wraps that spec's loader's
    ``exec_module`` on the loader instance (one loader per module), so the module object, its spec and
    its loader stay the ordinary ones.
    """

    def __init__(self) -> None:
        self._busy: set[str] = set()

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> Any:
        if fullname not in _state.hooks or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        except (ImportError, ValueError):
            return None
        finally:
            self._busy.discard(fullname)
        loader = getattr(spec, "loader", None)
        exec_module = getattr(loader, "exec_module", None)
        if spec is None or exec_module is None:
            return None

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            _run_hooks(fullname, module)

        try:
            loader.exec_module = exec_and_patch  # type: ignore[union-attr]
        except (AttributeError, TypeError):
            logger.warning("kvdemo plugin: cannot hook the import of %s; its fixes are not applied", fullname)
            return None
        return spec


def _when_imported(module_name: str, callback: Callable[[ModuleType], None]) -> None:
    """Run ``callback(module)`` now if ``module_name`` is imported, else right after its import."""
    module = sys.modules.get(module_name)
    if module is not None:
        _safe_call(callback, module)
        return
    if not _module_file_exists(module_name):
        logger.warning("kvdemo plugin: %s not found in this install; %s not applied", module_name,
                       getattr(callback, "__name__", callback))
        return
    _state.hooks.setdefault(module_name, []).append(callback)
    if _state.finder is None:
        _state.finder = _PostImportFinder()
        sys.meta_path.insert(0, _state.finder)


def _run_hooks(module_name: str, module: ModuleType) -> None:
    for callback in _state.hooks.pop(module_name, []):
        _safe_call(callback, module)


def _safe_call(callback: Callable[[ModuleType], None], module: ModuleType) -> None:
    """A failing patch must never break vLLM/LMCache: log a WARNING and go on unpatched."""
    try:
        callback(module)
    except Exception as exc:  # noqa: BLE001 - deliberately broad: a patch is best effort
        logger.warning("kvdemo plugin: %s on %s failed (%s: %s); left unpatched",
                       getattr(callback, "__name__", callback), module.__name__, type(exc).__name__, exc)


def _module_file_exists(module_name: str) -> bool:
    """Whether ``module_name``'s source exists under its top package, without importing anything.

    Lets a module that a newer release renamed produce a WARNING at start-up instead of silently never
    being patched. When the top package cannot be located on disk (e.g. a namespace built in memory),
    answer True and let the hook decide.
    """
    top, _, rest = module_name.partition(".")
    top_module = sys.modules.get(top)
    try:
        spec = top_module.__spec__ if top_module is not None else importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    locations = list(getattr(spec, "submodule_search_locations", None) or [])
    if not locations:
        return True
    parts = rest.split(".") if rest else []
    for base in locations:
        stem = os.path.join(base, *parts)
        if not parts or os.path.isdir(stem) or any(
            os.path.exists(stem + suffix) for suffix in (".py", ".pyc", ".so", ".abi3.so")
        ) or _has_extension(stem):
            return True
    return False


def _has_extension(stem: str) -> bool:
    folder, name = os.path.split(stem)
    try:
        return any(entry.startswith(name + ".") and entry.endswith(".so") for entry in os.listdir(folder))
    except OSError:
        return False


def _already(target: Any, fix: str) -> bool:
    """Whether ``fix`` already wrapped ``target`` (fixes stack: kernels, trace and profile all wrap blend)."""
    return fix in getattr(target, _MARKS, ())


def _mark(func: Any, fix: str) -> Any:
    """Tag a replacement with its fix (``_MARK``: the outermost; ``_MARKS``: every fix in the stack)."""
    setattr(func, _MARKS, frozenset(getattr(func, _MARKS, ())) | {fix})  # functools.wraps copied the inner's
    setattr(func, _MARK, fix)
    return func


def _unpatched(module: ModuleType, path: str, fix: str) -> tuple[Any, Any] | None:
    """``(owner, original)`` for ``path`` ("Class.method" or "function") in ``module``; None when it is
    missing in this version (logged) or ``fix`` already wrapped it."""
    owner: Any = module
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part, None)
    original = getattr(owner, name, None)
    if original is None:
        _missing(fix, f"{module.__name__}.{path}")
        return None
    if _already(original, fix):
        return None
    return owner, original


def _missing(fix: str, what: str) -> None:
    logger.warning("kvdemo plugin: %s not found in this version; fix '%s' not applied", what, fix)


# --------------------------------------------------------------------------------------------------
# Fix 1: register the vLLM model with LMCache's blender
# --------------------------------------------------------------------------------------------------


def _patch_worker_load_model(module: ModuleType) -> None:
    """Wrap ``Worker.load_model`` to call ``VLLMModelTracker.register_model(ENGINE_NAME, model)``.

    WHY: LMCache's blender is created by ``LMCBlenderBuilder.get_or_create``, which looks the model up
    with ``VLLMModelTracker.get_model(ENGINE_NAME)``; neither vLLM 0.22 nor LMCache 0.5.3 ever registers
    it (LMCache's example tells users to edit vLLM's gpu_worker.py). The connector and blender are
    created after ``load_model`` (in ``initialize_from_config``), so registering here is in time.
    """
    found = _unpatched(module, "Worker.load_model", "register")
    if found is None:
        return
    worker_cls, original = found

    @functools.wraps(original)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        _register_loaded_model(self)
        return result

    worker_cls.load_model = _mark(load_model, "register")
    logger.info("kvdemo plugin: applied register (%s.Worker.load_model -> VLLMModelTracker.register_model)",
                module.__name__)


def _register_loaded_model(worker: Any) -> None:
    try:
        from lmcache.integration.vllm.utils import ENGINE_NAME
        from lmcache.v1.compute.models.utils import VLLMModelTracker
    except ImportError as exc:
        logger.warning("kvdemo plugin: cannot import LMCache's model tracker (%s); model not registered", exc)
        return
    model = worker.model_runner.get_model()
    VLLMModelTracker.register_model(ENGINE_NAME, model)
    logger.info("kvdemo plugin: registered %s with LMCache as %r", type(model).__name__, ENGINE_NAME)


# --------------------------------------------------------------------------------------------------
# Fix 2: MistralForCausalLM -> LMCache's Llama path
# --------------------------------------------------------------------------------------------------


def _patch_infer_model(module: ModuleType) -> None:
    """Wrap ``infer_model_from_vllm`` so Llama-shaped vLLM classes use ``LMCLlamaModel``.

    WHY: LMCache picks its layerwise model by ``type(vllm_model).__name__`` and raises
    NotImplementedError for anything but Llama/Qwen2/Qwen3. vLLM 0.22 builds ``MistralForCausalLM``
    (a LlamaForCausalLM subclass) for Mistral-7B, which LMCache's Llama path computes correctly.
    ``lmcache.v1.compute.blend.blender`` did ``from ...models.utils import infer_model_from_vllm``,
    so the name is patched in both modules; everything else is delegated to the original.
    """
    original = getattr(module, "infer_model_from_vllm", None)
    if original is None:
        _missing("mistral", f"{module.__name__}.infer_model_from_vllm")
        return
    if _already(original, "mistral"):
        logger.info("kvdemo plugin: applied mistral (%s.infer_model_from_vllm already wrapped)", module.__name__)
        return

    @functools.wraps(original)
    def infer_model_from_vllm(vllm_model: Any, blender: Any, enable_sparse: bool = False) -> Any:
        if type(vllm_model).__name__ in LLAMA_LIKE_CLASS_NAMES and _llama_compatible(vllm_model):
            from lmcache.v1.compute.models.llama import LMCLlamaModel

            return LMCLlamaModel(vllm_model, blender, enable_sparse)
        return original(vllm_model, blender, enable_sparse)

    module.infer_model_from_vllm = _mark(infer_model_from_vllm, "mistral")
    logger.info("kvdemo plugin: applied mistral (%s.infer_model_from_vllm: %s -> LMCLlamaModel)",
                module.__name__, ",".join(LLAMA_LIKE_CLASS_NAMES))


def _llama_compatible(vllm_model: Any) -> bool:
    """False for Mistral variants with Llama-4 attention scaling, which LMCLlamaModel does not apply."""
    try:
        attn = vllm_model.model.layers[0].self_attn
    except (AttributeError, IndexError, TypeError):
        return True
    return not getattr(attn, "do_llama_4_scaling", False)


# --------------------------------------------------------------------------------------------------
# Fix 3: SegmentTokenDatabase._fast_split_by_subtensor lacks a `return`
# --------------------------------------------------------------------------------------------------


def find_separator_starts(tokens: Sequence[int], sep: Sequence[int]) -> list[int]:
    """Start index of every (possibly overlapping) occurrence of ``sep`` in ``tokens``.

    The pure-Python equivalent of LMCache's ``tokens.unfold(0, len(sep), 1) == sep`` window match.
    """
    n = len(sep)
    if n == 0:
        return []
    sep_list = list(sep)
    first = sep_list[0]
    return [i for i in range(len(tokens) - n + 1) if tokens[i] == first and list(tokens[i:i + n]) == sep_list]


def fast_split_by_subtensor(self: Any, tokens: Any) -> Iterator[Any]:
    """Fixed copy of lmcache 0.5.3 ``SegmentTokenDatabase._fast_split_by_subtensor``.

    WHY: the original yields the whole token list when it is shorter than the separator and then falls
    through to ``tokens.unfold(0, sep_len, 1)``, which raises ``RuntimeError: maximum size for tensor at
    dimension 0 is 1 but size is 3`` and kills the engine (e.g. a precompute request ``[BOS]+SEP+chunk``
    whose lookup only hits ``[BOS]``). The only change is the ``return`` after that early ``yield``;
    plain Python sequences are accepted too (same windows, matched without torch).
    """
    sep_len = self.sep_len
    if sep_len == 0 or len(tokens) < sep_len:
        yield tokens
        return

    if hasattr(tokens, "unfold"):
        # Unfold into sliding windows, shape (num_tokens - sep_len + 1, sep_len); as in LMCache.
        windows = tokens.unfold(0, sep_len, 1)
        matches = (windows == self.sep_tokens).all(dim=1).nonzero(as_tuple=True)[0].tolist()
    else:
        sep = self.sep_tokens.tolist() if hasattr(self.sep_tokens, "tolist") else list(self.sep_tokens)
        matches = find_separator_starts(tokens, sep)

    start = 0
    for idx in matches:
        yield tokens[start:idx]
        start = idx + sep_len
    yield tokens[start:]


def _patch_split(module: ModuleType) -> None:
    """Replace ``SegmentTokenDatabase._fast_split_by_subtensor`` with :func:`fast_split_by_subtensor`."""
    found = _unpatched(module, "SegmentTokenDatabase._fast_split_by_subtensor", "split")
    if found is None:
        return
    cls, original = found

    @functools.wraps(original)
    def _fast_split_by_subtensor(self: Any, tokens: Any) -> Iterator[Any]:
        return fast_split_by_subtensor(self, tokens)

    cls._fast_split_by_subtensor = _mark(_fast_split_by_subtensor, "split")
    logger.info("kvdemo plugin: applied split (%s.SegmentTokenDatabase._fast_split_by_subtensor returns "
                "after its early yield)", module.__name__)


# --------------------------------------------------------------------------------------------------
# Answer fix: recomputed tokens attend to keys at or before their own position only
# --------------------------------------------------------------------------------------------------

_MASK_ATTR = "_kvdemo_exact_plan"
_mask_said: set[str] = set()
@functools.cache
def _flash_attn_varlen() -> Any:
    """vLLM's flash_attn_varlen_func or None, looked up once per process."""
    return blend_mask.vllm_flash_attn_varlen()


def _say_mask_once(key: str, text: str, *args: Any, level: int = logging.INFO) -> None:
    """One log line per process and kind (first exact layer, fallback): evidence without a line per layer."""
    if key not in _mask_said:
        _mask_said.add(key)
        logger.log(level, text, *args)


def _mask_target(module: ModuleType, path: str) -> tuple[Any, Any] | None:
    """``(owner, original)`` of a method the mask fix wraps, on the LMCache version whose FlashAttention call
    (bottom-right causal, contiguous keys) it was written against; None otherwise (logged)."""
    if not _copied_version_matches("mask", "LMCFlashAttnMetadata/LMCFlashAttnBackend (FlashAttention call)"):
        return None
    return _unpatched(module, path, "mask")


def _patch_mask_metadata(module: ModuleType) -> None:
    """Wrap ``LMCFlashAttnMetadata.update_from_top_indices`` to build the exact-attention plan once per request.

    WHY: LMCache 0.5.3 only shrinks the query length there, so FlashAttention's bottom-right causal mask
    lets every recomputed token see tokens after it (kvdemo.blend_mask). The selected indices (sorted,
    one per recomputed token, equal to its key index) are known here, once per request, before the first
    layer that recomputes only them: the plan (block mask, tiles) is built here and reused by every later layer.
    """
    found = _mask_target(module, "LMCFlashAttnMetadata.update_from_top_indices")
    if found is None:
        return
    cls, original = found

    @functools.wraps(original)
    def update_from_top_indices(self: Any, top_indices: Any) -> Any:
        n_keys = int(self.max_seq_len)  # the original changes the query side only
        result = original(self, top_indices)
        plan = None
        if 0 < len(top_indices) < n_keys:
            try:
                plan = blend_mask.build_plan(top_indices, n_keys, split=_flash_attn_varlen() is not None)
            except Exception as exc:  # noqa: BLE001 - never break a blend: LMCache's own mask then
                _say_mask_once("build-failed", "kvdemo plugin: mask: cannot build the exact plan (%s); "
                               "LMCache's bottom-right causal mask is used", exc, level=logging.WARNING)
        setattr(self, _MASK_ATTR, plan)
        return result

    cls.update_from_top_indices = _mark(update_from_top_indices, "mask")
    logger.info("kvdemo plugin: applied mask (%s.LMCFlashAttnMetadata.update_from_top_indices builds the "
                "exact causal block mask of the recomputed tokens)", module.__name__)


def _patch_mask_attention(module: ModuleType) -> None:
    """Wrap ``LMCFlashAttnBackend.forward_contiguous``: fewer queries than keys and a plan built → exact path.

    The exact path is kvdemo.blend_mask.run_plan: vLLM's FlashAttention on the key blocks every query of a
    tile sees, FlexAttention on the diagonal band, merged by log-sum-exp. Anything it does not reproduce
    (sliding window, logit softcap, ALiBi, an FP8 KV cache) or any error goes to LMCache's FlashAttention
    call, logged once.
    """
    found = _mask_target(module, "LMCFlashAttnBackend.forward_contiguous")
    if found is None:
        return
    cls, original = found

    @functools.wraps(original)
    def forward_contiguous(self: Any, query: Any, key: Any, value: Any, output: Any, attn_metadata: Any,
                           **kwargs: Any) -> Any:
        plan = getattr(attn_metadata, _MASK_ATTR, None)
        impl = self.vllm_attn_impl
        if plan is not None and query.shape[0] < key.shape[0] and exact_mask_applies(impl):
            try:
                output.copy_(blend_mask.run_plan(query, key, value, plan, impl.scale, _flash_attn_varlen(),
                                                 getattr(impl, "vllm_flash_attn_version", None)))
                _say_mask_once("used", "kvdemo plugin: mask: exact causal attention for %d recomputed of %d "
                               "tokens (%s)", query.shape[0], key.shape[0],
                               "FlashAttention on fully visible blocks + FlexAttention on the diagonal band"
                               if getattr(plan, "split", False) else "FlexAttention block mask")
                return output
            except Exception as exc:  # noqa: BLE001 - fall back for the rest of this request
                setattr(attn_metadata, _MASK_ATTR, None)
                _say_mask_once("attn-failed", "kvdemo plugin: mask: exact attention failed (%s: %s); LMCache's "
                               "FlashAttention call is used", type(exc).__name__, exc, level=logging.WARNING)
        return original(self, query, key, value, output, attn_metadata, **kwargs)

    cls.forward_contiguous = _mark(forward_contiguous, "mask")
    logger.info("kvdemo plugin: applied mask (%s.LMCFlashAttnBackend.forward_contiguous takes the exact "
                "path when fewer queries than keys)", module.__name__)


def exact_mask_applies(impl: Any) -> bool:
    """Whether FlexAttention with the plain causal block mask computes what this vLLM attention layer does."""
    window = getattr(impl, "sliding_window", None)
    if window not in (None, (-1, -1), [-1, -1]):
        _say_mask_once("window", "kvdemo plugin: mask: sliding window %s: LMCache's mask is used", window)
        return False
    if getattr(impl, "logits_soft_cap", None) or getattr(impl, "alibi_slopes", None) is not None:
        _say_mask_once("softcap", "kvdemo plugin: mask: softcap/ALiBi model: LMCache's mask is used")
        return False
    if "fp8" in str(getattr(impl, "kv_cache_dtype", "auto")):
        _say_mask_once("fp8", "kvdemo plugin: mask: FP8 KV cache: LMCache's mask is used")
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Speed fix 4: FusedRope's cos/sin cache to the GPU once
# --------------------------------------------------------------------------------------------------


def _patch_fused_rope(module: ModuleType) -> None:
    """Wrap ``FusedRope.fused_encode`` so its cos/sin cache is moved to the K tensor's device once.

    WHY: ``FusedRope.__init__`` keeps ``rope.cos_sin_cache`` as created on the CPU (vLLM later rebinds
    the rope's own attribute to a GPU copy, the FusedRope reference stays stale), and ``fused_encode``
    calls ``self.cos_sin_cache.to(k.device)`` for every layer of every blended request: an unpinned
    host-to-device copy (~1 ms x 32 layers at Mistral-7B). Rebinding the attribute to the device copy
    makes the original's ``.to(k.device)`` a no-op; dtype and values are unchanged.
    """
    found = _unpatched(module, "FusedRope.fused_encode", "rope")
    if found is None:
        return
    cls, original = found

    @functools.wraps(original)
    def fused_encode(self: Any, old_positions: Any, new_positions: Any, k: Any) -> Any:
        cache = self.cos_sin_cache
        if cache.device != k.device:
            self.cos_sin_cache = cache.to(k.device)
        return original(self, old_positions, new_positions, k)

    cls.fused_encode = _mark(fused_encode, "rope")
    logger.info("kvdemo plugin: applied rope (%s.FusedRope.fused_encode keeps its cos/sin cache on the GPU)",
                module.__name__)


# --------------------------------------------------------------------------------------------------
# Speed fix 5a: no full-device synchronize per layer in VLLMBufferLayerwiseGPUConnector.batched_to_gpu
# --------------------------------------------------------------------------------------------------


def _lmcache_version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - py<3.8
        return None
    try:
        return version("lmcache")
    except PackageNotFoundError:
        return None


def _copied_version_matches(fix: str, what: str) -> bool:
    """Whether LMCache here is a version whose ``what`` the fix copied (else warn: not applied)."""
    version = _lmcache_version()
    if version in COPIED_LMCACHE_VERSIONS:
        return True
    logger.warning("kvdemo plugin: fix '%s' is a copy of lmcache %s's %s; lmcache here is %s, so it is not "
                   "applied", fix, "/".join(COPIED_LMCACHE_VERSIONS), what, version)
    return False


def _patch_batched_to_gpu(module: ModuleType) -> None:
    """Replace ``VLLMBufferLayerwiseGPUConnector.batched_to_gpu`` with a copy that uses stream waits.

    WHY: once per layer the original calls ``torch.cuda.synchronize()`` ("wait until both compute and
    load streams are done") before swapping its two GPU ping-pong buffers, so the CPU cannot enqueue
    the next layer until the GPU is idle (32 bubbles per blended request). The copy orders the same
    work with stream dependencies instead:

    * before the compute stream uses the just-loaded buffer: ``current_stream.wait_stream(load_stream)``
      (covers the buffer data and the layer-0 ``old_positions_full`` written on the load stream);
    * before the load stream overwrites the other buffer, it waits for an event recorded on the compute
      stream *before the blender's compute of the previous layer is enqueued*. That buffer last held
      layer i-2, whose readers (the blender's compute of layer i-2, the paged-memory transfer of layer
      i-2) are enqueued before that point; the compute of layer i-1 reads the other buffer. A plain
      ``load_stream.wait_stream(current_stream)`` at copy time (this fix's first version) also waited for
      the compute of layer i-1 and so serialized every load behind the previous layer's compute: no
      overlap at all (measured on the H100: blend = retrieve + compute);
    * at the last layer the host still waits for the load stream, because ``retrieve_layer`` releases
      the CPU memory objects (``ref_count_down``) right after that step returns.

    Everything else is the lmcache 0.5.3 code unchanged, hence the version pin.
    """
    found = _unpatched(module, "VLLMBufferLayerwiseGPUConnector.batched_to_gpu", "sync")
    if found is None:
        return
    cls, original = found
    if not _copied_version_matches("sync", "VLLMBufferLayerwiseGPUConnector.batched_to_gpu"):
        return
    replacement = _make_batched_to_gpu(module)
    annotate = getattr(module, "_lmcache_nvtx_annotate", None)
    if callable(annotate):
        replacement = annotate(replacement)
    replacement = functools.wraps(original)(replacement)
    cls.batched_to_gpu = _mark(replacement, "sync")
    logger.info("kvdemo plugin: applied sync (%s.VLLMBufferLayerwiseGPUConnector.batched_to_gpu waits on "
                "streams, not on the whole device; each layer's load overlaps the previous layer's compute)",
                module.__name__)


def _make_batched_to_gpu(m: ModuleType) -> Callable[..., Generator[None, Any, None]]:
    """Build the edited copy of lmcache 0.5.3 gpu_connectors.py:781-944 (names resolved from ``m``)."""
    torch = m.torch
    lmc_ops = m.lmc_ops
    MemoryFormat = m.MemoryFormat
    LMCBlenderBuilder = m.LMCBlenderBuilder
    lmc_logger = m.logger

    def batched_to_gpu(self: Any, starts: list[int], ends: list[int], **kwargs: Any) -> Generator[None, Any, None]:
        self.initialize_kvcaches_ptr(**kwargs)
        assert self.kvcaches is not None, "kvcaches should be provided in kwargs or initialized beforehand."

        if "slot_mapping" not in kwargs:
            raise ValueError("'slot_mapping' should be provided in kwargs.")

        if self.fused_rotary_emb is None and self.cache_positions:
            from lmcache.integration.vllm.utils import ENGINE_NAME

            self.lmc_model = LMCBlenderBuilder.get(ENGINE_NAME).layerwise_model
            self.fused_rotary_emb = self.lmc_model.fused_rotary_emb

        slot_mapping = kwargs["slot_mapping"]

        self._lazy_initialize_buffer(self.kvcaches)

        num_all_tokens = ends[-1] - starts[0]
        slot_mapping_full = slot_mapping[starts[0]:ends[-1]]

        # compute gap positions
        gap_mask = torch.ones(num_all_tokens, dtype=torch.bool, device=slot_mapping_full.device)
        buf_offset = starts[0]
        for start, end in zip(starts, ends, strict=False):
            gap_mask[start - buf_offset:end - buf_offset] = False
        self.current_gap_positions = torch.where(gap_mask)[0]

        buf_offset = starts[0]
        if self.cache_positions:
            new_positions_full = torch.arange(starts[0], ends[-1], dtype=torch.int64,
                                              device=self.kvcaches[0].device)

        buffer_shape = self.get_shape(num_all_tokens)
        assert self.gpu_buffer_allocator is not None
        compute_gpu_buffer_obj = self.gpu_buffer_allocator.allocate(buffer_shape, self.dtype,
                                                                    MemoryFormat.KV_2TD)
        load_gpu_buffer_obj = self.gpu_buffer_allocator.allocate(buffer_shape, self.dtype, MemoryFormat.KV_2TD)
        assert compute_gpu_buffer_obj is not None, "Failed to allocate GPU buffer in GPUConnector"
        assert load_gpu_buffer_obj is not None, "Failed to allocate GPU buffer in GPUConnector"
        assert compute_gpu_buffer_obj.tensor is not None
        assert load_gpu_buffer_obj.tensor is not None

        if self.cache_positions:
            old_positions_full = torch.zeros((num_all_tokens,), dtype=torch.int64, device=self.kvcaches[0].device)
        for layer_id in range(self.num_layers + 2):
            if layer_id > 1:
                lmc_ops.single_layer_kv_transfer(
                    self.buffer_mapping[layer_id - 2].tensor,
                    self.kvcaches[layer_id - 2],
                    slot_mapping_full,
                    lmc_ops.TransferDirection.H2D,
                    self.engine_kv_format,
                    token_major=False,  # shape is [2, num_tokens, hidden_dim]
                )
                del self.buffer_mapping[layer_id - 2]
                lmc_logger.debug("Finished loading layer %s into paged memory", layer_id - 2)

            if layer_id > 0 and layer_id <= self.num_layers:
                # kvdemo: was torch.cuda.synchronize(). The compute stream waits for the load stream
                # on the GPU; the host waits only at the last layer (see _patch_batched_to_gpu).
                torch.cuda.current_stream().wait_stream(self.load_stream)
                if layer_id == self.num_layers:
                    self.load_stream.synchronize()

                # ping-pong the buffers
                compute_gpu_buffer_obj, load_gpu_buffer_obj = load_gpu_buffer_obj, compute_gpu_buffer_obj

                if self.cache_positions:
                    assert compute_gpu_buffer_obj.tensor is not None
                    compute_gpu_buffer_obj.tensor[0] = self.fused_rotary_emb(
                        old_positions_full,
                        new_positions_full,
                        compute_gpu_buffer_obj.tensor[0],
                    )

                # gap zeroing after RoPE. kvdemo: was `tensor[:, gaps] = 0.0`, whose CPU scalar becomes a
                # tensor copied to the GPU with a host sync on every layer (trace: 32 syncs per blend),
                # stopping the CPU from running ahead; index_fill_ takes the scalar as is.
                if self.current_gap_positions.numel():
                    compute_gpu_buffer_obj.tensor.index_fill_(1, self.current_gap_positions, 0.0)

                self.buffer_mapping[layer_id - 1] = compute_gpu_buffer_obj
                lmc_logger.debug("Finished loading layer %s into buffer", layer_id - 1)

            if layer_id < self.num_layers:
                # kvdemo: the load buffer last held layer_id-2; everything that reads it (the blender's
                # compute of that layer, the paged transfer above) is enqueued on the compute stream by
                # now, while the compute of layer_id-1 (the other buffer) is enqueued after this yield.
                load_buffer_free = torch.cuda.Event()
                load_buffer_free.record(torch.cuda.current_stream())
                memory_objs_layer = yield

                # memobj -> gpu_buffer
                with torch.cuda.stream(self.load_stream):
                    self.load_stream.wait_event(load_buffer_free)
                    for start, end, memory_obj in zip(starts, ends, memory_objs_layer, strict=False):
                        assert memory_obj.metadata.fmt == MemoryFormat.KV_2TD
                        assert load_gpu_buffer_obj.tensor is not None
                        load_gpu_buffer_obj.tensor[0][start - buf_offset:end - buf_offset].copy_(
                            memory_obj.tensor[0], non_blocking=True
                        )
                        load_gpu_buffer_obj.tensor[1][start - buf_offset:end - buf_offset].copy_(
                            memory_obj.tensor[1], non_blocking=True
                        )
                        if self.cache_positions and layer_id == 0:
                            old_positions_full[start - buf_offset:end - buf_offset] = (
                                memory_obj.metadata.cached_positions
                            )

            elif layer_id == self.num_layers:
                yield

        # free the buffer memory
        load_gpu_buffer_obj.ref_count_down()
        compute_gpu_buffer_obj.ref_count_down()

        assert len(self.buffer_mapping) == 0, (
            "There are still layers in the buffer mapping after releasing the GPU buffers."
        )

        yield

    return batched_to_gpu


# --------------------------------------------------------------------------------------------------
# Speed fix 6: vLLM's CUDA kernels in LMCache's eager model copy, during the blend only
# --------------------------------------------------------------------------------------------------

# vLLM IR ops (vllm.ir.ops.<name>) and CustomOp names (CustomOp.register) the blender's layers call.
BLEND_IR_OPS: tuple[str, ...] = ("rms_norm", "fused_add_rms_norm")
BLEND_IR_PRIORITY: list[str] = ["vllm_c", "native"]
BLEND_CUSTOM_OPS: tuple[str, ...] = ("silu_and_mul", "rotary_embedding")


def _patch_blend_kernels(module: ModuleType) -> None:
    """Wrap ``LMCBlender.blend`` so LMCache's layerwise recompute calls vLLM's CUDA kernels.

    WHY: the blender recomputes part of the prompt with an *eager*, layer-by-layer walk over vLLM's own
    modules (``LMCBaseModel.compute_layer``). Under vLLM's default torch.compile, vLLM sets those modules
    to their unfused PyTorch ("native") code, which Inductor fuses inside vLLM's graph: RMSNorm (vLLM IR
    ops, ~11 small kernels per call eagerly), SiLU-and-mul and RoPE (CustomOps). Eagerly that made the
    16K blend CPU-bound on the H100 (torch-profiler trace: GPU idle 80 of 218 ms). Inside the blend
    only, the IR ops get vLLM's C kernels first (``IrOp.set_priority``, vLLM's scoped override) and the
    two CustomOps dispatch to ``forward_cuda`` (what ``--enforce-eager`` uses); both are restored when
    the blend returns. vLLM's own compiled forward and CUDA graphs are untouched (setting the same
    kernels engine-wide, decode fell to 0.94-0.96 of plain vLLM on the H100; scoped: 0.98).
    """
    found = _unpatched(module, "LMCBlender.blend", "kernels")
    if found is None:
        return
    cls, original = found

    @functools.wraps(original)
    def blend(self: Any, *args: Any, **kwargs: Any) -> Any:
        found = getattr(self, "_kvdemo_kernel_ops", None)
        if found is None:  # the ops and the model's modules do not change: find them once per blender
            model = getattr(getattr(self, "layerwise_model", None), "vllm_model", None)
            found = self._kvdemo_kernel_ops = (blend_ir_ops(), blend_custom_ops(model))
        with cuda_kernels_in_eager_blend(*found):
            return original(self, *args, **kwargs)

    cls.blend = _mark(blend, "kernels")
    logger.info("kvdemo plugin: applied kernels (%s.LMCBlender.blend runs vLLM's CUDA kernels for %s)",
                module.__name__, ", ".join(BLEND_IR_OPS + BLEND_CUSTOM_OPS))


@contextmanager
def cuda_kernels_in_eager_blend(ir_ops: Sequence[Any], custom_ops: Sequence[Any]) -> Iterator[None]:
    """Within the block: the vLLM IR ops prefer ``vllm_c``; the CustomOp modules run ``forward_cuda``."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        for op in ir_ops:
            stack.enter_context(op.set_priority(BLEND_IR_PRIORITY))
        swapped = [(op, op._forward_method) for op in custom_ops if op._forward_method != op.forward_cuda]
        for op, _ in swapped:
            op._forward_method = op.forward_cuda
        try:
            yield
        finally:
            for op, method in swapped:
                op._forward_method = method


def blend_ir_ops() -> list[Any]:
    """vLLM's RMSNorm IR ops (``vllm.ir.ops``), or none (logged) in a vLLM without them."""
    try:
        from vllm import ir

        return [getattr(ir.ops, name) for name in BLEND_IR_OPS]
    except Exception as exc:  # noqa: BLE001 - a vLLM without these ops just blends as before
        logger.warning("kvdemo plugin: fix 'kernels' leaves vLLM IR ops as they are (%s)", exc)
        return []


def blend_custom_ops(vllm_model: Any) -> list[Any]:
    """The model's SiLU-and-mul / RoPE CustomOp modules (by their registered name) that have forward_cuda."""
    modules = getattr(vllm_model, "modules", None)
    if modules is None:
        return []
    return [m for m in modules() if getattr(type(m), "name", None) in BLEND_CUSTOM_OPS
            and hasattr(m, "_forward_method") and callable(getattr(m, "forward_cuda", None))]


# --------------------------------------------------------------------------------------------------
# Speed fix 7: token-id lists to tensors without torch.tensor's per-element path
# --------------------------------------------------------------------------------------------------


def token_id_tensor(tokens: Iterable[int]) -> Any:
    """An int64 CPU tensor of ``tokens``, copied through one NumPy buffer.

    WHY: ``torch.tensor(list)`` converts element by element (and infers the dtype first when none is
    given): on the H100 host the trace of a 24K-token blend shows ~6 ms of CPU before its first GPU
    operation for that alone, with the GPU idle; NumPy's ``fromiter`` + ``torch.from_numpy`` takes
    ~0.3 ms for the same list (measured on CPU). Same values, dtype int64 as torch infers for ints.
    Measured on the H100 (blend-h100-profile.md): host time before a 24K blend's first GPU operation
    9.2 ms -> 1.1-1.9 ms; the TTFT change (with 'lookup') stayed inside the spread of single repeats.
    """
    import numpy as np
    import torch

    values = tokens if isinstance(tokens, list) else list(tokens)
    return torch.from_numpy(np.fromiter(values, dtype=np.int64, count=len(values)))


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "dtype") and hasattr(value, "to")


def _as_token_tensor(tokens: Any) -> Any:
    """``tokens`` as a tensor from :func:`token_id_tensor`, or unchanged if it already is one (or None, or
    torch/NumPy are missing: then LMCache converts it as before)."""
    if tokens is None or _is_tensor(tokens):
        return tokens
    try:
        return token_id_tensor(tokens)
    except ImportError:
        return tokens


def _patch_process_tokens(module: ModuleType) -> None:
    """Wrap ``SegmentTokenDatabase.process_tokens``: a token list becomes a tensor via :func:`token_id_tensor`.

    WHY: the blending lookup and every blended retrieve pass the prompt's token ids as a Python list,
    which the original turns into a tensor with ``torch.tensor(tokens, dtype=torch.long)``.
    """
    found = _unpatched(module, "SegmentTokenDatabase.process_tokens", "tokens")
    if found is None:
        return
    cls, original = found

    @functools.wraps(original)
    def process_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        if args:
            args = (_as_token_tensor(args[0]), *args[1:])
        elif "tokens" in kwargs:
            kwargs["tokens"] = _as_token_tensor(kwargs["tokens"])
        return original(self, *args, **kwargs)

    cls.process_tokens = _mark(process_tokens, "tokens")
    logger.info("kvdemo plugin: applied tokens (%s.SegmentTokenDatabase.process_tokens)", module.__name__)


def _patch_blend_tokens(module: ModuleType) -> None:
    """Wrap ``LMCBlender.blend``: a token list goes to the device as one tensor made by :func:`token_id_tensor`.

    WHY: the vLLM adapter passes the request's token ids as a list and the original runs
    ``torch.tensor(tokens).to(torch_device_type)`` on it, while the GPU waits.
    """
    found = _unpatched(module, "LMCBlender.blend", "tokens")
    if found is None:
        return
    cls, original = found
    device = getattr(module, "torch_device_type", "cuda")

    @functools.wraps(original)
    def blend(self: Any, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(tokens, list):
            converted = _as_token_tensor(tokens)
            if converted is not tokens:
                tokens = converted.to(device)
        return original(self, tokens, *args, **kwargs)

    cls.blend = _mark(blend, "tokens")
    logger.info("kvdemo plugin: applied tokens (%s.LMCBlender.blend)", module.__name__)


# --------------------------------------------------------------------------------------------------
# Speed fix 8: the scheduler's lookup calls the engine in its own process instead of over ZMQ
# --------------------------------------------------------------------------------------------------


def _patch_direct_lookup(module: ModuleType) -> None:
    """Wrap ``LMCacheLookupClient.lookup``: when the LMCache engine lives in this process, ask it directly.

    WHY: with one GPU, vLLM runs the scheduler and the worker in one engine-core process, yet LMCache's
    scheduler-side lookup still msgpack-encodes the whole prompt, sends it over ZMQ to a lookup-server
    thread of the same process, which decodes it and calls ``LMCacheEngine.lookup``; the scheduler
    waits, the GPU idles (10.7 ms for a 24K prompt in the H100 phase profile). LMCache's own
    ``enable_scheduler_bypass_lookup`` does the direct call but is only allowed for MLA models. This
    makes the same call the lookup server makes (``pin=True``, same arguments), records the result
    as the client does, and falls back to the ZMQ path when there is no engine here (one process per
    worker), more than one worker, or the direct call fails. An A/B on the H100 (with 'tokens') showed no
    TTFT change beyond the spread of single repeats; the engine log says once which path lookups take.
    """
    found = _unpatched(module, "LMCacheLookupClient.lookup", "lookup")
    if found is None:
        return
    cls, original = found

    @functools.wraps(original)
    def lookup(self: Any, token_ids: Any, lookup_id: str, request_configs: dict | None = None) -> Any:
        engine = _engine_in_this_process(self)
        if engine is not None:
            try:
                result = _direct_lookup(self, engine, token_ids, lookup_id, request_configs)
            except Exception as exc:  # noqa: BLE001 - the ZMQ path still works
                logger.warning("kvdemo plugin: direct lookup failed (%s: %s); using LMCache's lookup server",
                               type(exc).__name__, exc)
            else:
                self.reqs_status[lookup_id] = result
                _say_lookup_path_once(self, "in this process (no ZMQ round trip)")
                return result
        else:
            _say_lookup_path_once(self, "through LMCache's lookup server (no LMCache engine of a single worker "
                                        "in this process)")
        return original(self, token_ids, lookup_id, request_configs)

    cls.lookup = _mark(lookup, "lookup")
    logger.info("kvdemo plugin: applied lookup (%s.LMCacheLookupClient.lookup calls the engine of this process "
                "when there is one)", module.__name__)


def _say_lookup_path_once(client: Any, path: str) -> None:
    """Log once per lookup client which path its lookups take, so an engine log shows whether the fix acted."""
    if getattr(client, "_kvdemo_lookup_path", None) != path:
        client._kvdemo_lookup_path = path
        logger.info("kvdemo plugin: LMCache lookups go %s", path)


def _engine_in_this_process(client: Any) -> Any:
    """The vLLM integration's LMCacheEngine if it was built in this process and serves the only worker."""
    transport = getattr(client, "transport", None)
    if getattr(transport, "world_size", None) != 1:
        return None
    builder_module = sys.modules.get(MOD_CACHE_ENGINE)
    utils_module = sys.modules.get(MOD_LMC_VLLM_UTILS)
    builder = getattr(builder_module, "LMCacheEngineBuilder", None)
    name = getattr(utils_module, "ENGINE_NAME", None)
    if builder is None or name is None:
        return None
    return builder.get(name)


def _direct_lookup(client: Any, engine: Any, token_ids: Any, lookup_id: str, request_configs: dict | None) -> int:
    """What LMCache's lookup server computes for this request (blending: tokens; otherwise chunk hashes)."""
    configs = request_configs or None  # the server decodes "" (no configs) to None
    if client.enable_blending:
        tokens = token_ids if _is_tensor(token_ids) or isinstance(token_ids, list) else list(token_ids)
        return int(engine.lookup(tokens=tokens, lookup_id=lookup_id, pin=True, request_configs=configs))
    hashes: list[Any] = []
    offsets: list[int] = []
    for start, end, key in client.token_database.process_tokens(token_ids, make_key=False):
        hashes.append(key)
        offsets.append(end - start)
    if not hashes:
        return 0
    return int(engine.lookup(hashes=hashes, offsets=offsets, lookup_id=lookup_id, pin=True,
                             request_configs=configs))


# --------------------------------------------------------------------------------------------------
# Speed fix 9: a retrieve from the shared store copies chunks to the GPU while the next ones are read
# --------------------------------------------------------------------------------------------------


def _patch_pipelined_retrieve(module: ModuleType) -> None:
    """Wrap ``LMCacheEngine.retrieve`` (the non-layerwise load of the KV-sharing scenario) to pipeline it.

    WHY: engine B of the share scenario loads 2 GB at 16K tokens from the file-system store; LMCache
    0.5.3 reads every chunk and only then copies them all to the GPU. :mod:`kvdemo.pipelined_load`
    copies each group of chunks while later groups are read, with the same prefix, stats and release
    rules. Configurations it does not cover (async loading, first-rank-only saving, remove-after-retrieve,
    passive ranks, an unhealthy engine) take LMCache's own retrieve unchanged. Measured on one H100 (A/B on
    one machine, with share.yaml's ``use_exists_sync``): a 16K load 106-172 ms -> 89-114 ms, B's TTFT
    0.20 s -> 0.14-0.16 s; the copy (68-96 ms) is what remains, the reads of later groups are hidden.
    """
    found = _unpatched(module, "LMCacheEngine.retrieve", "pipeline")
    if found is None or not _copied_version_matches("pipeline", "LMCacheEngine.retrieve"):
        return
    cls, original = found

    @functools.wraps(original)
    def retrieve(self: Any, tokens: Any, mask: Any = None, **kwargs: Any) -> Any:
        if not _pipeline_applies(self):
            return original(self, tokens, mask, **kwargs)
        return _pipelined_retrieve(self, tokens, mask, kwargs)

    cls.retrieve = _mark(retrieve, "pipeline")
    logger.info("kvdemo plugin: applied pipeline (%s.LMCacheEngine.retrieve copies each group of %d chunks to "
                "the GPU while the next groups are read)", module.__name__, pipelined_load.DEFAULT_GROUP_CHUNKS)


def _pipeline_applies(engine: Any) -> bool:
    """Whether this retrieve is one the pipelined path reproduces exactly (else LMCache's own runs)."""
    if engine.gpu_connector is None or engine.storage_manager is None or not engine.is_healthy():
        return False
    return not any(getattr(engine, flag, False)
                   for flag in ("async_loading", "save_only_first_rank", "remove_after_retrieve", "use_layerwise"))


class _EngineChunkIO:
    """:class:`kvdemo.pipelined_load.ChunkIO` over an LMCacheEngine, for one retrieve call."""

    def __init__(self, engine: Any, kwargs: dict) -> None:
        self.engine, self.kwargs = engine, kwargs

    def fetch(self, keys: list[Any], location: str) -> list[Any]:
        return self.engine.storage_manager.batched_get(keys=keys, location=location)

    def to_gpu(self, objs: list[Any], starts: list[int], ends: list[int]) -> None:
        self.engine.gpu_connector.batched_to_gpu(objs, starts, ends, **self.kwargs)

    def size(self, obj: Any) -> int:
        return int(obj.get_size())

    def release_copied(self, obj: Any) -> None:
        if obj.is_pinned:
            obj.unpin()
        obj.ref_count_down()

    def release_unused(self, obj: Any) -> None:
        obj.ref_count_down()


def _retrieve_block_mapping(engine: Any, tokens: Any, mask: Any, kwargs: dict) -> list[tuple[str, list[Any]]]:
    """(location, [(key, start, end)]) in token order, exactly as LMCache's ``_process_tokens_internal``."""
    chunk_infos = [(key, start, end) for start, end, key in engine.token_database.process_tokens(
        tokens=tokens, mask=mask, request_configs=kwargs.get("request_configs"))]
    pins = engine.lookup_pins.get(kwargs["req_id"]) if "req_id" in kwargs else None
    if pins is not None and len(pins) == 1:
        return [(next(iter(pins)), chunk_infos)]
    return list(engine.storage_manager.get_block_mapping(chunk_infos).items())


def _retrieve_readers(engine: Any) -> ThreadPoolExecutor:
    """The engine's reader threads (created on its first pipelined retrieve)."""
    readers = getattr(engine, "_kvdemo_readers", None)
    if readers is None:
        readers = ThreadPoolExecutor(pipelined_load.DEFAULT_READERS, thread_name_prefix="kvdemo-kv-read")
        engine._kvdemo_readers = readers
    return readers


def _pipelined_retrieve(engine: Any, tokens: Any, mask: Any, kwargs: dict) -> Any:
    """LMCache's retrieve with reads and host→device copies overlapped; returns the same CPU bool mask."""
    import torch  # only ever called inside a vLLM worker

    req_id = kwargs.get("req_id", "unspecified")
    num_required = int(torch.sum(mask).item()) if mask is not None else len(tokens)
    check_log = getattr(engine, "_log_kvcache_for_check", None)  # LMCache's optional "KVCache Check" lines
    if check_log is not None:
        check_log(operation="retrieve", kwargs=kwargs, token_count=num_required, require_req_id=True)
    stats = engine.stats_monitor.on_retrieve_request(num_required)
    ret_mask = torch.zeros(len(tokens), dtype=torch.bool, device="cpu")
    with torch.inference_mode():  # as LMCache's retrieve (a decorator there)
        report = pipelined_load.load_in_groups(_retrieve_block_mapping(engine, tokens, mask, kwargs),
                                               _EngineChunkIO(engine, kwargs), _retrieve_readers(engine))
    for _, start, end in report.loaded:
        ret_mask[start:end] = True
    stats.process_tokens_time += report.total_s - report.copy_s
    stats.to_gpu_time += report.copy_s
    retrieved = torch.sum(ret_mask)
    engine.stats_monitor.on_retrieve_finished(stats, retrieved)
    logger.info("kvdemo pipeline: [req_id=%s] retrieved %d of %d required tokens (%.3f GB) in %.1f ms "
                "(%.1f GB/s), %d groups; waited %.1f ms for reads, %.1f ms copying to the GPU", req_id,
                int(retrieved), num_required, report.bytes_loaded / 1e9, report.total_s * 1e3,
                report.bytes_loaded / report.total_s / 1e9 if report.total_s > 0 else 0.0, report.groups,
                report.wait_s * 1e3, report.copy_s * 1e3)
    return ret_mask


# --------------------------------------------------------------------------------------------------
# Speed fix 5b: the "Double unpin" warning storm
# --------------------------------------------------------------------------------------------------


class DoubleUnpinFilter(logging.Filter):
    """Let the first "Double unpin" warning through, drop and count the rest.

    WHY: in layerwise mode every retrieved memory object is unpinned twice (``retrieve_layer`` unpins
    each pinned object, then ``wait_for_save`` calls ``lookup_unpin(req_id)``), so a 16K blended request
    logs ~288 warnings (9 segments x 32 layers, ~12 ms). LMCache resets the pin count to 0 itself.

    Why quieting "by logger name" did not work: ``lmcache.logging.init_logger`` gives every LMCache
    module logger its own handler, ``propagate = False`` and an explicit level from
    ``LMCACHE_LOG_LEVEL``, and it does so when the module is imported. A level set on ``lmcache`` (the
    parent) never applies, and a level set on ``lmcache.v1.memory_management`` before that import is
    overwritten by it. A filter on the logger object itself survives (init_logger clears handlers,
    never filters) and drops the record before any handler formats or writes it.
    """

    def __init__(self, keep_first: int = 1) -> None:
        super().__init__()
        self.keep_first = keep_first
        self.seen = 0
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else str(record.msg)
        if DOUBLE_UNPIN_TEXT not in msg:
            return True
        self.seen += 1
        if self.seen <= self.keep_first:
            record.msg = msg + " [kvdemo plugin: further 'Double unpin' warnings are counted, not logged]"
            return True
        self.suppressed += 1
        return False


def _install_quiet_filter() -> None:
    target = logging.getLogger(DOUBLE_UNPIN_LOGGER)
    for existing in target.filters:
        if isinstance(existing, logging.Filter) and type(existing).__name__ == DoubleUnpinFilter.__name__:
            _state.quiet_filter = existing  # type: ignore[assignment]
            return
    _state.quiet_filter = DoubleUnpinFilter()
    target.addFilter(_state.quiet_filter)
    logger.info("kvdemo plugin: applied quiet (filter on logger %r drops repeated %r warnings)",
                DOUBLE_UNPIN_LOGGER, DOUBLE_UNPIN_TEXT)


# --------------------------------------------------------------------------------------------------
# Optional profiling (KVDEMO_PROFILE=1)
# --------------------------------------------------------------------------------------------------

# Phases in log order. Times are inclusive and nested: step > load > blend > {retrieve, compute};
# step > save > store; wait_save may also run store steps. lookup is the scheduler-side hit lookup
# (CPU only, not synchronized).
PROFILE_PHASES: tuple[str, ...] = ("step", "lookup", "load", "blend", "retrieve", "compute", "save", "store",
                                   "wait_save")
# A step is logged only when one of these ran in it (decode steps stay silent).
_PROFILE_TRIGGERS = frozenset({"lookup", "blend", "retrieve", "store"})


class _Profiler:
    """Accumulates CUDA-synchronized phase times for one engine step and logs them as one line."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self._sync: Callable[[], None] | None = None
        self._unpin_mark = 0

    def sync(self) -> None:
        if self._sync is None:
            self._sync = _cuda_synchronizer()
        self._sync()

    @contextmanager
    def phase(self, name: str, synchronize: bool = True) -> Iterator[None]:
        if synchronize:
            self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if synchronize:
                self.sync()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3
            self.calls[name] = self.calls.get(name, 0) + 1

    def count(self, name: str, value: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + value

    def line(self) -> str | None:
        if not _PROFILE_TRIGGERS.intersection(self.calls):
            return None
        parts = [f"{name}={self.ms[name]:.1f}ms" for name in PROFILE_PHASES if name in self.ms]
        parts += [f"{name}={value}" for name, value in sorted(self.counts.items())]
        if _state.quiet_filter is not None:
            parts.append(f"double_unpin_suppressed={_state.quiet_filter.suppressed - self._unpin_mark}")
        return "kvdemo-profile: " + " ".join(parts)

    def flush(self) -> None:
        text = self.line()
        if text is not None:
            logger.info("%s", text)
        self.ms.clear()
        self.calls.clear()
        self.counts.clear()
        if _state.quiet_filter is not None:
            self._unpin_mark = _state.quiet_filter.suppressed


def _cuda_synchronizer() -> Callable[[], None]:
    try:
        import torch
    except ImportError:
        return lambda: None
    if not torch.cuda.is_available():
        return lambda: None
    return torch.cuda.synchronize


PROFILER = _Profiler()


def _timed(original: Callable[..., Any], phase: str, *, synchronize: bool = True,
           flush: bool = False, count_tokens: str | None = None) -> Callable[..., Any]:
    """Wrap a method so its calls are timed as ``phase`` (and the step is logged when ``flush``)."""

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if count_tokens is not None and args:
            try:
                PROFILER.count(count_tokens, len(args[0]))
            except TypeError:
                pass
        try:
            with PROFILER.phase(phase, synchronize):
                return original(self, *args, **kwargs)
        finally:
            if flush:
                PROFILER.flush()

    return _mark(wrapper, "profile")


def _timed_generator(original: Callable[..., Any], phase: str) -> Callable[..., Any]:
    """Wrap a generator method so the time spent in each of its steps is added to ``phase``."""

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        gen = original(self, *args, **kwargs)
        sent: Any = None
        try:
            while True:
                with PROFILER.phase(phase):
                    try:
                        item = gen.send(sent)
                    except StopIteration as stop:
                        return stop.value
                sent = yield item
        finally:
            gen.close()

    return _mark(wrapper, "profile")


def _profile_methods(module: ModuleType, cls_name: str, plan: dict[str, Callable[[Any], Any]]) -> None:
    done = []
    for method, make in plan.items():
        found = _unpatched(module, f"{cls_name}.{method}", "profile")
        if found is None:
            continue
        cls, original = found
        setattr(cls, method, make(original))
        done.append(method)
    if done:
        logger.info("kvdemo plugin: applied profile (%s.%s: %s)", module.__name__, cls_name, ", ".join(done))


def _arm_profiling() -> None:
    """Time the phases of a blended request (vllm 0.22.0 / lmcache 0.5.3 function names)."""
    _when_imported(MOD_WORKER, functools.partial(_profile_methods, cls_name="Worker", plan={
        "execute_model": lambda f: _timed(f, "step", flush=True),
    }))
    _when_imported(MOD_ADAPTER, functools.partial(_profile_methods, cls_name="LMCacheConnectorV1Impl", plan={
        "get_num_new_matched_tokens": lambda f: _timed(f, "lookup", synchronize=False),
        "start_load_kv": lambda f: _timed(f, "load"),
        "save_kv_layer": lambda f: _timed(f, "save"),
        "wait_for_save": lambda f: _timed(f, "wait_save"),
    }))
    _when_imported(MOD_BLENDER, functools.partial(_profile_methods, cls_name="LMCBlender", plan={
        "blend": lambda f: _timed(f, "blend", count_tokens="blend_tokens"),
    }))
    _when_imported(MOD_CACHE_ENGINE, functools.partial(_profile_methods, cls_name="LMCacheEngine", plan={
        "retrieve_layer": lambda f: _timed_generator(f, "retrieve"),
        "store_layer": lambda f: _timed_generator(f, "store"),
    }))
    _when_imported(MOD_MODEL_BASE, functools.partial(_profile_methods, cls_name="LMCBaseModel", plan={
        "compute_layer": lambda f: _timed_generator(f, "compute"),
    }))


# --------------------------------------------------------------------------------------------------
# Optional tracing of one blend (KVDEMO_TRACE_DIR)
# --------------------------------------------------------------------------------------------------


def _patch_blend_trace(module: ModuleType, trace_dir: Path) -> None:
    """Wrap ``LMCBlender.blend``: when ``trace_dir/arm`` exists, run that one blend under the torch profiler.

    WHY: whether LMCache's layerwise loads overlap the recompute can only be seen on a GPU timeline
    without added syncs; arming one request at a time keeps every other request untouched."""
    found = _unpatched(module, "LMCBlender.blend", "trace")
    if found is None:
        return
    cls, original = found

    @functools.wraps(original)
    def blend(self: Any, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        label = _take_trace_arm(trace_dir)
        if label is None:
            return original(self, tokens, *args, **kwargs)
        return _traced_call(functools.partial(original, self, tokens, *args, **kwargs), trace_dir, label,
                            n_tokens=len(tokens))

    cls.blend = _mark(blend, "trace")
    logger.info("kvdemo plugin: applied trace (%s.LMCBlender.blend is traced when %s exists)", module.__name__,
                trace_dir / TRACE_ARM_FILE)


def _take_trace_arm(trace_dir: Path) -> str | None:
    """The label in ``trace_dir/arm`` if it exists (and delete it: one trace per arming), else None."""
    arm = trace_dir / TRACE_ARM_FILE
    try:
        label = arm.read_text().strip()
        arm.unlink()
    except OSError:
        return None
    return "".join(ch for ch in label if ch.isalnum() or ch in "-_.") or "blend"


def _traced_call(call: Callable[[], Any], trace_dir: Path, label: str, n_tokens: int) -> Any:
    """Run ``call`` under torch.profiler (CPU + CUDA), then write the trace and its summary."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from .trace_summary import BLEND_ANNOTATION, load_events, summarize

    try:
        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        prof.__enter__()
    except Exception:
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
    except Exception:
        logger.exception("kvdemo plugin: writing the blend trace failed")
    return result


# --------------------------------------------------------------------------------------------------
# Test support
# --------------------------------------------------------------------------------------------------


def _reset_for_tests() -> None:
    """Forget this process's plugin state (hooks, finder, handler). Patched targets stay marked."""
    with _lock:
        if _state.finder is not None and _state.finder in sys.meta_path:
            sys.meta_path.remove(_state.finder)
        if _state.handler is not None:
            logger.removeHandler(_state.handler)
            logger.propagate = True
        _state.__init__()  # type: ignore[misc]
        PROFILER.__init__()  # type: ignore[misc]
        _mask_said.clear()
        _flash_attn_varlen.cache_clear()
