"""The benchmarks still run: every script of bench/ end to end, in its quick mode (three at a
time: nothing is timed), and bench/run_all.sh around them.

Not a timed test: nothing here asserts a speed. It catches a benchmark that no longer starts,
drains or finds what it measures after a change elsewhere (the growth script once looked for a
queue statement that a refactoring had removed). Needs wrk, which ./test.sh installs when
missing; without it the test fails, saying so. bench/peers.py has a test of its own: it needs
its peers installed from the package index, and fails, saying why, when that can't be
reached. bench/live_output.py has one too, a few seconds long, that checks every chunk arrived
in order.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Each benchmark of bench/run_all.sh (but those with tests of their own, below) and the tables
# its quick run must print.
TABLES = {
    "http": ["### HTTP, one instance vs. hello world"],
    "drain": ["### Queue drain of"],
    "flow": ["### Flow control: drain of"],
    "pickup": ["### Pickup latency"],
    "growth": ["### Growth:", "#### Claim plan with"],
    "memory": ["### Memory (VmRSS) of one instance"],
    "retention": ["### Drain of 1,000 tasks while 10,000 expired ones are pruned"],
    "sustained": ["### Sustained drain, 2 instances"],
}
# Quick runs at once: nothing here is timed, and each has a database (and ports) of its own.
# One after another they took 2 min 15 s of the suite.
AT_ONCE = 3
# What run_all.sh itself is tested with: its loop, BENCH_SKIP and the saved tables.
RUN_ALL_WITH = "drain"
SKIPPED_BY_RUN_ALL = [name for name in TABLES if name != RUN_ALL_WITH]


def _bench_env(server_url: str) -> dict[str, str]:
    return {**os.environ, "BENCH_PG_URL": server_url}


def _quick(name: str, server_url: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--quick"],
        cwd=ROOT,
        env=_bench_env(server_url),
        capture_output=True,
        text=True,
        timeout=900,
    )
    return name, done


@pytest.fixture
def wrk() -> None:
    if shutil.which("wrk") is None:
        pytest.fail("wrk not found (apt-get install -y wrk): the benchmarks can't run")


@pytest.mark.usefixtures("wrk")
def test_every_benchmark_runs_in_quick_mode(server_url: str) -> None:
    names = [name for name in TABLES if name != RUN_ALL_WITH]
    with ThreadPoolExecutor(AT_ONCE) as pool:
        runs = list(pool.map(lambda name: _quick(name, server_url), names))
    for name, done in runs:
        assert done.returncode == 0, (name, done.stderr[-3000:])
        for table in TABLES[name]:
            assert table in done.stdout, (name, table, done.stdout[-3000:])


@pytest.mark.usefixtures("wrk")
def test_run_all_runs_each_benchmark_and_saves_its_tables(server_url: str, tmp_path: Path) -> None:
    env = {
        **_bench_env(server_url),
        "BENCH_RESULTS_DIR": str(tmp_path),
        "PYTHON": sys.executable,
        "BENCH_SKIP": " ".join([*SKIPPED_BY_RUN_ALL, "peers", "live_output", "inflight"]),
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
    for table in TABLES[RUN_ALL_WITH]:
        assert table in done.stdout, (table, done.stdout[-3000:])
    for name in SKIPPED_BY_RUN_ALL:
        assert f"bench.{name} skipped (BENCH_SKIP)" in done.stderr
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
