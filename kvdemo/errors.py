"""The one exception type for problems a user can fix.

The CLI prints its message on one line and exits non-zero; the UI shows it in place of an answer.
Anything else is a bug and may show a traceback in the terminal, never in the browser.
"""


class UserFacingError(Exception):
    """A problem with input or environment whose message says what to do about it."""


class EngineError(UserFacingError):
    """An engine died or does not answer; the message carries the tail of its log."""

    def __init__(self, message: str, engine: str = "", log_tail: str = "") -> None:
        super().__init__(message if not log_tail else f"{message}\n--- last lines of its log ---\n{log_tail}")
        self.engine = engine
        self.log_tail = log_tail
        self.short = message
