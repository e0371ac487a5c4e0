"""One engine as the app holds it: its spec, its process (None when attached), its served model once healthy.

The runtime makes one per engine (kvdemo.runtime); the scenarios, the upload budget, the UI and the bench
hand them around. It lives below all of them, so that each can name it without importing the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .client import EngineClient
from .engines import EngineProcess, EngineSpec
from .errors import EngineError
from .telemetry import LoadRecord, TelemetryReader


@dataclass
class EngineHandle:
    spec: EngineSpec
    process: EngineProcess | None  # None when attached
    model_name: str | None = None
    startup_s: float | None = None
    telemetry: TelemetryReader | None = field(default=None, repr=False)

    def client(self, timeout_s: float = 600.0) -> EngineClient:
        """A fresh client: openai's async client belongs to the event loop that uses it."""
        c = EngineClient(self.spec.url, self.spec.label, self.spec.key, timeout_s)
        c._model = self.model_name
        return c

    def status(self) -> str:
        if self.process is not None and self.process.proc is not None and not self.process.alive():
            return f"❌ stopped (exit {self.process.proc.returncode if self.process.proc else '?'})"
        return "✅ healthy" if self.model_name else "⏳ starting"

    def load_record(self, request_id: str | None, wait_s: float = 0.5) -> LoadRecord | None:
        """What LMCache loaded for the request sent as ``request_id`` (None: no LMCache engine of ours, or it
        loaded nothing). Blocks up to ``wait_s``: call it off the event loop."""
        if request_id is None or self.process is None or self.process.telemetry_dir is None:
            return None
        if self.telemetry is None:
            self.telemetry = TelemetryReader(self.process.telemetry_dir)
        return self.telemetry.find(request_id, wait_s)

    def error_with_log(self, message: str) -> EngineError:
        tail = self.process.log_tail() if self.process else ""
        return EngineError(message, self.spec.key, tail)
