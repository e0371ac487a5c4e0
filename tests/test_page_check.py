"""scripts/page_check.py — the GPU machine's upload → ask check through the page's handlers — run here against
simulated engines, with the flags gpu_run.sh gives it, so it cannot fail there for a reason CI could see
(its first GPU run stopped at argparse: `--engine-args "--enforce-eager"`)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from helpers import app_env, free_ports

DOCUMENT = """Apache License, Version 2.0 (excerpt, for the test)

1. Definitions. "License" shall mean the terms and conditions for use, reproduction, and distribution.

3. Grant of Patent License. Subject to the terms and conditions of this License, each Contributor hereby
grants to You a perpetual, worldwide, non-exclusive, no-charge, royalty-free, irrevocable patent license.

7. Disclaimer of Warranty. Unless required by applicable law or agreed to in writing, Licensor provides the
Work on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND.
"""


@pytest.mark.slow
def test_page_check_uploads_asks_and_prints_the_telemetry(tmp_path):
    doc = tmp_path / "apache-license.txt"
    doc.write_text(DOCUMENT * 6)
    ui, lm, plain = free_ports(3)
    cmd = [sys.executable, "scripts/page_check.py", "--simulate", "--sim-speed", "20", "--max-model-len", "8192",
           "--engine-args", "--enforce-eager", "--engine-ports", f"{lm},{plain}", "--port", str(ui),
           "--log-dir", str(tmp_path / "logs"), "--upload", str(doc)]
    done = subprocess.run(cmd, check=False, cwd=REPO_ROOT, env=app_env(), capture_output=True, text=True,
                          timeout=240)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert re.search(r"upload: ✅ Added \d+ chunks? from apache-license", out), out[-3000:]
    # Two questions, each with both panes; 🚀's pane carries the 🔎 line of its own request id.
    requests = re.findall(r"\[lmcache\] request (kvdemo-[0-9a-f]+)\n(.*)\n(🔎 .*)", out)
    assert len(requests) == 2, out[-3000:]
    for rid, stats, load in requests:
        assert stats.startswith("TTFT") and "reused from LMCache" in stats
        assert re.fullmatch(r"🔎 LMCache reused [\d,]+ tokens, recomputed [\d,]+ \(\d+%\), computed [\d,]+ fresh · "
                            r"[\d.]+ GB KV loaded, load \+ recompute \d+ ms GPU \(SIMULATED\)", load), load
    assert requests[0][0] != requests[1][0]
    assert len(re.findall(r"\[plain\] request kvdemo-[0-9a-f]+\nTTFT", out)) == 2
    assert len(re.findall(r"\nbadge: 🚀 \*\*[\d.]+×\*\*", out)) == 2
    assert len(re.findall(r"\nagreement: 🚀 and 🐢 (give the same answer|agree on the first)", out)) == 2


@pytest.mark.slow
def test_page_check_without_upload_asks_over_the_default_context(tmp_path):
    """The real-model page check (gpu_run.sh qwen-page): the page's default chunks at --context-tokens."""
    ui, lm, plain = free_ports(3)
    cmd = [sys.executable, "scripts/page_check.py", "--simulate", "--sim-speed", "20", "--max-model-len", "32768",
           "--context-tokens", "30000", "--engine-ports", f"{lm},{plain}", "--port", str(ui),
           "--log-dir", str(tmp_path / "logs")]
    done = subprocess.run(cmd, check=False, cwd=REPO_ROOT, env=app_env(), capture_output=True, text=True,
                          timeout=240)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    contexts = [int(n) for n in re.findall(r"\((\d+) context tokens\)", out)]
    assert len(contexts) == 2 and all(30_000 <= n <= 32_768 - 512 for n in contexts), out[-3000:]
    assert "upload:" not in out and len(re.findall(r"\[lmcache\] request kvdemo-[0-9a-f]+\nTTFT", out)) == 2
    assert len(re.findall(r"\nagreement: 🚀 and 🐢", out)) == 2
