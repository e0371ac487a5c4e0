"""Signal handling shared by the app and the offline CLI."""

from __future__ import annotations

from types import FrameType


def raise_system_exit(signum: int, _frame: FrameType | None) -> None:
    """A SIGTERM handler: raise ``SystemExit(128 + signum)`` in the main thread.

    A plain SIGTERM would end the process without unwinding, so engines it started would not be stopped
    (the app's ``Runtime.stop()``, offline's ``BlendSession.close()``); as an exception it unwinds through
    the same ``finally`` blocks as Ctrl-C, and the exit status is the shell's usual one for the signal.
    """
    raise SystemExit(128 + signum)
