"""The demo's scenarios, found by name: ``get_scenario("blend")`` is the blending scenario (scenarios/blend.py),
``get_scenario("share")`` the KV-sharing one (scenarios/share.py); both implement scenarios/base.py.

A scenario's module is imported on first use, so that kvdemo.config can check --scenario here although the
scenarios themselves build on config.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import UserFacingError

if TYPE_CHECKING:
    from .base import Scenario

NAMES = ("blend", "share")


def get_scenario(name: str) -> Scenario:
    """The scenario called `name`; an unknown name is a UserFacingError listing the known ones."""
    if name not in NAMES:
        raise UserFacingError(f"Unknown scenario {name!r} (KVDEMO_SCENARIO?): use one of {', '.join(NAMES)}.")
    return importlib.import_module(f"{__name__}.{name}").SCENARIO
