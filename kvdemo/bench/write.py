"""The bench's output: the result JSON (with any raw traces beside it), a summary per case, and the PNG
(drawn as the scenario's protocol says: bench/plots.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .cases import cases_for
from .job import BenchJob
from .measure import Measured


def gpu_slug(name: str) -> str:
    words = re.sub(r"^NVIDIA\s+", "", name).split()
    return re.sub(r"[^a-z0-9]+", "-", words[0].lower()) if words else "gpu"


def write(job: BenchJob, measured: Measured) -> Path:
    """Write <name>-<gpu>.json (raw traces beside it), print each case, draw the PNG; returns the JSON's path."""
    result, settings = measured.result, job.settings
    job.out.mkdir(parents=True, exist_ok=True)
    name = job.name or settings.scenario
    stem = f"{name}-{gpu_slug(result['device']) if not settings.simulate else 'simulated'}"
    path = job.out / f"{stem}.json"
    for t in result.get("traces", []):  # the raw trace travels with the result
        assert measured.trace_dir is not None
        kept = job.out / f"{stem}-{t['trace']}"
        shutil.copyfile(measured.trace_dir / t["trace"], kept)
        t["trace"] = kept.name
    if measured.trace_dir is not None:
        shutil.rmtree(measured.trace_dir, ignore_errors=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"kvdemo.bench: wrote {path}")
    for c in result["cases"]:
        print(job.cases.case_line(c))
    try:
        plot(result, path.with_suffix(".png"))
        print(f"kvdemo.bench: wrote {path.with_suffix('.png')}")
    except ImportError:
        print("kvdemo.bench: matplotlib missing here; draw the plot with --plot-only " + str(path))
    return path


def redraw(result_json: Path) -> dict:
    """--plot-only: draw the PNG of an existing result next to it (e.g. on a machine with matplotlib)."""
    result = json.loads(result_json.read_text())
    plot(result, result_json.with_suffix(".png"))
    print(f"kvdemo.bench: wrote {result_json.with_suffix('.png')}")
    return result


def plot(result: dict, png: Path) -> None:
    """The result's figure, as its scenario draws it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases_for(result.get("scenario") or "blend").plot(result, png, plt)
