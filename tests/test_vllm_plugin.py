"""Tests for kvdemo.vllm_plugin on CPU, without vllm, lmcache or torch.

Fake modules with the exact module paths and names the plugin patches (vllm 0.22.0 / lmcache 0.5.3) are
put in ``sys.modules``; one test writes a fake package to disk to exercise the post-import hook.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import textwrap
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytest
from helpers import fake_module

from kvdemo import vllm_plugin as vp
from kvdemo.lmcache_patches import hooks, kernels, mask, quiet, split, targets
from kvdemo.lmcache_patches import tokens as token_fix

ENGINE_NAME = "vllm-instance"
SEP = [938, 938, 223]  # " # # " minus BOS with the dummy model's tokenizer (scripts/make_dummy_model.py)


# --------------------------------------------------------------------------------------------------
# Fakes
# --------------------------------------------------------------------------------------------------


class FakeTracker:
    """Mimics lmcache.v1.compute.models.utils.VLLMModelTracker."""

    _vllm_models: ClassVar[dict[str, Any]] = {}
    calls: ClassVar[list[tuple[str, Any]]] = []

    @classmethod
    def register_model(cls, instance_id: str, vllm_model: Any) -> None:
        cls.calls.append((instance_id, vllm_model))
        cls._vllm_models.setdefault(instance_id, vllm_model)

    @classmethod
    def get_model(cls, instance_id: str) -> Any:
        if instance_id not in cls._vllm_models:
            raise ValueError(f"vllm model for {instance_id} not found.")
        return cls._vllm_models[instance_id]


class LMCLlamaModel:
    def __init__(self, vllm_model: Any, blender: Any, enable_sparse: bool = False) -> None:
        self.vllm_model, self.blender, self.enable_sparse = vllm_model, blender, enable_sparse


class LMCQwen3Model(LMCLlamaModel):
    pass


def fake_infer_model_from_vllm(vllm_model: Any, blender: Any, enable_sparse: bool = False) -> Any:
    """Same dispatch as lmcache 0.5.3 models/utils.py:14."""
    name = type(vllm_model).__name__
    if name in ("LlamaForCausalLM", "Qwen2ForCausalLM"):
        return LMCLlamaModel(vllm_model, blender, enable_sparse)
    if name == "Qwen3ForCausalLM":
        return LMCQwen3Model(vllm_model, blender, enable_sparse)
    raise NotImplementedError(f"Model type {name} is not supported in LMCache.")


def _model_class(name: str, llama4_scaling: bool = False) -> type:
    def __init__(self: Any) -> None:
        attn = types.SimpleNamespace(do_llama_4_scaling=llama4_scaling)
        self.model = types.SimpleNamespace(layers=[types.SimpleNamespace(self_attn=attn)])

    return type(name, (), {"__init__": __init__})


class FakeRunner:
    def __init__(self) -> None:
        self.model = _model_class("MistralForCausalLM")()

    def get_model(self) -> Any:
        return self.model


class FakeWorker:
    """Mimics vllm.v1.worker.gpu_worker.Worker (load_model is keyword-only in 0.22.0)."""

    def __init__(self) -> None:
        self.model_runner = FakeRunner()
        self.loaded = 0

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        self.loaded += 1

    def execute_model(self, scheduler_output: Any) -> str:
        return "output"


class BuggySegmentTokenDatabase:
    """lmcache 0.5.3 token_database.py:470 on plain lists, bug included (no return after the yield)."""

    def __init__(self, sep: list[int]) -> None:
        self.sep_tokens = list(sep)
        self.sep_len = len(sep)

    def _fast_split_by_subtensor(self, tokens: list[int]) -> Iterator[list[int]]:
        if self.sep_len == 0 or len(tokens) < self.sep_len:
            yield tokens
        windows = [tokens[i:i + self.sep_len] for i in range(len(tokens) - self.sep_len + 1)]
        matches = [i for i, window in enumerate(windows) if window == self.sep_tokens]
        start = 0
        for idx in matches:
            yield tokens[start:idx]
            start = idx + self.sep_len
        yield tokens[start:]


class FakeTensor:
    """Enough of a tensor for FusedRope: a device and a counted .to()."""

    copies = 0

    def __init__(self, device: str) -> None:
        self.device = device

    def to(self, device: str) -> FakeTensor:
        if device == self.device:
            return self
        FakeTensor.copies += 1
        return FakeTensor(device)


class FakeFusedRope:
    """lmcache 0.5.3 positional_encoding.py:53 with the kernel call replaced by a record."""

    def __init__(self) -> None:
        self.cos_sin_cache = FakeTensor("cpu")
        self.kernel_caches: list[FakeTensor] = []

    def fused_encode(self, old_positions: Any, new_positions: Any, k: FakeTensor) -> FakeTensor:
        self.kernel_caches.append(self.cos_sin_cache.to(k.device))
        return k


class Fakes(types.SimpleNamespace):
    pass


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Fakes:
    """Fake vllm/lmcache modules at the exact paths the plugin patches (fresh classes per test)."""
    FakeTracker._vllm_models = {}
    FakeTracker.calls = []
    FakeTensor.copies = 0
    worker_cls = type("Worker", (FakeWorker,), {})
    db_cls = type("SegmentTokenDatabase", (BuggySegmentTokenDatabase,), {})
    rope_cls = type("FusedRope", (FakeFusedRope,), {})
    for pkg in ("vllm", "vllm.v1", "vllm.v1.worker", "lmcache", "lmcache.integration",
                "lmcache.integration.vllm", "lmcache.v1", "lmcache.v1.compute", "lmcache.v1.compute.models",
                "lmcache.v1.compute.blend"):
        fake_module(monkeypatch, pkg)
    ns = Fakes(
        worker=fake_module(monkeypatch, "vllm.v1.worker.gpu_worker", Worker=worker_cls),
        utils=fake_module(monkeypatch, "lmcache.integration.vllm.utils", ENGINE_NAME=ENGINE_NAME),
        models=fake_module(monkeypatch, "lmcache.v1.compute.models.utils", VLLMModelTracker=FakeTracker,
                       infer_model_from_vllm=fake_infer_model_from_vllm),
        llama=fake_module(monkeypatch, "lmcache.v1.compute.models.llama", LMCLlamaModel=LMCLlamaModel),
        blender=fake_module(monkeypatch, "lmcache.v1.compute.blend.blender",
                        infer_model_from_vllm=fake_infer_model_from_vllm),
        token_db=fake_module(monkeypatch, "lmcache.v1.token_database", SegmentTokenDatabase=db_cls),
        rope=fake_module(monkeypatch, "lmcache.v1.compute.positional_encoding", FusedRope=rope_cls),
    )
    ns.Worker, ns.SegmentTokenDatabase, ns.FusedRope = worker_cls, db_cls, rope_cls
    return ns


@pytest.fixture(autouse=True)
def clean_plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fresh plugin state, env and logger filters for every test; drop modules a test imported."""
    for var in (vp.ENV_ENABLE, vp.ENV_FIXES, vp.ENV_PROFILE):
        monkeypatch.delenv(var, raising=False)
    vp._reset_for_tests()
    before = set(sys.modules)
    unpin_logger = logging.getLogger(quiet.DOUBLE_UNPIN_LOGGER)
    filters = list(unpin_logger.filters)
    yield
    vp._reset_for_tests()
    unpin_logger.filters[:] = filters
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("lmcache", "vllm"):
            del sys.modules[name]


