"""Speed fix 'staging': a load from the shared store is copied to the GPU by DMA, then scattered on the GPU.

WHY: LMCache 0.5.3's ``VLLMPagedMemGPUConnectorV2.to_gpu`` scatters each stored chunk into vLLM's paged KV
cache with one CUDA kernel that reads the chunk straight from pinned host memory. Those reads cross PCIe
at 22–30 GB/s on an H100 (issue #17), about half of what the copy engines move (a bulk pinned
host→device copy: ~50 GB/s). Here each chunk is first copied in one ``cudaMemcpyAsync`` (a tensor
``copy_``) into a GPU staging buffer, and LMCache's own ``to_gpu`` then scatters from that buffer,
device to device. Both run in order on the connector's load stream, so one staging buffer is enough.

The first staged chunk of each connector is checked against LMCache's own path: the chunk is read back
from vLLM's KV cache (LMCache's ``from_gpu``) and compared bit for bit. A mismatch, a chunk that is not in
pinned memory or not contiguous, or any error sends that call and all later ones to LMCache's path, with
one log line saying why.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

from .hooks import copied_version_matches, logger, wrap_method
from .targets import MOD_GPU_CONNECTORS

DISABLED_ATTR = "_kvdemo_staging_off"
BUFFER_ATTR = "_kvdemo_staging_buffer"
VERIFIED_ATTR = "_kvdemo_staging_verified"


class StagedChunk:
    """A memory object for LMCache's ``to_gpu``/``from_gpu``: its tensor lives on the GPU."""

    def __init__(self, tensor: Any, metadata: Any) -> None:
        self.tensor, self.metadata = tensor, metadata


def patch_staged_load(module: ModuleType) -> None:
    """Wrap ``VLLMPagedMemGPUConnectorV2.batched_to_gpu`` (the non-layerwise load the share scenario uses)."""
    if not copied_version_matches("staging", "VLLMPagedMemGPUConnectorV2.batched_to_gpu"):
        return

    def make(original: Any) -> Any:
        def batched_to_gpu(self: Any, memory_objs: Any, starts: Any, ends: Any, **kwargs: Any) -> Any:
            objs = list(memory_objs)
            reason = staging_refusal(self, objs)
            if reason is not None:
                say_off_once(self, reason)
                return original(self, objs, starts, ends, **kwargs)
            try:
                staged_to_gpu(self, objs, list(starts), list(ends), kwargs)
            except Exception as exc:  # noqa: BLE001 - LMCache's path still loads the chunks
                disable(self, f"{type(exc).__name__}: {exc}")
                return original(self, objs, starts, ends, **kwargs)
            return None
        return batched_to_gpu

    wrap_method(module, "VLLMPagedMemGPUConnectorV2.batched_to_gpu", "staging", make,
                "copies each stored chunk to a GPU staging buffer by DMA, then scatters it on the GPU")


def staging_refusal(connector: Any, objs: list[Any]) -> str | None:
    """Why this load takes LMCache's path (None: it is staged)."""
    if getattr(connector, DISABLED_ATTR, False):
        return "off"  # already said why
    if getattr(connector, "use_mla", False):
        return "MLA model (not measured)"
    for obj in objs:
        tensor = getattr(obj, "tensor", None)
        if tensor is None or tensor.is_cuda:
            return "a chunk without a host tensor"
        if not tensor.is_contiguous():
            return "a chunk whose tensor is not contiguous"
        if not tensor.is_pinned():
            return "a chunk outside pinned memory (a plain copy would not be asynchronous)"
    return None


def staging_buffer(connector: Any, numel: int, like: Any) -> Any:
    """The connector's flat staging buffer on its GPU, grown to ``numel`` elements of ``like``'s dtype."""
    import torch

    buffer = getattr(connector, BUFFER_ATTR, None)
    if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype:
        device = connector.kvcaches[0].device if connector.kvcaches else torch.device("cuda")
        buffer = torch.empty(numel, dtype=like.dtype, device=device)
        setattr(connector, BUFFER_ATTR, buffer)
    return buffer


def staged_to_gpu(connector: Any, objs: list[Any], starts: list[int], ends: list[int], kwargs: dict) -> None:
    """LMCache's batched_to_gpu with each chunk DMA-copied to the staging buffer first (same stream, in order)."""
    import torch

    connector.initialize_kvcaches_ptr(**kwargs)  # the staging buffer goes on the KV cache's device
    largest = max(obj.tensor.numel() for obj in objs)
    buffer = staging_buffer(connector, largest, objs[0].tensor)
    with torch.cuda.stream(connector.load_stream):
        for obj, start, end in zip(objs, starts, ends, strict=True):
            staged = buffer[:obj.tensor.numel()].view(obj.tensor.shape)
            staged.copy_(obj.tensor, non_blocking=True)
            chunk = StagedChunk(staged, obj.metadata)
            connector.to_gpu(chunk, start, end, **kwargs)
            if not getattr(connector, VERIFIED_ATTR, False):
                verify_first_chunk(connector, chunk, obj, start, end, kwargs)
    connector.load_stream.synchronize()


def verify_first_chunk(connector: Any, chunk: StagedChunk, obj: Any, start: int, end: int, kwargs: dict) -> None:
    """Read the chunk back from vLLM's KV cache with LMCache's ``from_gpu`` and compare it bit for bit.

    Tokens vLLM already had (``vllm_cached_tokens``) are skipped by ``to_gpu`` and so by the comparison. A
    mismatch raises: the caller then loads with LMCache's own path and stops staging.
    """
    import torch

    connector.load_stream.synchronize()
    back = StagedChunk(torch.empty_like(chunk.tensor), obj.metadata)
    connector.from_gpu(back, start, end, **kwargs)
    connector.store_stream.synchronize()
    skip = min(end - start, max(0, int(kwargs.get("vllm_cached_tokens", 0)) - start))
    expected = obj.tensor[:, :, skip:].to(back.tensor.device)
    if not torch.equal(back.tensor[:, :, skip:], expected):
        raise RuntimeError("the staged chunk read back from vLLM's KV cache differs from the stored chunk")
    setattr(connector, VERIFIED_ATTR, True)
    logger.info("kvdemo plugin: staging: the first staged chunk (%d tokens, %.1f MB) reads back from vLLM's KV "
                "cache equal to the stored chunk", end - start, obj.tensor.numel() * obj.tensor.element_size() / 1e6)


def disable(connector: Any, why: str) -> None:
    setattr(connector, DISABLED_ATTR, True)
    logger.warning("kvdemo plugin: staging: %s; loads use LMCache's own copy from now on", why)


def say_off_once(connector: Any, reason: str) -> None:
    if reason != "off" and getattr(connector, "_kvdemo_staging_said", None) != reason:
        connector._kvdemo_staging_said = reason
        logger.log(logging.INFO, "kvdemo plugin: staging: LMCache's own copy for %s", reason)


PATCHES = ((MOD_GPU_CONNECTORS, patch_staged_load),)
