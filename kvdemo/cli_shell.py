"""The shell every kvdemo command runs its work in: the app (kvdemo.main), ``python -m kvdemo.bench`` and
``python -m kvdemo.offline``.

`run_cli` sets up logging (INFO to stderr, the HTTP clients' per-request lines quieted), turns SIGTERM into
``SystemExit(128 + signum)`` while the work runs, and ends a `UserFacingError` as ``<prog>: <message>`` on
stderr with exit status 2 (an `EngineError`: ``engine_error_status``; its message carries the engine's log
tail). Ctrl-C ends as one line and status 130 where the command names that line.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from types import FrameType

from .errors import EngineError, UserFacingError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LOGGERS = ("httpx", "httpx2", "httpcore", "openai")  # one INFO line per HTTP request


def raise_system_exit(signum: int, _frame: FrameType | None) -> None:
    """A SIGTERM handler: raise ``SystemExit(128 + signum)`` in the main thread.

    WHY: a plain SIGTERM ends the process without unwinding, so engines it started would outlive it; as an
    exception it unwinds through the same ``finally`` blocks as Ctrl-C.
    """
    raise SystemExit(128 + signum)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=LOG_FORMAT)
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def sigterm_raises_system_exit() -> Iterator[None]:
    """`raise_system_exit` handles SIGTERM inside the block (main thread only: elsewhere nothing changes)."""
    try:
        previous = signal.signal(signal.SIGTERM, raise_system_exit)
        installed = True
    except ValueError:  # not the main thread: signals cannot be handled here
        previous, installed = None, False
    try:
        yield
    finally:
        if installed and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_cli(prog: str, body: Callable[[ExitStack], int], *, interrupted: str | None = None,
            engine_error_status: int = 2) -> int:
    """Run ``body`` in the shell; its exit status.

    ``body`` gets an ExitStack for its cleanups (e.g. stopping engines): they run after the error or
    interruption line is printed, so the user reads why before the wait. ``interrupted``: the line printed
    on Ctrl-C (status 130); None lets KeyboardInterrupt propagate.
    """
    setup_logging()
    with sigterm_raises_system_exit(), ExitStack() as cleanup:
        try:
            return body(cleanup)
        except UserFacingError as exc:
            print(f"{prog}: {exc}", file=sys.stderr, flush=True)
            return engine_error_status if isinstance(exc, EngineError) else 2
        except KeyboardInterrupt:
            if interrupted is None:
                raise
            print(f"{prog}: {interrupted}", file=sys.stderr, flush=True)
            return 130
