"""Speed fix 'kernels': vLLM's CUDA kernels in LMCache's eager model copy, during the blend only."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from types import ModuleType
from typing import Any

from .hooks import logger, wrap_method
from .targets import MOD_BLENDER

# vLLM IR ops (vllm.ir.ops.<name>) and CustomOp names (CustomOp.register) the blender's layers call.
BLEND_IR_OPS: tuple[str, ...] = ("rms_norm", "fused_add_rms_norm")
BLEND_IR_PRIORITY: list[str] = ["vllm_c", "native"]
BLEND_CUSTOM_OPS: tuple[str, ...] = ("silu_and_mul", "rotary_embedding")


def patch_blend_kernels(module: ModuleType) -> None:
    """Wrap ``LMCBlender.blend`` so LMCache's layerwise recompute calls vLLM's CUDA kernels.

    Inside the blend only, the IR ops get vLLM's C kernels first (``IrOp.set_priority``, vLLM's scoped
    override) and the two CustomOps dispatch to ``forward_cuda`` (what ``--enforce-eager`` uses); both are
    restored when the blend returns, so vLLM's own compiled forward and CUDA graphs are untouched.
    WHY: the blender recomputes with an *eager*, layer-by-layer walk over vLLM's modules
    (``LMCBaseModel.compute_layer``), which under torch.compile are set to their unfused PyTorch code
    (RMSNorm ~11 small kernels per call): the blend was CPU-bound (docs/plugin.md).
    """
    def make(original: Any) -> Any:
        def blend(self: Any, *args: Any, **kwargs: Any) -> Any:
            found = getattr(self, "_kvdemo_kernel_ops", None)
            if found is None:  # the ops and the model's modules do not change: find them once per blender
                model = getattr(getattr(self, "layerwise_model", None), "vllm_model", None)
                found = self._kvdemo_kernel_ops = (blend_ir_ops(), blend_custom_ops(model))
            with cuda_kernels_in_eager_blend(*found):
                return original(self, *args, **kwargs)
        return blend

    wrap_method(module, "LMCBlender.blend", "kernels", make,
                f"runs vLLM's CUDA kernels for {', '.join(BLEND_IR_OPS + BLEND_CUSTOM_OPS)}")


@contextmanager
def cuda_kernels_in_eager_blend(ir_ops: Sequence[Any], custom_ops: Sequence[Any]) -> Iterator[None]:
    """Within the block: the vLLM IR ops prefer ``vllm_c``; the CustomOp modules run ``forward_cuda``."""
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


PATCHES = ((MOD_BLENDER, patch_blend_kernels),)
