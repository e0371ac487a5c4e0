"""SIGTERM → SystemExit, one handler for the app and the offline CLI."""

from __future__ import annotations

import signal

import pytest

from kvdemo import main as main_module
from kvdemo.signals import raise_system_exit


def test_sigterm_becomes_system_exit():
    with pytest.raises(SystemExit) as exc:
        raise_system_exit(signal.SIGTERM, None)
    assert exc.value.code == 128 + signal.SIGTERM


def test_main_keeps_its_old_name_for_bench():
    assert main_module._raise_exit is raise_system_exit
