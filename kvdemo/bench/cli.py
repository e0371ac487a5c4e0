"""``python -m kvdemo.bench``: the app's flags plus the benchmark's; parse (into a job.py BenchJob) → measure →
write, or the quality case (quality.py)."""

from __future__ import annotations

import argparse
import shlex
import sys
from contextlib import ExitStack
from pathlib import Path

from ..cli_shell import run_cli
from ..config import REPO_ROOT, Settings, build_parser, settings_from_args, with_pass_through_values
from ..errors import UserFacingError
from .cases import cases_for
from .job import BenchJob, token_counts
from .measure import measure
from .quality import add_quality_flags, quoted_argv, run_quality
from .write import redraw, write

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
APP_QUESTION = "Which section explains name binding?"  # the headless question answered before the cases


def build_bench_parser() -> argparse.ArgumentParser:
    p = build_parser()
    p.prog = "python -m kvdemo.bench"
    g = p.add_argument_group("benchmark")
    g.add_argument("--contexts", default="4000,8000,16000,24000", help="context sizes in tokens")
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--decode-tokens", type=int, default=256, help="output tokens of the decode-speed requests")
    g.add_argument("--out", type=Path, default=RESULTS_DIR)
    g.add_argument("--name", help="result file stem: <name>-<gpu>.json (default: the scenario)")
    g.add_argument("--plot-only", type=Path, help="redraw the PNG of an existing result JSON and exit")
    g.add_argument("--skip-app-question", action="store_true",
                   help="do not run the app's headless question before the cases")
    g.add_argument("--trace-contexts", default="",
                   help="after the cases, trace one extra blended request per context size with the torch "
                        "profiler inside the LMCache engine (real engines only); writes <name>-<gpu>-trace-"
                        "<ctx>.json.gz next to the result and a summary into it")
    add_quality_flags(p)
    return p


def parse(a: argparse.Namespace, settings: Settings, argv: list[str] | None) -> BenchJob:
    """The TTFT benchmark's flags, checked before any engine starts; each problem is a one-line error."""
    out = Path(a.out)
    if settings.simulate and out.resolve() == RESULTS_DIR.resolve():
        raise UserFacingError("benchmarks/results holds GPU measurements only: give --out for a SIMULATED run.")
    contexts = token_counts("--contexts", a.contexts)
    if max(contexts) + a.decode_tokens > settings.max_model_len:
        raise UserFacingError(f"--contexts up to {max(contexts)} + {a.decode_tokens} decode tokens exceed "
                              f"--max-model-len {settings.max_model_len}.")
    trace_contexts = token_counts("--trace-contexts", a.trace_contexts) if a.trace_contexts.strip() else []
    cases = cases_for(settings.scenario)
    if trace_contexts and (settings.simulate or not cases.traceable):
        raise UserFacingError("--trace-contexts traces the real LMCache engine's blend: blend scenario, no --simulate.")
    return BenchJob(settings=settings, cases=cases, contexts=contexts, trace_contexts=trace_contexts,
                    repeats=a.repeats, decode_tokens=a.decode_tokens, skip_app_question=a.skip_app_question,
                    out=out, name=a.name,
                    command="python -m kvdemo.bench " + shlex.join(sys.argv[1:] if argv is None else argv))


def run(argv: list[str] | None = None) -> dict:
    """The benchmark: parse → measure → write; returns the result. --plot-only redraws a result's PNG;
    --quality runs the quality case instead (quality.py)."""
    a = build_bench_parser().parse_args(with_pass_through_values(argv))
    if a.plot_only:
        return redraw(a.plot_only)
    a.no_ui, a.ask = True, a.ask or APP_QUESTION
    settings = settings_from_args(a)
    if a.quality:
        a.name = a.name or "quality"
        return run_quality(a, settings, quoted_argv(argv))
    job = parse(a, settings, argv)
    measured = measure(job)
    write(job, measured)
    return measured.result


def main(argv: list[str] | None = None) -> int:
    """``python -m kvdemo.bench``: 0, or 2 with one line for a problem the user can fix (cli_shell.py)."""
    def body(_cleanup: ExitStack) -> int:
        run(argv)
        return 0

    return run_cli("kvdemo.bench", body)
