"""Speed fix 'staging': a load from the shared store goes to the GPU as bulk DMA copies plus one scatter per group.

WHY: LMCache 0.5.3's ``VLLMPagedMemGPUConnectorV2.batched_to_gpu`` calls ``to_gpu`` once per 256-token
chunk, and each call scatters the chunk into vLLM's paged KV cache with a kernel that reads pinned host
memory. On one H200 engine B's 2.08 GB load (62 chunks) took 78–99 ms, 21–27 GB/s, while the machine's copy
engines move 55 GB/s host to GPU, also chunk by chunk from a 4 GB pinned pool (scripts/h2d_bandwidth.py,
benchmarks/results/steps/h2d-bandwidth-h200.json). DMA-copying each chunk to a GPU buffer and keeping one
``to_gpu`` per chunk measured no faster (23–27 GB/s, steps/share-staging-on-h200.json): the per-chunk Python
of ``to_gpu`` (~1 ms a chunk) sets the pace, not the link. So here each run of up to
:data:`GROUP_CHUNKS` consecutive chunks is copied by DMA into one GPU staging buffer laid out as a single
``[2, layers, tokens, dim]`` block, and LMCache's own ``to_gpu`` scatters the whole run once, device to
device. Everything runs in order on the connector's load stream.

The first staged run of each connector is checked against LMCache's own path: it is read back from vLLM's
KV cache (LMCache's ``from_gpu``) and compared bit for bit. A mismatch, a chunk that is not in pinned memory
or not contiguous, or any error sends that call and all later ones to LMCache's path, with one log line.
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
                f"copies runs of up to {GROUP_CHUNKS} stored chunks to one GPU staging block by DMA, then scatters "
                "each run once on the GPU")


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


GROUP_CHUNKS = 8  # chunks per staged run: 268 MB of Mistral-7B KV, the staging buffer's size


def staging_buffer(connector: Any, numel: int, like: Any) -> Any:
    """The connector's flat staging buffer on its GPU, grown to ``numel`` elements of ``like``'s dtype."""
    import torch

    buffer = getattr(connector, BUFFER_ATTR, None)
    if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype:
        device = connector.kvcaches[0].device if connector.kvcaches else torch.device("cuda")
        buffer = torch.empty(numel, dtype=like.dtype, device=device)
        setattr(connector, BUFFER_ATTR, buffer)
    return buffer


def consecutive_runs(starts: list[int], ends: list[int], limit: int = GROUP_CHUNKS) -> list[tuple[int, int]]:
    """Index ranges [i, j) of chunks that follow each other in the prompt (end of one = start of the next),
    at most ``limit`` chunks each: each range becomes one staged block and one scatter."""
    runs: list[tuple[int, int]] = []
    first = 0
    for i in range(1, len(starts) + 1):
        if i == len(starts) or starts[i] != ends[i - 1] or i - first == limit:
            runs.append((first, i))
            first = i
    return runs


def staged_to_gpu(connector: Any, objs: list[Any], starts: list[int], ends: list[int], kwargs: dict) -> None:
    """LMCache's batched_to_gpu as DMA copies into one staged block per run of chunks + one scatter per run."""
    import torch

    for obj, start, end in zip(objs, starts, ends, strict=True):
        if obj.tensor.dim() != 4 or obj.tensor.shape[2] != end - start:
            raise ValueError(f"a chunk of shape {tuple(obj.tensor.shape)} for {end - start} tokens")
    connector.initialize_kvcaches_ptr(**kwargs)  # the staging buffer goes on the KV cache's device
    kv, layers, _, dim = objs[0].tensor.shape
    runs = consecutive_runs(starts, ends)
    most = max(ends[j - 1] - starts[i] for i, j in runs)
    buffer = staging_buffer(connector, kv * layers * most * dim, objs[0].tensor)
    with torch.cuda.stream(connector.load_stream):
        for i, j in runs:
            tokens = ends[j - 1] - starts[i]
            block = buffer[:kv * layers * tokens * dim].view(kv, layers, tokens, dim)
            for obj, start, end in zip(objs[i:j], starts[i:j], ends[i:j]):
                block[:, :, start - starts[i]:end - starts[i]].copy_(obj.tensor, non_blocking=True)
            run = StagedChunk(block, objs[i].metadata)
            connector.to_gpu(run, starts[i], ends[j - 1], **kwargs)
            if not getattr(connector, VERIFIED_ATTR, False):
                verify_first_run(connector, run, objs[i:j], starts[i], ends[j - 1], kwargs)
    connector.load_stream.synchronize()


def verify_first_run(connector: Any, run: StagedChunk, objs: list[Any], start: int, end: int, kwargs: dict) -> None:
    """Read the run back from vLLM's KV cache with LMCache's ``from_gpu`` and compare it bit for bit with the
    stored chunks.

    Tokens vLLM already had (``vllm_cached_tokens``) are skipped by ``to_gpu`` and so by the comparison. A
    mismatch raises: the caller then loads with LMCache's own path and stops staging.
    """
    import torch

    connector.load_stream.synchronize()
    back = StagedChunk(torch.empty_like(run.tensor), run.metadata)
    connector.from_gpu(back, start, end, **kwargs)
    connector.store_stream.synchronize()
    skip = min(end - start, max(0, int(kwargs.get("vllm_cached_tokens", 0)) - start))
    expected = torch.cat([obj.tensor for obj in objs], dim=2)[:, :, skip:].to(back.tensor.device)
    if not torch.equal(back.tensor[:, :, skip:], expected):
        raise RuntimeError("the staged chunks read back from vLLM's KV cache differ from the stored chunks")
    setattr(connector, VERIFIED_ATTR, True)
    logger.info("kvdemo plugin: staging: the first staged run (%d chunks, %d tokens, %.1f MB) reads back from "
                "vLLM's KV cache equal to the stored chunks", len(objs), end - start,
                run.tensor.numel() * run.tensor.element_size() / 1e6)


def disable(connector: Any, why: str) -> None:
    setattr(connector, DISABLED_ATTR, True)
    logger.warning("kvdemo plugin: staging: %s; loads use LMCache's own copy from now on", why)


def say_off_once(connector: Any, reason: str) -> None:
    if reason != "off" and getattr(connector, "_kvdemo_staging_said", None) != reason:
        connector._kvdemo_staging_said = reason
        logger.log(logging.INFO, "kvdemo plugin: staging: LMCache's own copy for %s", reason)


PATCHES = ((MOD_GPU_CONNECTORS, patch_staged_load),)
