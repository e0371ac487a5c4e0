"""The page's TTFT chart: this browser session's answers next to the committed GPU benchmark curve.

Pure functions (no Gradio): `load_benchmark` reads the reference curve once, `chart_frame` builds the plot's
DataFrame from one session's ChatState. ui/app.py puts the frame in a gr.ScatterPlot.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .session import ChatState

BENCHMARK_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "blend-h100.json"
X, Y, SERIES = "context_tokens", "ttft_s", "series"
EMOJI = {"lmcache": "🚀", "plain": "🐢"}
# The benchmark's columns for each pane: chunks reordered, as the page's Reverse/Shuffle buttons do.
BENCH_COLUMNS = {"lmcache": "blend_reordered_ttft_s", "plain": "plain_reordered_ttft_s"}
# Two colour families: 🚀 blue, 🐢 orange; this session's points dark, the benchmark light.
SESSION_COLOURS = {"lmcache": "#1e40af", "plain": "#c2410c"}
BENCH_COLOURS = {"lmcache": "#60a5fa", "plain": "#fb923c"}


@dataclass(frozen=True)
class Benchmark:
    """The reference curve: (context tokens, TTFT s) per pane key, and where it was measured."""

    device: str  # "NVIDIA H100 80GB HBM3"
    weights: str | None  # "dummy", or None if the file does not say
    points: dict[str, list[tuple[int, float]]]
    source: str  # the file's name

    @property
    def short_device(self) -> str:
        """The GPU's model number ("H100" of "NVIDIA H100 80GB HBM3"), or the whole name if it has none."""
        m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]*)\b", self.device)
        return m.group(1) if m else self.device

    def label(self) -> str:
        weights = f" ({self.weights} weights)" if self.weights else ""
        return f"benchmark on {self.device}{weights}"


def load_benchmark(path: Path = BENCHMARK_FILE) -> Benchmark | None:
    """The benchmark's reordered-chunks curve, or None if the file is missing or not a blend benchmark."""
    try:
        data = json.loads(Path(path).read_text())
        points = {key: sorted((int(c["context_tokens"]), float(c[col])) for c in data["cases"]
                              if c.get(col) is not None)
                  for key, col in BENCH_COLUMNS.items()}
        device = str(data.get("device") or "GPU")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not any(points.values()):
        return None
    weights = data.get("weights")
    return Benchmark(device, str(weights) if weights else None, points, Path(path).name)


def session_series(key: str, simulated: bool) -> str:
    return f"{EMOJI.get(key, key)} this session" + (" (SIMULATED)" if simulated else "")


def bench_series(key: str, bench: Benchmark) -> str:
    return f"{EMOJI.get(key, key)} benchmark ({bench.short_device})"


def chart_title(simulated: bool) -> str:
    return "Time to first token vs context" + (" (this session: SIMULATED)" if simulated else "")


def chart_caption(bench: Benchmark | None) -> str:
    if bench is None:
        return "Each finished answer of this session (no benchmark file to compare with)."
    return (f"Dark: each finished answer of this session. Light: {bench.label()}, chunks reordered, one request "
            f"at a time (benchmarks/results/{bench.source}).")


def colour_map(bench: Benchmark | None, simulated: bool) -> dict[str, str]:
    colours = {session_series(k, simulated): c for k, c in SESSION_COLOURS.items()}
    if bench is not None:
        colours.update({bench_series(k, bench): c for k, c in BENCH_COLOURS.items()})
    return colours


def chart_frame(state: ChatState, bench: Benchmark | None, simulated: bool) -> pd.DataFrame:
    """One row per point: this session's finished answers (TTFT vs prompt tokens), then the benchmark's.

    Rows are grouped by series, in a fixed order (🚀 and 🐢 of this session, then the benchmark's). A session
    series with no answer yet has one row without coordinates (not drawn): Gradio's plot fixes its colours
    and legend when it first draws and only swaps the data afterwards, so every series must be in it from
    the start.
    """
    rows: list[tuple[int | None, float | None, str]] = []
    for key in SESSION_COLOURS:
        mine = [(p.context_tokens, round(p.ttft_s, 4)) for p in state.points if p.key == key] or [(None, None)]
        rows += [(x, y, session_series(key, simulated)) for x, y in mine]
    if bench is not None:
        rows += [(x, round(y, 4), bench_series(key, bench)) for key, pts in bench.points.items() for x, y in pts]
    return pd.DataFrame({X: pd.array([r[0] for r in rows], dtype="Int64"),
                         Y: pd.array([r[1] for r in rows], dtype="Float64"),
                         SERIES: pd.Series([r[2] for r in rows], dtype="str")})


def drawn(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of `frame` that are points (not the placeholders of series with no answer yet)."""
    return frame.dropna(subset=[X, Y])
