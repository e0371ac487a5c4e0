"""The shell of every kvdemo command (app, bench, offline): SIGTERM → SystemExit, one line for a user's
problem, cleanups after that line."""

from __future__ import annotations

import signal
import sys
import threading

import pytest

from kvdemo import cli_shell
from kvdemo import main as app
from kvdemo.bench import cli as bench_cli
from kvdemo.cli_shell import raise_system_exit, run_cli
from kvdemo.errors import EngineError, UserFacingError
from kvdemo.offline import cli as offline_cli


def test_sigterm_becomes_system_exit():
    with pytest.raises(SystemExit) as exc:
        raise_system_exit(signal.SIGTERM, None)
    assert exc.value.code == 128 + signal.SIGTERM


def test_a_sigterm_while_the_body_runs_unwinds_through_its_cleanups():
    before = signal.getsignal(signal.SIGTERM)
    events = []

    def body(cleanup):
        cleanup.callback(events.append, "cleaned up")
        assert signal.getsignal(signal.SIGTERM) is raise_system_exit
        signal.raise_signal(signal.SIGTERM)
        events.append("not reached")
        return 0

    with pytest.raises(SystemExit) as exc:
        run_cli("prog", body)
    assert exc.value.code == 128 + signal.SIGTERM and events == ["cleaned up"]
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def _failing(exc: BaseException):
    def body(cleanup):
        cleanup.callback(print, "cleanup ran", file=sys.stderr)
        raise exc
    return body


@pytest.mark.parametrize("exc, kwargs, status", [
    (UserFacingError("Fix the flag."), {}, 2),
    (EngineError("🚀 died.", "lmcache"), {}, 2),
    (EngineError("🚀 died.", "lmcache"), {"engine_error_status": 1}, 1),
    (KeyboardInterrupt(), {"interrupted": "interrupted, stopping engines…"}, 130),
])
def test_a_users_problem_is_one_line_on_stderr_before_the_cleanups(capsys, exc, kwargs, status):
    assert run_cli("prog", _failing(exc), **kwargs) == status
    out, err = capsys.readouterr()
    line = kwargs.get("interrupted") or str(exc)
    assert out == "" and err == f"prog: {line}\ncleanup ran\n"


def test_ctrl_c_propagates_where_the_command_names_no_line():
    with pytest.raises(KeyboardInterrupt):
        run_cli("prog", _failing(KeyboardInterrupt()))


def test_off_the_main_thread_signals_are_left_alone():
    result = []
    thread = threading.Thread(target=lambda: result.append(run_cli("prog", lambda cleanup: 7)))
    thread.start()
    thread.join()
    assert result == [7]


def test_app_bench_and_offline_share_the_shell():
    for module in (app, bench_cli, offline_cli):
        assert module.run_cli is cli_shell.run_cli, module.__name__
