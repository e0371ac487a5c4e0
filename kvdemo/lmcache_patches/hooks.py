"""How the plugin patches code it does not own: post-import hooks, one wrap helper, marks, a version gate.

Every fix follows the pattern instrumentation libraries use (wrapt's ``wrap_function_wrapper``, ddtrace's
``contrib/*/patch.py``): a patch runs when its target module is imported (or at once if it already is),
wraps one attribute per line with :func:`wrap_method`, which finds the target, skips it if this fix
already wrapped it, marks the replacement and logs "applied"; :func:`unpatch_all` puts the originals back
(tests use it; engines never unpatch). A failing patch logs a WARNING and leaves the target as it was:
the engine must keep running unpatched rather than crash on a fix.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .targets import COPIED_LMCACHE_VERSIONS

# One logger for the whole plugin: its lines are the evidence in engine logs ("kvdemo plugin: applied ...").
logger = logging.getLogger("kvdemo.vllm_plugin")

# Marker attributes set on every function the plugin installs. A patch whose target already carries its
# fix is skipped, so register() and the import hooks are idempotent even if a module is re-imported.
MARK = "_kvdemo_fix"  # the outermost fix
MARKS = "_kvdemo_fixes"  # every fix in the stack (kernels, tokens, trace and profile all wrap blend)

Patch = Callable[[ModuleType], None]


@dataclass
class _Applied:
    owner: Any
    name: str
    original: Any
    replacement: Any


@dataclass
class _State:
    """Process-wide hook state (vLLM may call register() several times per process)."""

    registered: bool = False
    hooks: dict[str, list[Patch]] = field(default_factory=dict)
    finder: _PostImportFinder | None = None
    handler: logging.Handler | None = None
    applied: list[_Applied] = field(default_factory=list)


state = _State()
lock = threading.RLock()


# --------------------------------------------------------------------------------------------------
# Wrapping
# --------------------------------------------------------------------------------------------------


def already(target: Any, fix: str) -> bool:
    """Whether ``fix`` already wrapped ``target``."""
    return fix in getattr(target, MARKS, ())


def mark(func: Any, fix: str) -> Any:
    """Tag a replacement with its fix (``MARK``: the outermost; ``MARKS``: every fix in the stack)."""
    setattr(func, MARKS, frozenset(getattr(func, MARKS, ())) | {fix})  # functools.wraps copied the inner's
    setattr(func, MARK, fix)
    return func


def missing(fix: str, what: str) -> None:
    logger.warning("kvdemo plugin: %s not found in this version; fix '%s' not applied", what, fix)


def find_target(module: ModuleType, path: str, fix: str) -> tuple[Any, str, Any] | None:
    """``(owner, name, original)`` for ``path`` ("Class.method" or "function") in ``module``; None when it is
    missing in this version (logged) or ``fix`` already wrapped it."""
    owner: Any = module
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part, None)
    original = getattr(owner, name, None)
    if original is None:
        missing(fix, f"{module.__name__}.{path}")
        return None
    if already(original, fix):
        return None
    return owner, name, original


def wrap_method(module: ModuleType, path: str, fix: str, make: Callable[[Any], Callable[..., Any]],
                what: str | None = None) -> bool:
    """Replace ``module.path`` by ``make(original)`` (``functools.wraps``-ed, marked, recorded for unpatch).

    ``what`` completes the "applied" log line; None logs nothing (a fix that wraps several targets says
    it once). Returns whether it wrapped (False: missing here, or this fix already wrapped it).
    """
    found = find_target(module, path, fix)
    if found is None:
        return False
    owner, name, original = found
    replacement = mark(functools.wraps(original)(make(original)), fix)
    setattr(owner, name, replacement)
    state.applied.append(_Applied(owner, name, original, replacement))
    if what is not None:
        logger.info("kvdemo plugin: applied %s (%s.%s %s)", fix, module.__name__, path, what)
    return True


def unpatch_all() -> int:
    """Put every original back, newest first (so stacked wrappers unwind); returns how many were restored.

    A target someone else re-bound after us is left alone: restoring it would drop their change."""
    restored = 0
    with lock:
        while state.applied:
            entry = state.applied.pop()
            if getattr(entry.owner, entry.name, None) is entry.replacement:
                setattr(entry.owner, entry.name, entry.original)
                restored += 1
    return restored


# --------------------------------------------------------------------------------------------------
# Version gate
# --------------------------------------------------------------------------------------------------


def lmcache_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmcache")
    except PackageNotFoundError:
        return None


def copied_version_matches(fix: str, what: str) -> bool:
    """Whether LMCache here is a version whose ``what`` the fix copied (else warn: not applied)."""
    found = lmcache_version()
    if found in COPIED_LMCACHE_VERSIONS:
        return True
    logger.warning("kvdemo plugin: fix '%s' is a copy of lmcache %s's %s; lmcache here is %s, so it is not "
                   "applied", fix, "/".join(COPIED_LMCACHE_VERSIONS), what, found)
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
        if fullname not in state.hooks or fullname in self._busy:
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


def when_imported(module_name: str, callback: Patch) -> None:
    """Run ``callback(module)`` now if ``module_name`` is imported, else right after its import."""
    module = sys.modules.get(module_name)
    if module is not None:
        _safe_call(callback, module)
        return
    if not _module_file_exists(module_name):
        logger.warning("kvdemo plugin: %s not found in this install; %s not applied", module_name,
                       getattr(callback, "__name__", callback))
        return
    state.hooks.setdefault(module_name, []).append(callback)
    if state.finder is None:
        state.finder = _PostImportFinder()
        sys.meta_path.insert(0, state.finder)


def _run_hooks(module_name: str, module: ModuleType) -> None:
    for callback in state.hooks.pop(module_name, []):
        _safe_call(callback, module)


def _safe_call(callback: Patch, module: ModuleType) -> None:
    """A failing patch must never break vLLM/LMCache: log a WARNING and go on unpatched."""
    try:
        callback(module)
    except Exception as exc:  # noqa: BLE001 - deliberately broad: a patch is best effort
        logger.warning("kvdemo plugin: %s on %s failed (%s: %s); left unpatched",
                       getattr(callback, "__name__", callback), module.__name__, type(exc).__name__, exc)


def module_available(name: str) -> bool:
    """True when ``name`` is importable, without importing it (lmcache's __init__ loads torch/CUDA ops)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


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


# --------------------------------------------------------------------------------------------------
# Logging and reset
# --------------------------------------------------------------------------------------------------


def ensure_log_handler() -> None:
    """Make the plugin's INFO lines visible in the engine log.

    vLLM configures only its own ``vllm`` logger; the root logger has no handler in engine processes,
    so INFO records of ``kvdemo.*`` would be dropped (``logging.lastResort`` shows WARNING and up only).
    When nothing else would print them, attach one stderr handler (and stop propagation so a root handler
    added later does not print each line twice).
    """
    if state.handler is not None or logger.handlers or logging.getLogger().handlers:
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [kvdemo] %(message)s", "%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    state.handler = handler


def reset() -> None:
    """Forget this process's hooks, finder and handler (tests). Patched targets stay as they are."""
    with lock:
        if state.finder is not None and state.finder in sys.meta_path:
            sys.meta_path.remove(state.finder)
        if state.handler is not None:
            logger.removeHandler(state.handler)
            logger.propagate = True
        state.registered = False
        state.hooks.clear()
        state.finder = None
        state.handler = None
