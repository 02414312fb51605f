"""The benchmarks still run: every script of bench/ end to end, in its quick mode.

Not a timed test: nothing here asserts a speed. It catches a benchmark that no longer starts,
drains or finds what it measures after a change elsewhere (the growth script once looked for a
queue statement that a refactoring had removed). Needs wrk, which ./test.sh installs when
missing; without it the test fails, saying so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TABLES = [
    "### HTTP, one instance vs. hello world",
    "### Queue drain of",
    "### Pickup latency",
    "### Growth:",
    "#### Claim plan with",
    "### Memory (VmRSS) of one instance",
]


def test_every_benchmark_runs_in_quick_mode(server_url: str, tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.fail("wrk not found (apt-get install -y wrk): the benchmarks can't run")
    env = {
        **os.environ,
        "BENCH_PG_URL": server_url,
        "BENCH_RESULTS_DIR": str(tmp_path),
        "PYTHON": sys.executable,
    }
    done = subprocess.run(
        [str(ROOT / "bench" / "run_all.sh"), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for table in TABLES:
        assert table in done.stdout, (table, done.stdout[-3000:])
    (saved,) = tmp_path.glob("*-quick.md")
    assert saved.read_text() == done.stdout
