"""Speed fix 'sync': no full-device synchronize per layer in LMCache's layerwise load.

``make_batched_to_gpu`` is an edited copy of lmcache 0.5.3 gpu_connectors.py:781-944 (hence the version
gate); every edit is marked ``kvdemo:`` in the code.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from types import ModuleType
from typing import Any

from . import load_copies
from .hooks import copied_version_matches, find_target, wrap_method
from .targets import MOD_GPU_CONNECTORS


def patch_batched_to_gpu(module: ModuleType) -> None:
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
      i-2) are enqueued before that point; the compute of layer i-1 reads the other buffer. (Waiting on
      the compute stream at copy time would also wait for layer i-1 and serialize every load behind it.)
    * at the last layer the host still waits for the load stream, because ``retrieve_layer`` releases
      the CPU memory objects (``ref_count_down``) right after that step returns.
    """
    path = "VLLMBufferLayerwiseGPUConnector.batched_to_gpu"
    if find_target(module, path, "sync") is None or not copied_version_matches("sync", path):
        return

    def make(_original: Any) -> Any:
        replacement = make_batched_to_gpu(module)
        annotate = getattr(module, "_lmcache_nvtx_annotate", None)
        return annotate(replacement) if callable(annotate) else replacement

    wrap_method(module, path, "sync", make, "waits on streams, not on the whole device; each layer's load "
                "overlaps the previous layer's compute")


def make_batched_to_gpu(m: ModuleType, reuse_views: bool = False) -> Callable[..., Generator[None, Any, None]]:
    """Build the edited copy of lmcache 0.5.3 gpu_connectors.py:781-944 (names resolved from ``m``);
    ``reuse_views``: fix 'loadcopy''s edits too (marked ``kvdemo(loadcopy):``, kvdemo.lmcache_patches.load_copies)."""
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
        # kvdemo(loadcopy): both buffers' views once per request, not on every layer
        views = (load_copies.request_views(torch, (compute_gpu_buffer_obj, load_gpu_buffer_obj),
                                           [(a - buf_offset, b - buf_offset) for a, b in zip(starts, ends)])
                 if reuse_views else None)

        def tensor_of(obj: Any) -> Any:  # obj.tensor, or the request's cached view of it (loadcopy)
            held = views.get(id(obj)) if views else None
            return held.kv if held is not None and held.obj is obj else obj.tensor

        if self.cache_positions:
            old_positions_full = torch.zeros((num_all_tokens,), dtype=torch.int64, device=self.kvcaches[0].device)
        for layer_id in range(self.num_layers + 2):
            if layer_id > 1:
                lmc_ops.single_layer_kv_transfer(
                    tensor_of(self.buffer_mapping[layer_id - 2]),
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
                # on the GPU; the host waits only at the last layer (see patch_batched_to_gpu).
                torch.cuda.current_stream().wait_stream(self.load_stream)
                if layer_id == self.num_layers:
                    self.load_stream.synchronize()

                # ping-pong the buffers
                compute_gpu_buffer_obj, load_gpu_buffer_obj = load_gpu_buffer_obj, compute_gpu_buffer_obj

                compute = tensor_of(compute_gpu_buffer_obj)
                if self.cache_positions:
                    assert compute is not None
                    compute[0] = self.fused_rotary_emb(old_positions_full, new_positions_full, compute[0])

                # gap zeroing after RoPE. kvdemo: was `tensor[:, gaps] = 0.0`, whose CPU scalar becomes a
                # tensor copied to the GPU with a host sync on every layer (trace: 32 syncs per blend),
                # stopping the CPU from running ahead; index_fill_ takes the scalar as is.
                if self.current_gap_positions.numel():
                    compute.index_fill_(1, self.current_gap_positions, 0.0)

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
                    # kvdemo(loadcopy): two byte slices and two copies per segment when every object checks out
                    load_views = views[id(load_gpu_buffer_obj)] if views and layer_id > 0 else None
                    sources = (load_copies.source_bytes(torch, memory_objs_layer, load_views, MemoryFormat.KV_2TD)
                               if load_views else None)
                    if load_views is not None and sources is not None:
                        for (dst_k, dst_v), (src_k, src_v) in zip(load_views.segments, sources):
                            dst_k.copy_(src_k, non_blocking=True)
                            dst_v.copy_(src_v, non_blocking=True)
                    else:  # LMCache's per-segment loop (layer 0 also copies the cached positions)
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


PATCHES = ((MOD_GPU_CONNECTORS, patch_batched_to_gpu),)
