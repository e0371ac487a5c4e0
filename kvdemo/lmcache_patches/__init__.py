"""The LMCache fixes behind kvdemo's vLLM plugin, one module per patched target.

``kvdemo.vllm_plugin`` is the entry point vLLM calls; it decides which fixes run and hands each fix
module's ``PATCHES`` (target module, patch function) to :mod:`.hooks`, which applies a patch when its
target module is imported. Nothing here imports vLLM, LMCache or torch at module level, so the API
server process (which imports the plugin too) pays nothing and the CPU tests run without them.

- :mod:`.hooks`: the post-import hook, ``wrap_method`` (find, skip if done, wrap, mark, log), ``unpatch_all``
- :mod:`.targets`: the vllm 0.22.0 / lmcache 0.5.3 module paths the fixes patch
- fixes: :mod:`.model` (register + Mistral mapping), :mod:`.split`, :mod:`.short_save`, :mod:`.mask`,
  :mod:`.rope`, :mod:`.layerwise_sync`, :mod:`.kernels`, :mod:`.tokens`, :mod:`.lookup`, :mod:`.pipeline`
  (+ :mod:`.pipelined_load`), :mod:`.quiet`, :mod:`.selection` (a recompute policy, only when one is named)
- instrumentation: :mod:`.telemetry` (per-request record for the app), :mod:`.profile`, :mod:`.trace`
"""
