"""The demo's scenarios, found by name: ``get_scenario("blend")`` is the blending scenario (scenarios/blend.py),
``get_scenario("share")`` the KV-sharing one (scenarios/share.py); both implement scenarios/base.py.

Their names are kvdemo.config's SCENARIO_NAMES, so that config checks --scenario without importing the
scenarios, which build on config. What else is chosen by scenario lives with whoever chooses it: the page in
kvdemo/ui/pages.py, the bench protocol in kvdemo/bench/cases.py (share: share_cases.py).
"""

from __future__ import annotations

from ..config import check_scenario_name
from .base import Scenario
from .blend import SCENARIO as BLEND
from .share import SCENARIO as SHARE

SCENARIOS: dict[str, Scenario] = {s.name: s for s in (BLEND, SHARE)}


def get_scenario(name: str) -> Scenario:
    """The scenario called `name`; an unknown name is a UserFacingError listing the known ones."""
    check_scenario_name(name)
    return SCENARIOS[name]
