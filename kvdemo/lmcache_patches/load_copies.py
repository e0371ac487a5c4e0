"""Speed fix 'loadcopy' (opt-in until measured): LMCache's per-layer KV-load loop without per-segment views.

Per layer, lmcache 0.5.3's ``batched_to_gpu`` rebuilds every view it copies through: for each retrieved
segment it reads ``memory_obj.metadata`` (a lock) and evaluates ``MemoryObj.tensor`` (``raw_data[:size]``,
``.view(dtype)``, ``.view(shape)``) five times: ~21 slice/view/select ops and 2 copies per segment. The fix
(in the sync fix's copy, :func:`kvdemo.lmcache_patches.layerwise_sync.make_batched_to_gpu` with
``reuse_views``) builds both ping-pong buffers' views once per request (:class:`BufferViews`) and copies
each segment's K and V as two byte slices of its ``raw_data`` (:func:`source_bytes`), after checks that
prove those are exactly the bytes ``memory_obj.tensor[0]``/``[1]`` denote; any object that fails sends the
layer through LMCache's own loop, and layer 0 (which also copies cached positions) always does. Same
copies, streams, order and bytes: the paged KV is identical bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

from .hooks import already, copied_version_matches, find_target, logger, wrap_method
from .targets import MOD_GPU_CONNECTORS

FIX = "loadcopy"
PATH = "VLLMBufferLayerwiseGPUConnector.batched_to_gpu"


class BufferViews:
    """The views of one GPU ping-pong buffer (KV_2TD ``[2, T, D]``) that LMCache rebuilt on every layer:
    ``kv`` (its ``.tensor``) and per segment the bytes of ``kv[0][a:b]`` and ``kv[1][a:b]``."""

    __slots__ = ("kv", "obj", "ok", "segments", "shapes")

    def __init__(self, torch: Any, obj: Any, spans: Sequence[tuple[int, int]]) -> None:
        self.obj = obj
        self.kv = obj.tensor
        self.segments: list[tuple[Any, Any]] = []
        self.shapes: list[tuple[Any, int]] = []  # (the memory object's shape, bytes of its K half)
        try:  # anything unexpected: no byte views, every layer takes LMCache's per-segment copies
            self.ok = self.kv.dim() == 3 and self.kv.shape[0] == 2 and self.kv.is_contiguous()
            if self.ok:
                k_bytes, v_bytes = self.kv[0].view(torch.uint8), self.kv[1].view(torch.uint8)  # [T, D*itemsize]
                hidden, itemsize = self.kv.shape[2], self.kv.element_size()
                for a, b in spans:
                    self.segments.append((k_bytes[a:b].view(-1), v_bytes[a:b].view(-1)))
                    self.shapes.append((torch.Size((2, b - a, hidden)), (b - a) * hidden * itemsize))
        except Exception:  # noqa: BLE001
            self.ok, self.segments, self.shapes = False, [], []


def request_views(torch: Any, buffers: Sequence[Any], spans: Sequence[tuple[int, int]]) -> dict[int, BufferViews] | None:
    """Both buffers' views by ``id``, or None when either buffer is not a plain contiguous ``[2, T, D]``."""
    views = {id(obj): BufferViews(torch, obj, spans) for obj in buffers}
    return views if all(v.ok for v in views.values()) else None


def source_bytes(torch: Any, objs: Sequence[Any], views: BufferViews, kv_2td: Any) -> list[tuple[Any, Any]] | None:
    """``[(K bytes, V bytes)]`` of each memory object, or None unless every one is a plain TensorMemoryObj
    whose ``tensor[0]``/``tensor[1]`` are the first two halves of its ``raw_data``, in the buffer's dtype and
    its segment's shape (then LMCache's own per-segment code runs for the layer)."""
    if len(objs) != len(views.segments):
        return None
    out = []
    dtype, uint8, itemsize = views.kv.dtype, torch.uint8, views.kv.element_size()
    for obj, (shape, half) in zip(objs, views.shapes):
        meta, raw = getattr(obj, "meta", None), getattr(obj, "raw_data", None)
        prefix = getattr(obj, "group_prefix_sum", None)
        if (meta is None or raw is None or not prefix or getattr(obj, "valid", False) is not True
                or getattr(obj, "_used_size_override", 0) is not None  # .tensor would be a flat uint8 view
                or meta.fmt != kv_2td or meta.dtype != dtype or meta.shape != shape
                or prefix[-1] != 2 * half  # .tensor = raw_data[:get_size()], get_size() == 2 * half
                or not isinstance(raw, torch.Tensor) or raw.dtype != uint8 or raw.dim() != 1
                or raw.stride(0) != 1 or raw.numel() < 2 * half or raw.storage_offset() % itemsize):
            return None
        out.append((raw[:half], raw[half:2 * half]))
    return out


def patch_load_copies(module: ModuleType) -> None:
    """Install the sync fix's copy of ``batched_to_gpu`` with ``reuse_views`` (only on top of fix 'sync')."""
    from .layerwise_sync import make_batched_to_gpu

    found = find_target(module, PATH, FIX)
    if found is None or not copied_version_matches(FIX, PATH):
        return
    if not already(found[2], "sync"):
        logger.warning("kvdemo plugin: fix '%s' edits fix 'sync''s copy of %s, which is not applied here; "
                       "not applied", FIX, PATH)
        return

    def make(_original: Any) -> Any:
        replacement = make_batched_to_gpu(module, reuse_views=True)
        annotate = getattr(module, "_lmcache_nvtx_annotate", None)
        return annotate(replacement) if callable(annotate) else replacement

    wrap_method(module, PATH, FIX, make, "builds each request's buffer views once and copies each segment's K "
                "and V as two byte slices (no per-segment view chains)")


PATCHES = ((MOD_GPU_CONNECTORS, patch_load_copies),)
