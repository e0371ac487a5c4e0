"""Fixes 'register' and 'mistral': make LMCache's blender find the vLLM model, and compute Mistral.

LMCache 0.5.3 maps vLLM's LlamaForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM to its layerwise models
itself; the plugin adds MistralForCausalLM. :data:`SUPPORTED_ARCHITECTURES` is what the app checks a model's
``config.json`` against before any engine starts (kvdemo.preflight), so an unsupported model gets one clear
line instead of a NotImplementedError in the engine log.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from .hooks import logger, wrap_method
from .targets import MOD_BLENDER, MOD_MODEL_UTILS, MOD_WORKER

# vLLM model classes that LMCache's Llama path (LMCLlamaModel) computes correctly. vLLM 0.22's
# MistralForCausalLM subclasses its LlamaForCausalLM with the same submodule names
# (qkv_proj/rotary_emb/o_proj/mlp/norms); only its optional Llama-4 attention scaling differs, which is
# checked per model below.
LLAMA_LIKE_CLASS_NAMES: tuple[str, ...] = ("MistralForCausalLM",)

# Architectures (config.json "architectures") blending works with: LMCache's own three plus the plugin's.
LMCACHE_ARCHITECTURES: tuple[str, ...] = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ARCHITECTURES: tuple[str, ...] = LMCACHE_ARCHITECTURES + LLAMA_LIKE_CLASS_NAMES


def patch_worker_load_model(module: ModuleType) -> None:
    """Wrap ``Worker.load_model`` to call ``VLLMModelTracker.register_model(ENGINE_NAME, model)``.

    WHY: LMCache's blender is created by ``LMCBlenderBuilder.get_or_create``, which looks the model up
    with ``VLLMModelTracker.get_model(ENGINE_NAME)``; neither vLLM 0.22 nor LMCache 0.5.3 ever registers
    it (LMCache's example tells users to edit vLLM's gpu_worker.py). The connector and blender are
    created after ``load_model`` (in ``initialize_from_config``), so registering here is in time.
    """
    def make(original: Any) -> Any:
        def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(self, *args, **kwargs)
            register_loaded_model(self)
            return result
        return load_model

    wrap_method(module, "Worker.load_model", "register", make, "-> VLLMModelTracker.register_model")


def register_loaded_model(worker: Any) -> None:
    try:
        from lmcache.integration.vllm.utils import ENGINE_NAME
        from lmcache.v1.compute.models.utils import VLLMModelTracker
    except ImportError as exc:
        logger.warning("kvdemo plugin: cannot import LMCache's model tracker (%s); model not registered", exc)
        return
    model = worker.model_runner.get_model()
    VLLMModelTracker.register_model(ENGINE_NAME, model)
    logger.info("kvdemo plugin: registered %s with LMCache as %r", type(model).__name__, ENGINE_NAME)


def patch_infer_model(module: ModuleType) -> None:
    """Wrap ``infer_model_from_vllm`` so Llama-shaped vLLM classes use ``LMCLlamaModel``.

    WHY: LMCache picks its layerwise model by ``type(vllm_model).__name__`` and raises
    NotImplementedError for anything but Llama/Qwen2/Qwen3. vLLM 0.22 builds ``MistralForCausalLM``
    (a LlamaForCausalLM subclass) for Mistral-7B, which LMCache's Llama path computes correctly.
    ``lmcache.v1.compute.blend.blender`` did ``from ...models.utils import infer_model_from_vllm``,
    so the name is patched in both modules (the second finds it wrapped already and says so);
    everything else is delegated to the original.
    """
    def make(original: Any) -> Any:
        def infer_model_from_vllm(vllm_model: Any, blender: Any, enable_sparse: bool = False) -> Any:
            if type(vllm_model).__name__ in LLAMA_LIKE_CLASS_NAMES and llama_compatible(vllm_model):
                from lmcache.v1.compute.models.llama import LMCLlamaModel

                return LMCLlamaModel(vllm_model, blender, enable_sparse)
            return original(vllm_model, blender, enable_sparse)
        return infer_model_from_vllm

    wrapped = wrap_method(module, "infer_model_from_vllm", "mistral", make,
                          f"maps {','.join(LLAMA_LIKE_CLASS_NAMES)} to LMCLlamaModel")
    if not wrapped and getattr(module, "infer_model_from_vllm", None) is not None:
        logger.info("kvdemo plugin: applied mistral (%s.infer_model_from_vllm already wrapped)",
                    module.__name__)


def llama_compatible(vllm_model: Any) -> bool:
    """False for Mistral variants with Llama-4 attention scaling, which LMCLlamaModel does not apply."""
    try:
        attn = vllm_model.model.layers[0].self_attn
    except (AttributeError, IndexError, TypeError):
        return True
    return not getattr(attn, "do_llama_4_scaling", False)


REGISTER_PATCHES = ((MOD_WORKER, patch_worker_load_model),)
MISTRAL_PATCHES = ((MOD_MODEL_UTILS, patch_infer_model), (MOD_BLENDER, patch_infer_model))
