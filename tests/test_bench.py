"""The benchmarks still run: every script of bench/ end to end, in its quick mode, and
bench/run_all.sh around them. All of them are started at once, three at a time (nothing is
timed; each has its own database and ports), by the module's `quick` fixture; each test then
judges its own run. One after another they took 3 minutes of the suite.

Not a timed test: nothing here asserts a speed. It catches a benchmark that no longer starts,
drains or finds what it measures after a change elsewhere (the growth script once looked for a
queue statement that a refactoring had removed). Needs wrk, which ./test.sh installs when
missing; without it the test fails, saying so. bench/peers.py needs its peers installed from
the package index, and fails, saying why, when that can't be reached (bench/seed.py the seed's
FastAPI stack, the same way); bench/live_output.py's
test checks every chunk arrived in order.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Each benchmark run by test_every_benchmark_runs_in_quick_mode, and the tables it must print.
TABLES = {
    "growth": ["### Growth:", "#### Claim plan with"],
    "sustained": ["### Sustained drain, 2 instances"],
    "flow": ["### Flow control: drain of"],
    "memory": ["### Memory (VmRSS) of one instance"],
    "http": ["### HTTP, one instance vs. hello world"],
    "pickup": ["### Pickup latency"],
    "retention": ["### Drain of 1,000 tasks while 10,000 expired ones are pruned"],
}
AT_ONCE = 3
# What run_all.sh itself is tested with: its loop, BENCH_SKIP and the saved tables.
RUN_ALL_WITH = "drain"
RUN_ALL_SKIPS = [*TABLES, "peers", "live_output", "inflight", "seed"]
PEERS_INSTALL_FAILED = 3  # bench/peers.py's exit code when its venv can't be installed


def _run(argv: list[str], server_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=ROOT,
        env={**os.environ, "BENCH_PG_URL": server_url, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )


@dataclass(frozen=True)
class QuickRuns:
    futures: dict[str, Future[subprocess.CompletedProcess[str]]]
    results_dir: Path  # where run_all.sh saves its tables

    def __getitem__(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.futures[name].result()


@pytest.fixture(scope="module")
def quick(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuickRuns]:
    """Every run of this module, started at once, three at a time, the longest first."""
    if shutil.which("wrk") is None:
        pytest.fail("wrk not found (apt-get install -y wrk): the benchmarks can't run")
    results = tmp_path_factory.mktemp("bench-results")
    module = [sys.executable, "-m"]
    runs: dict[str, tuple[list[str], dict[str, str]]] = {
        "peers": ([*module, "bench.peers", "--quick"], {}),
        **{name: ([*module, f"bench.{name}", "--quick"], {}) for name in TABLES},
        "inflight": ([*module, "bench.inflight", "--quick", "--concurrency", "16"], {}),
        # --pin: taskapp's CPU_AFFINITY and the baseline's taskset, the way to 3 x the seed.
        "seed": ([*module, "bench.seed", "--quick", "--pin"], {}),
        "run_all": (
            [str(ROOT / "bench" / "run_all.sh"), "--quick"],
            {
                "BENCH_RESULTS_DIR": str(results),
                "PYTHON": sys.executable,
                "BENCH_SKIP": " ".join(RUN_ALL_SKIPS),
            },
        ),
        "live_output": ([*module, "bench.live_output", "--quick", "--timeout", "120"], {}),
    }
    with ThreadPoolExecutor(AT_ONCE) as pool:
        futures = {
            name: pool.submit(_run, argv, server_url, **env) for name, (argv, env) in runs.items()
        }
        yield QuickRuns(futures, results)


def test_every_benchmark_runs_in_quick_mode(quick: QuickRuns) -> None:
    for name, tables in TABLES.items():
        done = quick[name]
        assert done.returncode == 0, (name, done.stderr[-3000:])
        for table in tables:
            assert table in done.stdout, (name, table, done.stdout[-3000:])


def test_run_all_runs_each_benchmark_and_saves_its_tables(quick: QuickRuns) -> None:
    done = quick["run_all"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert "### Queue drain of" in done.stdout, done.stdout[-3000:]
    for name in RUN_ALL_SKIPS:
        assert f"bench.{name} skipped (BENCH_SKIP)" in done.stderr
    (saved,) = quick.results_dir.glob("*-quick.md")
    assert saved.read_text() == done.stdout


def test_peers_benchmark_runs_in_quick_mode(quick: QuickRuns) -> None:
    done = quick["peers"]
    # Like wrk above, the peers are part of what this machine must have: no skip.
    assert done.returncode != PEERS_INSTALL_FAILED, (
        "bench/peers.py could not install PgQueuer and procrastinate from the package index: "
        + done.stderr[-2000:]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "### Peers: drain of" in done.stdout, done.stdout[-3000:]
    for row in ("taskapp, 2 instances", "PgQueuer ", "procrastinate ", "pgbench, the claim"):
        assert row in done.stdout, (row, done.stdout[-3000:])


def test_the_seed_benchmark_runs_in_quick_mode_pinned(quick: QuickRuns) -> None:
    """bench/seed.py: the seed rebuilt from its README (its own venv from the package index)
    answers with the loaded tasks, and both services are measured on each endpoint."""
    done = quick["seed"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert "### taskapp vs. the seed" in done.stdout and "both on one CPU" in done.stdout
    for endpoint in ("| GET /tasks/{id} ", "| GET /tasks/?limit=100 ", "| POST /tasks/ "):
        (row,) = [line for line in done.stdout.splitlines() if line.startswith(endpoint)]
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[1].replace(",", "")) > 0 and float(cells[2].replace(",", "")) > 0


def test_the_live_output_bench_runs_in_quick_mode(quick: QuickRuns) -> None:
    """bench/live_output.py (a few seconds): every chunk from A reaches B's stream, in order."""
    done = quick["live_output"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert "### Live output, 50 chunks" in done.stdout, done.stdout
    rows = [line for line in done.stdout.splitlines() if "A emit ->" in line]
    assert len(rows) == 4, done.stdout
    for line in rows:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[1:3] == ["50/50", "yes"], line


def test_the_inflight_bench_runs_in_quick_mode(quick: QuickRuns) -> None:
    """bench/inflight.py at one level (16 slots, 4 waves of 1-second tasks, ~15 s): every task
    done, the table printed. Its ratio targets are judged at 64 and 200 slots, not here."""
    done = quick["inflight"]
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: a latency target missed
    assert "### 1-second tasks in flight, 2 instances" in done.stdout, done.stdout
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("| 2 x 16 ")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "128"  # 2 instances x 16 slots x 4 waves, all completed
    assert float(cells[3].replace(",", "")) > 0