def _enable(monkeypatch: pytest.MonkeyPatch, fixes: str | None = None) -> None:
    monkeypatch.setenv(vp.ENV_ENABLE, "1")
    if fixes is not None:
        monkeypatch.setenv(vp.ENV_FIXES, fixes)


def reference_split(tokens: list[int], sep: list[int]) -> list[list[int]]:
    """What the split must yield: LMCache's windows semantics, one segment for a too-short list."""
    if not sep or len(tokens) < len(sep):
        return [tokens]
    out, start = [], 0
    for i in range(len(tokens) - len(sep) + 1):
        if tokens[i:i + len(sep)] == sep:
            out.append(tokens[start:i])
            start = i + len(sep)
    out.append(tokens[start:])
    return out


# --------------------------------------------------------------------------------------------------
# Switches
# --------------------------------------------------------------------------------------------------


def test_nothing_happens_without_env(fakes: Fakes) -> None:
    original_load = fakes.Worker.load_model
    original_split = fakes.SegmentTokenDatabase._fast_split_by_subtensor
    finders = list(sys.meta_path)

    vp.register()

    assert fakes.Worker.load_model is original_load
    assert fakes.models.infer_model_from_vllm is fake_infer_model_from_vllm
    assert fakes.blender.infer_model_from_vllm is fake_infer_model_from_vllm
    assert fakes.SegmentTokenDatabase._fast_split_by_subtensor is original_split
    assert sys.meta_path == finders
    fakes.Worker().load_model()
    assert FakeTracker.calls == []


def test_env_other_than_1_is_off(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vp.ENV_ENABLE, "0")
    vp.register()
    assert not hooks.already(fakes.Worker.load_model, "register")


def test_missing_lmcache_does_not_crash(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "lmcache", None)  # "not importable"
    _enable(monkeypatch)
    finders = list(sys.meta_path)
    with caplog.at_level(logging.INFO, logger=vp.logger.name):
        vp.register()
        vp.register()
    assert sys.meta_path == finders
    lines = [r.getMessage() for r in caplog.records if "lmcache is not importable" in r.getMessage()]
    assert len(lines) == 1


@pytest.mark.parametrize(("value", "expected"), [
    (None, set(vp.ALL_FIXES)),
    ("", set(vp.ALL_FIXES)),
    ("all", set(vp.ALL_FIXES)),
    ("none", set()),
    ("register,split", {"register", "split"}),
    ("all,-sync,-quiet", set(vp.ALL_FIXES) - {"sync", "quiet"}),
    (" Rope , bogus ", {"rope"}),
])
def test_parse_fixes(value: str | None, expected: set[str]) -> None:
    assert vp.parse_fixes(value) == expected


# --------------------------------------------------------------------------------------------------
# Fix 1: model registration
# --------------------------------------------------------------------------------------------------


