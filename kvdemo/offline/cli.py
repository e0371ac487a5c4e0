"""``python -m kvdemo.offline``: argument parsing and the run; one clear line for problems a user can fix.

Prints the answer, the TTFT of a full-prefill baseline and of the blended run, and the speedup::

    python -m kvdemo.offline --model M --chunks data/chunks/a.txt data/chunks/b.txt --question "..." \
        [--config lmcache_configs/offline.yaml] [--engine-args "--load-format dummy --enforce-eager"] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

from ..cli_shell import run_cli
from ..config import DEFAULT_MODEL, with_pass_through_values
from .bench import measure, print_report, result_record, write_output
from .plan import prepare, print_plan
from .session import BlendSession
from .settings import DEFAULT_CONFIG, DEFAULT_MAX_TOKENS, DEFAULT_REPEATS, DEFAULT_SYS_PROMPT_FILE, PROG


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="LMCache KV blending without a server: precompute each chunk's KV, then answer a "
                    "question over system prompt + chunks + question; prints the answer, the TTFT of a "
                    "full-prefill baseline and of the blended run, and the speedup.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hub model id or local model directory")
    p.add_argument("--chunks", nargs="+", type=Path, required=True, metavar="FILE",
                   help="chunk text files, in prompt order (each tokenized on its own and cached separately)")
    p.add_argument("--sys-prompt-file", type=Path, default=DEFAULT_SYS_PROMPT_FILE,
                   help="system prompt file (default: data/sys_prompt.txt)")
    p.add_argument("--question", required=True, help="the question asked after the chunks")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="LMCache yaml (default: lmcache_configs/offline.yaml)")
    p.add_argument("--max-tokens", type=_positive_int, default=DEFAULT_MAX_TOKENS, help="answer length limit")
    p.add_argument("--max-model-len", type=_positive_int, default=None,
                   help="vLLM max_model_len (default: the model's own context length)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of GPU memory vLLM may use (default: vLLM's)")
    p.add_argument("--engine-args", default="",
                   help='extra vLLM engine flags, as for the app, e.g. "--load-format dummy '
                        '--enforce-eager": --name value -> name=value (JSON-decoded when it parses), '
                        "--name -> True, --no-name -> False")
    p.add_argument("--repeats", type=_positive_int, default=DEFAULT_REPEATS,
                   help="runs of each of baseline and blended (the median is reported)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (logs go to stderr)")
    p.add_argument("--output", type=Path, default=None, help="also write the JSON result to this file")
    p.add_argument("--dry-run", action="store_true",
                   help="check inputs, print the prompt layout, engine arguments and environment; "
                        "start nothing")
    return p


@contextlib.contextmanager
def _stdout_into_stderr(enabled: bool) -> Iterator[None]:
    """Point file descriptor 1 at stderr while the engine runs, so --json keeps stdout for the JSON.

    vLLM logs to stdout, and its engine-core process inherits descriptor 1; redirecting the descriptor
    (not just sys.stdout) catches both.
    """
    if not enabled:
        yield
        return
    try:
        saved = os.dup(1)
    except OSError:
        yield
        return
    sys.stdout.flush()
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run(args: argparse.Namespace) -> int:
    plan = prepare(args, check_gpu=not args.dry_run)
    if args.dry_run:
        print_plan(plan, args.json, sys.stdout)
        return 0
    session: BlendSession | None = None
    with _stdout_into_stderr(args.json):
        try:
            session = BlendSession(plan.model, plan.config_path, prompts=plan.prompts,
                                   max_tokens=args.max_tokens, check_gpu=False, **plan.extra_kwargs)
            measured = measure(session, plan, args.repeats)
        finally:
            if session is not None:
                session.close()
    record = result_record(plan, args, measured)
    if args.output is not None:
        write_output(record, args.output)
    if args.json:
        print(json.dumps(record, indent=2), flush=True)
    else:
        print_report(record, sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry: 0 on success, 2 with one ``kvdemo.offline: <message>`` line for problems a user can fix."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we tokenize before vLLM forks its engine

    def body(_cleanup: ExitStack) -> int:
        return run(build_parser().parse_args(with_pass_through_values(argv)))

    return run_cli(PROG, body, interrupted="interrupted (any engine started was shut down).")
