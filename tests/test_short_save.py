"""The plugin's fix 'short' (prompts under one LMCache chunk are stored), on a fake of LMCache's adapter."""

from __future__ import annotations

import types
from typing import Any

import pytest

from kvdemo import vllm_plugin as vp
from kvdemo.lmcache_patches import short_save


@pytest.fixture(autouse=True)
def _fresh_plugin():
    vp._reset_for_tests()
    yield
    vp._reset_for_tests()


# ----- short ------------------------------------------------------------------------------------------


class Tracker:
    def __init__(self, num_saved_tokens: int) -> None:
        self.num_saved_tokens = num_saved_tokens


class RequestTracker:
    @staticmethod
    def from_new_request(lmcache_config: Any, new_request: Any, num_tokens_to_compute: int,
                         lmcache_cached_tokens: int, skip_save: bool) -> Tracker:
        return Tracker(lmcache_cached_tokens)  # as lmcache 0.5.3: the hit is recorded as already saved


def _adapter() -> types.SimpleNamespace:
    class Tracker_(RequestTracker):
        pass
    return types.SimpleNamespace(__name__="lmcache.integration.vllm.vllm_v1_adapter", RequestTracker=Tracker_)


@pytest.mark.parametrize(("hit", "saved"), [(0, 0), (1, 0), (86, 0), (255, 0), (256, 256), (4816, 4816)])
def test_short_fix_forgets_hits_below_one_chunk(hit: int, saved: int) -> None:
    adapter = _adapter()
    short_save.patch_short_prompt_save(adapter)
    config = types.SimpleNamespace(chunk_size=256)
    tracker = adapter.RequestTracker.from_new_request(config, object(), 248, hit, False)
    assert tracker.num_saved_tokens == saved


def test_short_fix_is_why_a_248_token_prompt_is_saved() -> None:
    """LMCache 0.5.3's save rule (ReqMeta.from_request_tracker): skip when something was saved and the prompt
    has not reached the next chunk boundary. With the 1-token [BOS] hit recorded it skips; with the fix not."""
    def skips(num_saved: int, prompt: int, chunk: int = 256) -> bool:
        boundary = -(-(num_saved + 1) // chunk) * chunk
        return num_saved > 0 and prompt < boundary

    config = types.SimpleNamespace(chunk_size=256)
    plain = _adapter()
    assert skips(plain.RequestTracker.from_new_request(config, None, 248, 1, False).num_saved_tokens, 248)
    fixed = _adapter()
    short_save.patch_short_prompt_save(fixed)
    assert not skips(fixed.RequestTracker.from_new_request(config, None, 248, 1, False).num_saved_tokens, 248)


def test_short_fix_is_armed_by_default() -> None:
    assert "short" in vp.parse_fixes(None)
    assert "short" not in vp.parse_fixes("all,-short")
