"""TTFT benchmark of blending vs plain vLLM (and of KV sharing), against the engines the app starts (same
Runtime code path).

    python -m kvdemo.bench --model DIR --engine-args "--load-format dummy" [--contexts 4000,8000,16000,24000]

For each context size and repeat, fresh chunk text (a unique nonce at the start of every chunk) makes sure
nothing is cached by accident; requests go one at a time, in the order of the scenario's protocol (cases.py: blend and the registry; share_cases.py; protocol.py: their parts).
Blended questions are sent with `lmcache.skip_save` (they are not chunks worth keeping), exactly as the UI
does. Writes benchmarks/results/<scenario>-<gpu>.json and a PNG plot (plot needs matplotlib; `--plot-only
FILE.json` redraws it on another machine). `--quality` runs the quality case instead (quality.py).

The steps, one module each: cli.py parses the flags into a BenchJob (job.py), measure.py runs it with the
scenario's protocol (cases.py: blend and the registry; share_cases.py; protocol.py: their parts), write.py writes it and draws it (plots.py). Each module imports the ones it
builds on, never this package's face: these re-exports are for callers outside the package.
"""

from .cases import TTFT_KEYS, run_repeat, run_trace, summarize
from .cli import build_bench_parser, main, parse, run
from .job import BenchJob, token_counts
from .measure import Measured, evidence, measure, versions
from .plots import layout_text
from .protocol import CHUNKS_PER_PROMPT, engine_log_lines, synthetic_chunks
from .share_cases import SHARE_TTFT_KEYS, b_load_log, run_share_repeat, summarize_share
from .write import gpu_slug, plot, write

__all__ = [
    "CHUNKS_PER_PROMPT", "SHARE_TTFT_KEYS", "TTFT_KEYS", "BenchJob", "Measured", "b_load_log", "build_bench_parser",
    "engine_log_lines", "evidence", "gpu_slug", "layout_text", "main", "measure", "parse", "plot", "run",
    "run_repeat", "run_share_repeat", "run_trace", "summarize", "summarize_share", "synthetic_chunks",
    "token_counts", "versions", "write",
]
