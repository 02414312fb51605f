"""The benchmarks still run: every script of bench/ end to end, in its quick mode.

Not a timed test: nothing here asserts a speed. It catches a benchmark that no longer starts,
drains or finds what it measures after a change elsewhere (the growth script once looked for a
queue statement that a refactoring had removed). Needs wrk, which ./test.sh installs when
missing; without it the test fails, saying so. bench/peers.py has a test of its own: it needs
its peers installed from the package index, and is skipped, saying why, when that can't be
reached. bench/live_output.py has one too, a few seconds long, that checks every chunk arrived
in order.
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
    "### Flow control: drain of",
    "### Pickup latency",
    "### Growth:",
    "#### Claim plan with",
    "### Memory (VmRSS) of one instance",
    "### Drain of 1,000 tasks while 10,000 expired ones are pruned",
    "### Sustained drain, 2 instances",
]


def test_every_benchmark_runs_in_quick_mode(server_url: str, tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.fail("wrk not found (apt-get install -y wrk): the benchmarks can't run")
    env = {
        **os.environ,
        "BENCH_PG_URL": server_url,
        "BENCH_RESULTS_DIR": str(tmp_path),
        "PYTHON": sys.executable,
        # Each has a test of its own below.
        "BENCH_SKIP": "peers live_output inflight",
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


PEERS_INSTALL_FAILED = 3  # bench/peers.py's exit code when its venv can't be installed


def test_peers_benchmark_runs_in_quick_mode(server_url: str) -> None:
    env = {**os.environ, "BENCH_PG_URL": server_url}
    done = subprocess.run(
        [sys.executable, "-m", "bench.peers", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    # Like wrk above, the peers are part of what this machine must have: no skip.
    assert done.returncode != PEERS_INSTALL_FAILED, (
        "bench/peers.py could not install PgQueuer and procrastinate from the package index: "
        + done.stderr[-2000:]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "### Peers: drain of" in done.stdout, done.stdout[-3000:]
    for row in ("taskapp, 2 instances", "PgQueuer ", "procrastinate ", "pgbench, the claim"):
        assert row in done.stdout, (row, done.stdout[-3000:])


def test_the_live_output_bench_runs_in_quick_mode(server_url: str) -> None:
    """bench/live_output.py alone (a few seconds): every chunk from A reaches B's stream."""
    env = {**os.environ, "BENCH_PG_URL": server_url}
    done = subprocess.run(
        [sys.executable, "-m", "bench.live_output", "--quick", "--timeout", "120"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "### Live output, 50 chunks" in done.stdout, done.stdout
    rows = [line for line in done.stdout.splitlines() if "A emit ->" in line]
    assert len(rows) == 4, done.stdout
    for line in rows:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[1:3] == ["50/50", "yes"], line


def test_the_inflight_bench_runs_in_quick_mode(server_url: str) -> None:
    """bench/inflight.py at one level (16 slots, 4 waves of 1-second tasks, ~15 s): every task
    done, the table printed. Its ratio targets are judged at 64 and 200 slots, not here."""
    env = {**os.environ, "BENCH_PG_URL": server_url}
    done = subprocess.run(
        [sys.executable, "-m", "bench.inflight", "--quick", "--concurrency", "16"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: a latency target missed
    assert "### 1-second tasks in flight, 2 instances" in done.stdout, done.stdout
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("| 2 x 16 ")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "128"  # 2 instances x 16 slots x 4 waves, all completed
    assert float(cells[3].replace(",", "")) > 0