def test_load_model_registers_model_under_engine_name(fakes: Fakes, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    _enable(monkeypatch)
    with caplog.at_level(logging.INFO, logger=vp.logger.name):
        vp.register()
    assert any("applied register" in r.getMessage() for r in caplog.records)

    worker = fakes.Worker()
    assert worker.load_model(load_dummy_weights=True) is None
    assert worker.loaded == 1
    assert FakeTracker.calls == [(ENGINE_NAME, worker.model_runner.get_model())]
    assert FakeTracker.get_model(ENGINE_NAME) is worker.model_runner.model


def test_register_is_idempotent(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    _enable(monkeypatch)
    original = fakes.Worker.load_model
    vp.register()
    vp.register()
    vp._reset_for_tests()  # as if the plugin module had been imported afresh
    vp.register()
    vp.register()

    assert fakes.Worker.load_model.__wrapped__ is original
    assert fakes.models.infer_model_from_vllm.__wrapped__ is fake_infer_model_from_vllm
    assert fakes.SegmentTokenDatabase._fast_split_by_subtensor.__wrapped__ is (
        BuggySegmentTokenDatabase._fast_split_by_subtensor)
    worker = fakes.Worker()
    worker.load_model()
    assert worker.loaded == 1
    assert len(FakeTracker.calls) == 1
    assert len(logging.getLogger(quiet.DOUBLE_UNPIN_LOGGER).filters) == 1


def test_fix_selection(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    _enable(monkeypatch, "all,-mistral,-rope")
    vp.register()
    assert hooks.already(fakes.Worker.load_model, "register")
    assert hooks.already(fakes.SegmentTokenDatabase._fast_split_by_subtensor, "split")
    assert fakes.models.infer_model_from_vllm is fake_infer_model_from_vllm
    assert not hooks.already(fakes.FusedRope.fused_encode, "rope")


def test_missing_target_warns(fakes: Fakes, monkeypatch: pytest.MonkeyPatch,
                              caplog: pytest.LogCaptureFixture) -> None:
    fakes.worker.Worker = type("Worker", (), {})  # a vLLM whose Worker has no load_model
    _enable(monkeypatch, "register")
    with caplog.at_level(logging.INFO, logger=vp.logger.name):
        vp.register()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Worker.load_model not found" in r.getMessage() for r in warnings)


# --------------------------------------------------------------------------------------------------
# Fix 2: Mistral -> Llama
# --------------------------------------------------------------------------------------------------


def test_mistral_maps_to_llama_in_both_modules(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    mistral = _model_class("MistralForCausalLM")()
    with pytest.raises(NotImplementedError):
        fakes.blender.infer_model_from_vllm(mistral, "blender")

    _enable(monkeypatch)
    vp.register()

    for module in (fakes.models, fakes.blender):
        result = module.infer_model_from_vllm(mistral, "blender", True)
        assert type(result) is LMCLlamaModel
        assert (result.vllm_model, result.blender, result.enable_sparse) == (mistral, "blender", True)


def test_other_models_keep_their_behaviour(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    _enable(monkeypatch)
    vp.register()
    infer = fakes.blender.infer_model_from_vllm
    assert type(infer(_model_class("LlamaForCausalLM")(), None)) is LMCLlamaModel
    assert type(infer(_model_class("Qwen3ForCausalLM")(), None)) is LMCQwen3Model
    with pytest.raises(NotImplementedError):
        infer(_model_class("GemmaForCausalLM")(), None)
    with pytest.raises(NotImplementedError):  # Llama-4 attention scaling is not in LMCLlamaModel
        infer(_model_class("MistralForCausalLM", llama4_scaling=True)(), None)


# --------------------------------------------------------------------------------------------------
# Fix 3: split returns after its early yield
# --------------------------------------------------------------------------------------------------


SPLIT_CASES = [
    [1],                                                    # [BOS] only: shorter than SEP
    [],
    [1, 938],
    [938, 938, 223],                                        # exactly SEP
    [1, 5, 6],                                              # as long as SEP, no match
    [1, 5, 938, 938, 223, 7, 8, 938, 938, 223, 9],
    [1, 938, 938, 223, 7, 938, 938, 223],                   # trailing SEP -> empty last segment
    [1, 938, 938, 938, 223, 4],                             # partial match before the real one
    list(range(100, 400)) + SEP + list(range(5, 50)) + SEP + [77],
]


def test_buggy_original_really_is_buggy() -> None:
    db = BuggySegmentTokenDatabase(SEP)
    assert list(db._fast_split_by_subtensor([1])) == [[1], [1]]  # the extra segment the fix removes


@pytest.mark.parametrize("tokens", SPLIT_CASES)
def test_split_fix_yields_exact_segments(fakes: Fakes, monkeypatch: pytest.MonkeyPatch,
                                         tokens: list[int]) -> None:
    _enable(monkeypatch)
    vp.register()
    db = fakes.SegmentTokenDatabase(SEP)
    assert list(db._fast_split_by_subtensor(tokens)) == reference_split(tokens, SEP)


def test_split_known_segments(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    _enable(monkeypatch)
    vp.register()
    split = fakes.SegmentTokenDatabase(SEP)._fast_split_by_subtensor
    assert list(split([1])) == [[1]]
    assert list(split([1, 5, 938, 938, 223, 7, 8, 938, 938, 223, 9])) == [[1, 5], [7, 8], [9]]
    assert list(split([1, 938, 938, 223, 4, 4])) == [[1], [4, 4]]
    # overlapping windows behave as LMCache's unfold match: both starts count
    overlapping = fakes.SegmentTokenDatabase([9, 9])._fast_split_by_subtensor
    assert list(overlapping([1, 9, 9, 9, 2])) == [[1], [], [2]]
    assert list(fakes.SegmentTokenDatabase([])._fast_split_by_subtensor([1, 2])) == [[1, 2]]


def test_find_separator_starts() -> None:
    assert split.find_separator_starts([1, 9, 9, 9, 2], [9, 9]) == [1, 2]
    assert split.find_separator_starts([1, 2], [1, 2, 3]) == []
    assert split.find_separator_starts([1, 2], []) == []


def test_split_tensor_path_matches_list_path() -> None:
    torch = pytest.importorskip("torch")
    db = types.SimpleNamespace(sep_tokens=torch.tensor(SEP), sep_len=len(SEP))
    for tokens in SPLIT_CASES:
        got = [t.tolist() for t in split.fast_split_by_subtensor(db, torch.tensor(tokens, dtype=torch.long))]
        assert got == reference_split(tokens, SEP)


# --------------------------------------------------------------------------------------------------
# Speed fixes
# --------------------------------------------------------------------------------------------------


def test_rope_cache_moves_to_device_once(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    rope = fakes.FusedRope()
    k = FakeTensor("cuda:0")
    rope.fused_encode(None, None, k)
    rope.fused_encode(None, None, k)
    assert FakeTensor.copies == 2  # the original copies on every call

    _enable(monkeypatch)
    vp.register()
    FakeTensor.copies = 0
    rope = fakes.FusedRope()
    for _ in range(32):
        assert rope.fused_encode(None, None, k) is k
    assert FakeTensor.copies == 1
    assert {c.device for c in rope.kernel_caches} == {"cuda:0"}
    assert rope.cos_sin_cache.device == "cuda:0"


def _register_warns_of_version(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, version: str,
                               fix: str) -> bool:
    """Register only ``fix`` with LMCache reporting ``version``; whether the plugin warned about that fix."""
    monkeypatch.setattr(hooks, "lmcache_version", lambda: version)
    _enable(monkeypatch, fix)
    with caplog.at_level(logging.INFO, logger=vp.logger.name):
        vp.register()
    return any(r.levelno == logging.WARNING and f"'{fix}'" in r.getMessage() for r in caplog.records)


def test_sync_fix_needs_the_copied_lmcache_version(fakes: Fakes, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    def batched_to_gpu(self: Any, starts: list[int], ends: list[int], **kwargs: Any) -> Iterator[None]:
        yield

    connector = type("VLLMBufferLayerwiseGPUConnector", (), {"batched_to_gpu": batched_to_gpu})
    module = fake_module(monkeypatch, "lmcache.v1.gpu_connector.gpu_connectors",
                     VLLMBufferLayerwiseGPUConnector=connector, torch=object(), lmc_ops=object(),
                     MemoryFormat=object(), LMCBlenderBuilder=object(), logger=logging.getLogger("x"))
    fake_module(monkeypatch, "lmcache.v1.gpu_connector")

    assert _register_warns_of_version(monkeypatch, caplog, "0.5.6", "sync")
    assert connector.batched_to_gpu is batched_to_gpu

    vp._reset_for_tests()
    monkeypatch.setattr(hooks, "lmcache_version", lambda: "0.5.3")
    vp.register()
    assert getattr(connector.batched_to_gpu, hooks.MARK) == "sync"
    assert connector.batched_to_gpu.__wrapped__ is batched_to_gpu
    assert module.VLLMBufferLayerwiseGPUConnector is connector


def _lmcache_style_logger(name: str, stream: list[str]) -> logging.Logger:
    """What lmcache.logging.init_logger does at import: own handler, no propagation, explicit level."""
    lg = logging.getLogger(name)
    lg.handlers.clear()
    lg.propagate = False

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            stream.append(record.getMessage())

    lg.addHandler(ListHandler(logging.INFO))
    lg.setLevel(logging.INFO)
    return lg


def test_double_unpin_warnings_are_quieted(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    _enable(monkeypatch)
    vp.register()  # before LMCache's memory_management is imported, as in a vLLM process
    written: list[str] = []
    lg = _lmcache_style_logger(quiet.DOUBLE_UNPIN_LOGGER, written)  # the module's import runs init_logger
    for addr in range(288):
        lg.warning(f"Pin count of MemoryObj {addr}is negative: -1.Double unpin occurred somewhere."
                   "Setting pin count back to 0 as a hack but please find the bug.")
    lg.warning("Some other warning")

    assert len(written) == 2
    assert "Double unpin occurred" in written[0] and "kvdemo plugin" in written[0]
    assert written[1] == "Some other warning"
    unpin_filter = quiet.current_filter()
    assert unpin_filter is not None and unpin_filter.suppressed == 287


def test_quiet_fix_off_keeps_warnings(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    _enable(monkeypatch, "all,-quiet")
    vp.register()
    written: list[str] = []
    lg = _lmcache_style_logger(quiet.DOUBLE_UNPIN_LOGGER, written)
    for _ in range(3):
        lg.warning("x Double unpin occurred somewhere.")
    assert len(written) == 3


# --------------------------------------------------------------------------------------------------
# Post-import hook: patches applied when LMCache is imported after register()
# --------------------------------------------------------------------------------------------------


def _write_fake_lmcache(root: Path) -> None:
    files = {
        "lmcache/__init__.py": "",
        "lmcache/v1/__init__.py": "",
        "lmcache/v1/token_database.py": """
            class SegmentTokenDatabase:
                def __init__(self, sep):
                    self.sep_tokens = list(sep)
                    self.sep_len = len(sep)

                def _fast_split_by_subtensor(self, tokens):
                    if self.sep_len == 0 or len(tokens) < self.sep_len:
                        yield tokens
                    yield "bug"
        """,
        "lmcache/v1/compute/__init__.py": "",
        "lmcache/v1/compute/models/__init__.py": "",
        "lmcache/v1/compute/models/utils.py": """
            def infer_model_from_vllm(vllm_model, blender, enable_sparse=False):
                raise NotImplementedError(type(vllm_model).__name__)
        """,
        "lmcache/v1/compute/models/llama.py": """
            class LMCLlamaModel:
                def __init__(self, vllm_model, blender, enable_sparse=False):
                    self.vllm_model = vllm_model
        """,
        "lmcache/v1/compute/blend/__init__.py": "",
        "lmcache/v1/compute/blend/blender.py": """
            from lmcache.v1.compute.models.utils import infer_model_from_vllm
        """,
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_patches_apply_on_later_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_fake_lmcache(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n == "lmcache" or n.startswith("lmcache.")]:
        monkeypatch.delitem(sys.modules, name)
    _enable(monkeypatch, "mistral,split")

    vp.register()
    assert "lmcache.v1.token_database" not in sys.modules  # nothing imported eagerly

    from lmcache.v1.compute.blend import blender  # type: ignore[import-not-found]
    from lmcache.v1.compute.models import utils  # type: ignore[import-not-found]
    from lmcache.v1.token_database import SegmentTokenDatabase  # type: ignore[import-not-found]

    assert list(SegmentTokenDatabase(SEP)._fast_split_by_subtensor([1])) == [[1]]
    mistral = _model_class("MistralForCausalLM")()
    assert type(blender.infer_model_from_vllm(mistral, None)).__name__ == "LMCLlamaModel"
    assert type(utils.infer_model_from_vllm(mistral, None)).__name__ == "LMCLlamaModel"
    assert blender.__spec__.loader is sys.modules["lmcache.v1.compute.blend.blender"].__loader__


def test_renamed_module_warns_at_register(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "lmcache").mkdir()
    (tmp_path / "lmcache" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n == "lmcache" or n.startswith("lmcache.")]:
        monkeypatch.delitem(sys.modules, name)
    _enable(monkeypatch, "split")
    with caplog.at_level(logging.INFO, logger=vp.logger.name):
        vp.register()
    assert any(r.levelno == logging.WARNING and "lmcache.v1.token_database not found" in r.getMessage()
               for r in caplog.records)


# --------------------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------------------


def test_profile_off_leaves_execute_model(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    _enable(monkeypatch)
    original = fakes.Worker.execute_model
    vp.register()
    assert fakes.Worker.execute_model is original


def test_profile_logs_one_line_per_lmcache_step(fakes: Fakes, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    class LMCBlender:
        def blend(self, tokens: list[int], mask: Any = None, **kwargs: Any) -> None:
            list(engine.retrieve_layer(tokens))

    class LMCacheEngine:
        def retrieve_layer(self, tokens: list[int]) -> Iterator[int]:
            for layer in range(3):
                got = yield layer
                assert got is None
            return None

    fakes.blender.LMCBlender = LMCBlender
    fake_module(monkeypatch, "lmcache.v1.cache_engine", LMCacheEngine=LMCacheEngine)
    _enable(monkeypatch)
    monkeypatch.setenv(vp.ENV_PROFILE, "1")
    engine = LMCacheEngine()

    def execute_model(self: Any, scheduler_output: Any) -> str:
        if scheduler_output == "prefill":
            LMCBlender().blend(list(range(16125)))
        return "output"

    fakes.Worker.execute_model = execute_model
    vp.register()
    with caplog.at_level(logging.INFO, logger=vp.logger.name):
        worker = fakes.Worker()
        assert worker.execute_model("prefill") == "output"
        assert worker.execute_model("decode") == "output"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kvdemo-profile:")]
    assert len(lines) == 1
    assert "step=" in lines[0] and "blend=" in lines[0] and "retrieve=" in lines[0]
    assert "blend_tokens=16125" in lines[0]


# --------------------------------------------------------------------------------------------------
# Fix 'kernels': vLLM's CUDA kernels inside the eager blend only
# --------------------------------------------------------------------------------------------------


class FakeIrOp:
    """Mimics vllm.ir.op.IrOp's scoped override (set_priority is a context manager)."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log, self.priority = name, log, ["native"]

    @contextmanager
    def set_priority(self, priority: list[str]) -> Iterator[None]:
        old, self.priority = self.priority, list(priority)
        try:
            yield
        finally:
            self.priority = old


class FakeSiluAndMul:
    """Like a vLLM CustomOp under torch.compile: dispatches to forward_native unless told otherwise."""

    name = "silu_and_mul"

    def __init__(self) -> None:
        self._forward_method = self.forward_native

    def forward(self, x: Any) -> str:
        return self._forward_method(x)

    def forward_native(self, x: Any) -> str:
        return "native"

    def forward_cuda(self, x: Any) -> str:
        return "cuda"


class FakeRotaryEmbedding(FakeSiluAndMul):
    name = "rotary_embedding"


class FakeOtherOp(FakeSiluAndMul):
    name = "quant_fp8"  # not one the blender needs: left alone


def test_blend_runs_vllm_cuda_kernels_and_restores_them(monkeypatch: pytest.MonkeyPatch) -> None:
    ir_ops = {name: FakeIrOp(name, []) for name in kernels.BLEND_IR_OPS}
    fake_module(monkeypatch, "vllm", ir=types.SimpleNamespace(ops=types.SimpleNamespace(**ir_ops)))
    act, rope, other = FakeSiluAndMul(), FakeRotaryEmbedding(), FakeOtherOp()
    already = FakeRotaryEmbedding()
    already._forward_method = already.forward_cuda
    model = types.SimpleNamespace(modules=lambda: iter([object(), act, rope, other, already]))
    seen: list[dict] = []

    class LMCBlender:
        layerwise_model = types.SimpleNamespace(vllm_model=model)

        def blend(self, tokens: Any, fail: bool = False) -> str:
            seen.append({"ir": {n: op.priority for n, op in ir_ops.items()},
                         "ops": [m.forward(None) for m in (act, rope, other, already)]})
            if fail:
                raise RuntimeError("engine error")
            return "blended"

    module = types.SimpleNamespace(__name__=targets.MOD_BLENDER, LMCBlender=LMCBlender)
    kernels.patch_blend_kernels(module)
    kernels.patch_blend_kernels(module)  # idempotent
    blender = LMCBlender()
    assert blender.blend([1, 2]) == "blended"
    assert seen[0] == {"ir": {n: ["vllm_c", "native"] for n in kernels.BLEND_IR_OPS},
                       "ops": ["cuda", "cuda", "native", "cuda"]}
    after = {"ir": {n: op.priority for n, op in ir_ops.items()},
             "ops": [m.forward(None) for m in (act, rope, other, already)]}
    assert after == {"ir": {n: ["native"] for n in kernels.BLEND_IR_OPS}, "ops": ["native", "native", "native", "cuda"]}
    with pytest.raises(RuntimeError):
        blender.blend([1], fail=True)
    assert seen[1] == seen[0]
    assert [m.forward(None) for m in (act, rope)] == ["native", "native"]  # restored after an error too


def test_blend_kernels_without_vllm_ir_still_blends(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    fake_module(monkeypatch, "vllm")  # a vLLM without vllm.ir
    act = FakeSiluAndMul()

    class LMCBlender:
        layerwise_model = types.SimpleNamespace(vllm_model=types.SimpleNamespace(modules=lambda: iter([act])))

        def blend(self, tokens: Any) -> str:
            return act.forward(None)

    kernels.patch_blend_kernels(types.SimpleNamespace(__name__=targets.MOD_BLENDER, LMCBlender=LMCBlender))
    with caplog.at_level(logging.WARNING, logger=vp.logger.name):
        assert LMCBlender().blend([1]) == "cuda"
    assert act.forward(None) == "native"


# --------------------------------------------------------------------------------------------------
# Fix 'tokens': token-id lists become tensors through one NumPy buffer
# --------------------------------------------------------------------------------------------------


class FakeTorchTensor:
    """What the fake torch.from_numpy returns: the array's values, dtype, and the devices it went to."""

    def __init__(self, array: Any, device: str = "cpu") -> None:
        self.array, self.dtype, self.device = array, array.dtype, device

    def to(self, device: str) -> FakeTorchTensor:
        return FakeTorchTensor(self.array, device)

    def tolist(self) -> list[int]:
        return self.array.tolist()


@pytest.fixture
def fake_torch(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    pytest.importorskip("numpy")
    return fake_module(monkeypatch, "torch", from_numpy=FakeTorchTensor)


@pytest.mark.parametrize("tokens", [[1, 938, 938, 223, 31999], [], list(range(24_000)), (5, 6)])
def test_token_id_tensor_keeps_values_as_int64(fake_torch: types.ModuleType, tokens: Any) -> None:
    import numpy as np

    tensor = token_fix.token_id_tensor(tokens)
    assert tensor.tolist() == list(tokens)
    assert tensor.dtype == np.int64


def test_process_tokens_gets_a_tensor_for_a_list(fake_torch: types.ModuleType, fakes: Fakes,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[Any] = []

    def process_tokens(self: Any, tokens: Any = None, hashes: Any = None, mask: Any = None) -> Iterator[Any]:
        received.append(tokens)
        yield from ()

    fakes.SegmentTokenDatabase.process_tokens = process_tokens
    _enable(monkeypatch, "tokens")
    vp.register()
    db = fakes.SegmentTokenDatabase(SEP)
    list(db.process_tokens([7, 8, 9]))
    list(db.process_tokens(tokens=[4, 5], mask=None))
    already = FakeTorchTensor(__import__("numpy").array([1, 2]))
    list(db.process_tokens(already))
    list(db.process_tokens(hashes=[11], tokens=None))
    assert [type(t).__name__ for t in received] == ["FakeTorchTensor", "FakeTorchTensor", "FakeTorchTensor",
                                                    "NoneType"]
    assert received[0].tolist() == [7, 8, 9] and received[1].tolist() == [4, 5]
    assert received[2] is already  # a tensor is passed through untouched


def test_blend_gets_its_tokens_on_the_device(fake_torch: types.ModuleType) -> None:
    received: list[Any] = []

    class LMCBlender:
        def blend(self, tokens: Any, mask: Any = None, **kwargs: Any) -> str:
            received.append((tokens, mask, kwargs))
            return "blended"

    module = types.SimpleNamespace(__name__=targets.MOD_BLENDER, LMCBlender=LMCBlender, torch_device_type="cuda")
    token_fix.patch_blend_tokens(module)
    token_fix.patch_blend_tokens(module)  # idempotent
    assert LMCBlender().blend([3, 4, 5], "mask", slot_mapping="slots") == "blended"
    tokens, mask, kwargs = received[0]
    assert (tokens.tolist(), tokens.device, mask, kwargs) == ([3, 4, 5], "cuda", "mask", {"slot_mapping": "slots"})
    already = FakeTorchTensor(__import__("numpy").array([1]), "cuda")
    LMCBlender().blend(already)
    assert received[1][0] is already


# --------------------------------------------------------------------------------------------------
# Fix 'lookup': the scheduler asks the LMCache engine of its own process directly
# --------------------------------------------------------------------------------------------------


class FakeLookupEngine:
    def __init__(self, hit: int = 15_872, fail: bool = False) -> None:
        self.hit, self.fail, self.calls = hit, fail, []

    def lookup(self, **kwargs: Any) -> int:
        self.calls.append(kwargs)
        if self.fail:
            raise RuntimeError("storage backend gone")
        return self.hit


class FakeEngineBuilder:
    instances: ClassVar[dict[str, Any]] = {}

    @classmethod
    def get(cls, name: str) -> Any:
        return cls.instances.get(name)


class FakeChunkDb:
    def process_tokens(self, tokens: Any, make_key: bool = True) -> Iterator[tuple[int, int, int]]:
        assert make_key is False
        for start in range(0, len(tokens), 256):
            yield start, min(start + 256, len(tokens)), hash(tuple(tokens[start:start + 256]))


def _lookup_client_cls() -> type:
    class LMCacheLookupClient:
        def __init__(self, enable_blending: bool = True, world_size: int = 1) -> None:
            self.enable_blending = enable_blending
            self.transport = types.SimpleNamespace(world_size=world_size)
            self.token_database = FakeChunkDb()
            self.reqs_status: dict[str, int] = {}
            self.zmq_calls: list[tuple] = []

        def lookup(self, token_ids: Any, lookup_id: str, request_configs: dict | None = None) -> int:
            self.zmq_calls.append((list(token_ids), lookup_id, request_configs))
            self.reqs_status[lookup_id] = 7
            return 7

    return LMCacheLookupClient


@pytest.fixture
def lookup_fakes(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    FakeEngineBuilder.instances = {}
    for pkg in ("lmcache", "lmcache.integration", "lmcache.integration.vllm", "lmcache.v1",
                "lmcache.v1.lookup_client"):
        fake_module(monkeypatch, pkg)
    fake_module(monkeypatch, targets.MOD_LMC_VLLM_UTILS, ENGINE_NAME=ENGINE_NAME)
    fake_module(monkeypatch, targets.MOD_CACHE_ENGINE, LMCacheEngineBuilder=FakeEngineBuilder)
    cls = _lookup_client_cls()
    fake_module(monkeypatch, targets.MOD_LOOKUP_CLIENT, LMCacheLookupClient=cls)
    _enable(monkeypatch, "lookup")
    vp.register()
    return types.SimpleNamespace(cls=cls)


def test_lookup_calls_the_engine_of_this_process(lookup_fakes: types.SimpleNamespace,
                                                caplog: pytest.LogCaptureFixture) -> None:
    engine = FakeEngineBuilder.instances[ENGINE_NAME] = FakeLookupEngine()
    client = lookup_fakes.cls()
    with caplog.at_level(logging.INFO, logger=vp.logger.name):
        assert client.lookup((1, 2, 3), "req-1", {"lmcache.skip_save": True}) == 15_872
    assert engine.calls == [{"tokens": [1, 2, 3], "lookup_id": "req-1", "pin": True,
                             "request_configs": {"lmcache.skip_save": True}}]
    assert client.reqs_status == {"req-1": 15_872}  # lookup_cache() answers from it, as after a ZMQ lookup
    assert client.zmq_calls == []
    with caplog.at_level(logging.INFO, logger=vp.logger.name):
        client.lookup([4], "req-2", {})
    assert engine.calls[1]["request_configs"] is None  # the server decodes "no configs" to None
    said = [r.getMessage() for r in caplog.records if "LMCache lookups go" in r.getMessage()]
    assert said == ["kvdemo plugin: LMCache lookups go in this process (no ZMQ round trip)"]  # once, not per request


def test_lookup_without_blending_sends_chunk_hashes(lookup_fakes: types.SimpleNamespace) -> None:
    engine = FakeEngineBuilder.instances[ENGINE_NAME] = FakeLookupEngine(hit=512)
    client = lookup_fakes.cls(enable_blending=False)
    tokens = list(range(600))
    assert client.lookup(tokens, "req-1") == 512
    (call,) = engine.calls
    assert call["offsets"] == [256, 256, 88] and len(call["hashes"]) == 3 and call["pin"] is True
    assert "tokens" not in call
    assert client.lookup([], "req-2") == 0 and len(engine.calls) == 1


@pytest.mark.parametrize("case", ["no engine here", "two workers", "engine fails"])
def test_lookup_falls_back_to_the_lookup_server(lookup_fakes: types.SimpleNamespace, case: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    if case != "no engine here":
        FakeEngineBuilder.instances[ENGINE_NAME] = FakeLookupEngine(fail=case == "engine fails")
    client = lookup_fakes.cls(world_size=2 if case == "two workers" else 1)
    with caplog.at_level(logging.WARNING, logger=vp.logger.name):
        assert client.lookup([1, 2], "req-1") == 7
    assert client.zmq_calls == [([1, 2], "req-1", None)]
    assert client.reqs_status == {"req-1": 7}
    warned = [r.getMessage() for r in caplog.records if "direct lookup failed" in r.getMessage()]
    assert len(warned) == (1 if case == "engine fails" else 0)


def test_lookup_says_once_that_it_uses_the_lookup_server(lookup_fakes: types.SimpleNamespace,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    client = lookup_fakes.cls(world_size=2)
    with caplog.at_level(logging.INFO, logger=vp.logger.name):
        client.lookup([1], "req-1")
        client.lookup([2], "req-2")
    said = [r.getMessage() for r in caplog.records if "LMCache lookups go" in r.getMessage()]
    assert len(said) == 1 and "through LMCache's lookup server" in said[0]


# --------------------------------------------------------------------------------------------------
# Fix 'pipeline': LMCacheEngine.retrieve copies groups of chunks while the next ones are read
# --------------------------------------------------------------------------------------------------


class FakeMemObj:
    def __init__(self, key: str) -> None:
        self.key, self.is_pinned, self.unpins, self.refs_down = key, True, 0, 0

    def get_size(self) -> int:
        return 1000

    def unpin(self) -> None:
        self.unpins += 1
        self.is_pinned = False

    def ref_count_down(self) -> None:
        self.refs_down += 1


class FakeStorageManager:
    def __init__(self, missing: set[str] = frozenset()) -> None:
        self.missing, self.gets, self.objs, self.mapping_calls = missing, [], [], 0
        self.lock = threading.Lock()

    def batched_get(self, keys: list[str], location: str) -> list[FakeMemObj | None]:
        objs = [None if k in self.missing else FakeMemObj(k) for k in keys]
        with self.lock:
            self.gets.append((location, list(keys)))
            self.objs += [o for o in objs if o is not None]
        return objs

    def get_block_mapping(self, chunk_infos: list) -> dict:
        self.mapping_calls += 1
        return {"LocalCPUBackend": chunk_infos[:2], "RemoteBackend": chunk_infos[2:]}


class FakeChunkConnector:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[int], list[int], dict]] = []

    def batched_to_gpu(self, memory_objs: list, starts: list[int], ends: list[int], **kwargs: Any) -> None:
        self.calls.append(([o.key for o in memory_objs], starts, ends, kwargs))


class FakeRetrieveStats:
    process_tokens_time = 0.0
    to_gpu_time = 0.0


class FakeStatsMonitor:
    def __init__(self) -> None:
        self.requests: list[int] = []
        self.finished: list[tuple[FakeRetrieveStats, int]] = []

    def on_retrieve_request(self, num_tokens: int) -> FakeRetrieveStats:
        self.requests.append(num_tokens)
        return FakeRetrieveStats()

    def on_retrieve_finished(self, stats: FakeRetrieveStats, retrieved: Any) -> None:
        self.finished.append((stats, int(retrieved)))


class FakeKeyDb:
    def process_tokens(self, tokens: Any, mask: Any = None, request_configs: Any = None) -> Iterator[tuple]:
        first = 0 if mask is None else int(len(mask) - mask.sum())
        for start in range(first, len(tokens), 256):
            yield start, min(start + 256, len(tokens)), f"c{start // 256}"


def _cache_engine_cls() -> type:
    class LMCacheEngine:
        def __init__(self, **flags: Any) -> None:
            self.gpu_connector, self.storage_manager = FakeChunkConnector(), FakeStorageManager()
            self.token_database, self.stats_monitor = FakeKeyDb(), FakeStatsMonitor()
            self.lookup_pins: dict[str, dict] = {}
            self.async_loading = self.save_only_first_rank = self.remove_after_retrieve = False
            self.use_layerwise = False
            self.healthy = True
            self.original_calls = 0
            self.__dict__.update(flags)

        def is_healthy(self) -> bool:
            return self.healthy

        def retrieve(self, tokens: Any, mask: Any = None, **kwargs: Any) -> str:
            self.original_calls += 1
            return "lmcache's own retrieve"

    return LMCacheEngine


@pytest.fixture
def pipeline_engine_cls(monkeypatch: pytest.MonkeyPatch) -> type:
    np = pytest.importorskip("numpy")
    fake_module(monkeypatch, "torch", zeros=lambda n, dtype=None, device=None: np.zeros(n, dtype=dtype),
            bool=bool, sum=lambda a: np.int64(a.sum()), inference_mode=contextlib.nullcontext)
    for pkg in ("lmcache", "lmcache.v1"):
        fake_module(monkeypatch, pkg)
    cls = _cache_engine_cls()
    fake_module(monkeypatch, targets.MOD_CACHE_ENGINE, LMCacheEngine=cls)
    monkeypatch.setattr(hooks, "lmcache_version", lambda: "0.5.3")
    _enable(monkeypatch, "pipeline")
    vp.register()
    return cls


def test_pipeline_loads_a_pinned_remote_request_in_groups(pipeline_engine_cls: type) -> None:
    import numpy as np

    engine = pipeline_engine_cls()
    engine.lookup_pins["req-1"] = {"RemoteBackend": ["..."]}
    tokens = list(range(20 * 256 + 100))
    kwargs = {"kvcaches": "KV", "slot_mapping": "SLOTS", "vllm_cached_tokens": 0, "req_id": "req-1"}
    mask = engine.retrieve(tokens, None, **kwargs)
    assert isinstance(mask, np.ndarray) and mask.dtype == bool and mask.all()
    sm, conn = engine.storage_manager, engine.gpu_connector
    assert sm.mapping_calls == 0  # the lookup's pins name the location, as in LMCache
    assert [len(keys) for loc, keys in sm.gets] == [8, 8, 5] and {loc for loc, _ in sm.gets} == {"RemoteBackend"}
    assert [c[0] for c in conn.calls] == [[f"c{i}" for i in r] for r in (range(8), range(8, 16), range(16, 21))]
    assert conn.calls[2][1][-1] == 20 * 256 and conn.calls[2][2][-1] == len(tokens)
    assert all(c[3] == kwargs for c in conn.calls)
    assert all(o.unpins == 1 and o.refs_down == 1 for o in sm.objs) and len(sm.objs) == 21
    (stats, retrieved), = engine.stats_monitor.finished
    assert engine.stats_monitor.requests == [len(tokens)] and retrieved == len(tokens)
    assert stats.to_gpu_time > 0 and engine.original_calls == 0


def test_pipeline_keeps_the_readable_prefix_across_locations(pipeline_engine_cls: type) -> None:
    import numpy as np

    engine = pipeline_engine_cls()
    engine.storage_manager.missing = {"c4"}
    tokens = list(range(10 * 256))
    mask = np.zeros(len(tokens), dtype=bool)
    mask[512:] = True  # the first two chunks are in vLLM's prefix cache already
    ret = engine.retrieve(tokens, mask, req_id="req-2")
    assert engine.storage_manager.mapping_calls == 1
    assert engine.stats_monitor.requests == [len(tokens) - 512]
    assert ret[512:1024].all() and not ret[1024:].any() and not ret[:512].any()
    assert [c[0] for c in engine.gpu_connector.calls] == [["c2", "c3"]]
    assert all(o.refs_down == 1 for o in engine.storage_manager.objs)


@pytest.mark.parametrize("flag", ["async_loading", "save_only_first_rank", "remove_after_retrieve", "use_layerwise"])
def test_pipeline_leaves_other_configurations_to_lmcache(pipeline_engine_cls: type, flag: str) -> None:
    engine = pipeline_engine_cls(**{flag: True})
    assert engine.retrieve([1, 2, 3], None, req_id="r") == "lmcache's own retrieve"
    assert engine.storage_manager.gets == [] and engine.original_calls == 1


def test_pipeline_leaves_an_unhealthy_engine_to_lmcache(pipeline_engine_cls: type) -> None:
    engine = pipeline_engine_cls(healthy=False)
    assert engine.retrieve([1, 2, 3]) == "lmcache's own retrieve"


def test_pipeline_needs_the_copied_lmcache_version(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    for pkg in ("lmcache", "lmcache.v1"):
        fake_module(monkeypatch, pkg)
    cls = _cache_engine_cls()
    original = cls.retrieve
    fake_module(monkeypatch, targets.MOD_CACHE_ENGINE, LMCacheEngine=cls)
    assert _register_warns_of_version(monkeypatch, caplog, "0.6.0", "pipeline")
    assert cls.retrieve is original


# --------------------------------------------------------------------------------------------------
# Answer fix: the exact causal mask of the recomputed tokens (kvdemo.blend_mask does the torch part)
# --------------------------------------------------------------------------------------------------


class FakeAttnMetadata:
    """lmcache 0.5.3 LMCFlashAttnMetadata: update_from_top_indices only shrinks the query side."""

    def __init__(self, seq_len: int) -> None:
        self.max_seq_len = seq_len
        self.max_query_len = seq_len

    def update_from_top_indices(self, top_indices: list[int]) -> None:
        self.max_query_len = len(top_indices)


class FakeRows:
    """Just enough of a tensor for the backend wrapper: a row count and copy_."""

    def __init__(self, rows: int, tag: str = "") -> None:
        self.shape = (rows, 2, 4)
        self.tag = tag

    def copy_(self, other: FakeRows) -> FakeRows:
        self.tag = other.tag
        return self


class FakeImpl:
    scale = 0.125
    sliding_window = (-1, -1)
    logits_soft_cap = None
    alibi_slopes = None
    kv_cache_dtype = "auto"


class FakeFlashBackend:
    def __init__(self) -> None:
        self.vllm_attn_impl = FakeImpl()
        self.original_calls = 0

    def forward_contiguous(self, query: Any, key: Any, value: Any, output: Any, attn_metadata: Any,
                           **kwargs: Any) -> Any:
        self.original_calls += 1
        output.tag = "bottom-right"
        return output


@pytest.fixture
def mask_fakes(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> Fakes:
    fake_module(monkeypatch, "lmcache.v1.compute.attention")
    fakes.Metadata = type("LMCFlashAttnMetadata", (FakeAttnMetadata,), {})
    fakes.Backend = type("LMCFlashAttnBackend", (FakeFlashBackend,), {})
    fake_module(monkeypatch, targets.MOD_ATTN_METADATA, LMCFlashAttnMetadata=fakes.Metadata)
    fake_module(monkeypatch, targets.MOD_FLASH_ATTN, LMCFlashAttnBackend=fakes.Backend)
    fakes.built = []
    fakes.exact_calls = []
    fakes.fused_merges = []
    fakes.options = []

    def build(positions: list[int], n_keys: int, split: bool) -> tuple:
        fakes.built.append((list(positions), n_keys))
        return ("plan", tuple(positions), n_keys, split)

    def exact(query: FakeRows, key: FakeRows, value: FakeRows, plan: Any, scale: float, fa: Any,
              fa_version: Any, fused_merge: bool, one_region: bool, skip_guards: bool) -> FakeRows:
        fakes.fused_merges.append(fused_merge)
        fakes.options.append({"fused_merge": fused_merge, "one_region": one_region, "skip_guards": skip_guards})
        fakes.exact_calls.append((plan, scale))
        return FakeRows(query.shape[0], "exact")

    monkeypatch.setattr(mask.blend_mask, "build_plan", build)
    monkeypatch.setattr(mask.blend_mask, "run_plan", exact)
    monkeypatch.setattr(mask.blend_mask, "vllm_flash_attn_varlen", lambda: None)  # no vLLM here
    monkeypatch.setattr(hooks, "lmcache_version", lambda: "0.5.3")
    return fakes


def test_mask_fix_takes_the_exact_path_for_partial_recompute(mask_fakes: Fakes, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    _enable(monkeypatch)
    with caplog.at_level(logging.INFO, logger=vp.logger.name):
        vp.register()
        meta = mask_fakes.Metadata(10)
        meta.update_from_top_indices([1, 4, 7])
        backend = mask_fakes.Backend()
        for _layer in range(3):  # the mask is built once, used by every layer
            out = backend.forward_contiguous(FakeRows(3), FakeRows(10), FakeRows(10), FakeRows(3), meta)
            assert out.tag == "exact"
    assert meta.max_query_len == 3  # the original still ran
    assert mask_fakes.built == [([1, 4, 7], 10)]
    assert mask_fakes.exact_calls == [(("plan", (1, 4, 7), 10, False), 0.125)] * 3
    assert mask_fakes.fused_merges == [True] * 3  # the compiled merge: the op-by-op one syncs the host per layer
    assert backend.original_calls == 0
    assert mask.layer_counts == {"exact": 3, "fallback": 0}
    messages = [r.getMessage() for r in caplog.records]
    assert sum("mask: exact causal attention for 3 recomputed of 10" in m for m in messages) == 1


def test_mask_variant_eager_selects_the_op_by_op_merge(mask_fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> None:
    """KVDEMO_MASK_VARIANT=eager reproduces the merge as it was before the fused default (for A/B runs)."""
    _enable(monkeypatch)
    monkeypatch.setenv(mask.ENV_VARIANT, "eager")
    vp.register()
    meta = mask_fakes.Metadata(10)
    meta.update_from_top_indices([1, 4, 7])
    mask_fakes.Backend().forward_contiguous(FakeRows(3), FakeRows(10), FakeRows(10), FakeRows(3), meta)
    assert mask_fakes.fused_merges == [False]


@pytest.mark.parametrize(("variant", "want"), [
    ("one", {"fused_merge": True, "one_region": True, "skip_guards": False}),
    ("one,skip_guards", {"fused_merge": True, "one_region": True, "skip_guards": True}),
    ("skip_guards", {"fused_merge": True, "one_region": False, "skip_guards": False}),  # only with "one"
    ("", {"fused_merge": True, "one_region": False, "skip_guards": False}),
])
def test_mask_variant_names_the_split_paths_options(mask_fakes: Fakes, monkeypatch: pytest.MonkeyPatch,
                                                   variant: str, want: dict) -> None:
    _enable(monkeypatch)
    monkeypatch.setenv(mask.ENV_VARIANT, variant)
    vp.register()
    meta = mask_fakes.Metadata(10)
    meta.update_from_top_indices([1, 4, 7])
    mask_fakes.Backend().forward_contiguous(FakeRows(3), FakeRows(10), FakeRows(10), FakeRows(3), meta)
    assert mask_fakes.options == [want]


def test_mask_fix_leaves_full_recompute_and_unmasked_layers_to_lmcache(mask_fakes: Fakes,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _enable(monkeypatch)
    vp.register()
    backend = mask_fakes.Backend()
    before_check = mask_fakes.Metadata(10)  # layers before the check layer: no top indices yet
    assert backend.forward_contiguous(FakeRows(10), FakeRows(10), FakeRows(10), FakeRows(10),
                                      before_check).tag == "bottom-right"
    everything = mask_fakes.Metadata(4)  # ratio 1.0: every token recomputed, causal is already exact
    everything.update_from_top_indices([0, 1, 2, 3])
    assert mask_fakes.built == []
    assert backend.forward_contiguous(FakeRows(4), FakeRows(4), FakeRows(4), FakeRows(4),
                                      everything).tag == "bottom-right"
    assert backend.original_calls == 2


@pytest.mark.parametrize(("attr", "value"), [("sliding_window", (4096, 0)), ("logits_soft_cap", 30.0),
                                             ("alibi_slopes", [0.5]), ("kv_cache_dtype", "fp8_e4m3")])
def test_mask_fix_falls_back_where_flex_would_differ(mask_fakes: Fakes, monkeypatch: pytest.MonkeyPatch,
                                                     attr: str, value: Any) -> None:
    _enable(monkeypatch)
    vp.register()
    meta = mask_fakes.Metadata(10)
    meta.update_from_top_indices([1, 4])
    backend = mask_fakes.Backend()
    setattr(backend.vllm_attn_impl, attr, value)
    assert backend.forward_contiguous(FakeRows(2), FakeRows(10), FakeRows(10), FakeRows(2), meta).tag == "bottom-right"


def test_mask_fix_errors_fall_back_once_per_request(mask_fakes: Fakes, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("no kernel")

    monkeypatch.setattr(mask.blend_mask, "run_plan", broken)
    _enable(monkeypatch)
    vp.register()
    meta = mask_fakes.Metadata(10)
    meta.update_from_top_indices([1, 4])
    backend = mask_fakes.Backend()
    with caplog.at_level(logging.INFO, logger=vp.logger.name):
        for _ in range(2):
            out = backend.forward_contiguous(FakeRows(2), FakeRows(10), FakeRows(10), FakeRows(2), meta)
            assert out.tag == "bottom-right"
    assert backend.original_calls == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "exact attention failed" in r.getMessage()]
    assert len(warnings) == 1


def test_mask_fix_switch_and_version_gate(mask_fakes: Fakes, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    original = mask_fakes.Backend.forward_contiguous
    _enable(monkeypatch, "all,-mask")
    vp.register()
    assert mask_fakes.Backend.forward_contiguous is original

    vp._reset_for_tests()
    assert _register_warns_of_version(monkeypatch, caplog, "0.5.6", "mask")
    assert mask_fakes.Backend.forward_contiguous is original


def test_loadcopy_is_opt_in_and_armed_after_sync() -> None:
    assert "loadcopy" in vp.OPT_IN_FIXES and "loadcopy" not in vp.ALL_FIXES
    assert vp.parse_fixes("all,loadcopy") == frozenset(vp.ALL_FIXES) | {"loadcopy"}
    order = list(vp.FIXES)
    assert order.index("sync") < order.index("loadcopy") < order.index("selection")
