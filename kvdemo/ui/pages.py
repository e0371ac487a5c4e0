"""Each scenario's Gradio page, chosen by the scenario's name: the UI knows the scenarios, a scenario knows
nothing of the UI (scenarios sit below it, with the runtime)."""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from ..runtime import Runtime
from .app import build_ui
from .share_app import build_share_ui

PAGES: dict[str, Callable[[Runtime], gr.Blocks]] = {"blend": build_ui, "share": build_share_ui}


def build_page(runtime: Runtime) -> gr.Blocks:
    """The page of the runtime's scenario (built once per process; per-session data lives in its gr.State)."""
    return PAGES[runtime.scenario.name](runtime)
