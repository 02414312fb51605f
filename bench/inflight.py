"""Hundreds in flight: 1-second tasks at WORKER_CONCURRENCY 16, 64 and 200 on 2 instances.

    python -m bench.inflight [--quick] [--waves 16] [--concurrency 16,64,200]

Each instance runs the built-in processor taking exactly 1 s (PROCESSING_MIN/MAX_SECONDS=1)
with the default settings apart from WORKER_CONCURRENCY, against one database. For each
concurrency c, 2 x c x waves tasks are inserted at once; the ideal drains them at 2 x c tasks/s
(every slot always busy), so the run takes `waves` seconds at best. Reported: tasks/s against
that ideal, CPU seconds per task of the two instances, the most connections the database saw
from them (sampled every 50 ms), each instance's RSS, and `GET /tasks/{id}` latency from a
client that keeps asking one instance while the tasks run, and before, while the instances are
idle with all their work threads waiting. Targets (issue 17): ≥ 0.95 x the ideal at 64 and
200; GET p99 < 100 ms idle and busy.
"""

from __future__ import annotations

import argparse
import http.client
import threading
import time
from dataclasses import dataclass
from typing import Self
from urllib.parse import urlsplit

from bench.common import (
    bench_database,
    connect,
    cpu_seconds,
    insert_tasks,
    log,
    machine_line,
    main,
    parser,
    percentile,
    print_table,
    rss_mb,
    taskapp_server,
    truncate_tasks,
    verdict,
    wait_completed,
)

IDEAL_TARGET = 0.95
P99_TARGET_MS = 100.0


@dataclass(frozen=True)
class Run:
    concurrency: int
    tasks: int
    seconds: float
    cpu_per_task_ms: float
    max_connections: int
    rss_mb: tuple[float, float]
    idle_ms: tuple[float, float]  # GET p50, p99 while idle
    busy_ms: tuple[float, float]  # GET p50, p99 while the tasks run

    @property
    def ideal(self) -> float:
        return 2 * self.concurrency  # tasks/s with every slot busy on 1-second tasks

    @property
    def ratio(self) -> float:
        return self.tasks / self.seconds / self.ideal


class Background:
    """A loop on a thread of its own for the length of a `with` block (subclasses: _run)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        raise NotImplementedError


class Getter(Background):
    """GET /tasks/{id} in a loop on one keep-alive connection, recording each latency."""

    def __init__(self, base_url: str, task_id: int) -> None:
        parts = urlsplit(base_url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._path = f"/tasks/{task_id}"
        self.latencies_ms: list[float] = []
        self.errors = 0
        super().__init__()

    def _run(self) -> None:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=10)
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                conn.request("GET", self._path)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    self.errors += 1
            except (OSError, http.client.HTTPException):
                self.errors += 1
                conn.close()
                conn = http.client.HTTPConnection(self._host, self._port, timeout=10)
                continue
            self.latencies_ms.append((time.perf_counter() - started) * 1000)
            self._stop.wait(0.01)
        conn.close()

    def p50_p99(self) -> tuple[float, float]:
        return percentile(self.latencies_ms, 50), percentile(self.latencies_ms, 99)


class ConnectionSampler(Background):
    """The most connections to the database at any sample, every 50 ms."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.most = 0
        super().__init__()

    def _run(self) -> None:
        with connect(self._url) as conn:
            while not self._stop.is_set():
                (n,) = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()  # type: ignore[misc]
                self.most = max(self.most, int(n))
                self._stop.wait(0.05)


def run_one(url: str, concurrency: int, waves: int, idle_seconds: float) -> Run:
    truncate_tasks(url)
    probe = insert_tasks(url, 1, conversations=1, wake=False)  # the task the client GETs
    with connect(url) as conn:
        conn.execute("UPDATE tasks SET status = 'completed' WHERE id = %s", (probe.first,))
    settings = {
        "WORKER_CONCURRENCY": concurrency,
        "PROCESSING_MIN_SECONDS": 1,
        "PROCESSING_MAX_SECONDS": 1,
    }
    a = taskapp_server(url, "a", **settings)
    b = taskapp_server(url, "b", **settings)
    with a.start(), b.start():
        pids = a.worker_pids() + b.worker_pids()
        with Getter(a.url, probe.first) as idle:
            time.sleep(idle_seconds)  # a measurement window, not a synchronisation
        n = 2 * concurrency * waves
        cpu_before = cpu_seconds(pids)
        with ConnectionSampler(url) as sampler, Getter(a.url, probe.first) as busy:
            ids = insert_tasks(url, n, conversations=1)
            seconds = wait_completed(url, ids, timeout=waves * 10 + 60, interval=0.05)
        cpu = cpu_seconds(pids) - cpu_before
        rss = (rss_mb(pids[0]), rss_mb(pids[1]))
    run = Run(
        concurrency=concurrency,
        tasks=n,
        seconds=seconds,
        cpu_per_task_ms=cpu / n * 1000,
        max_connections=sampler.most,
        rss_mb=rss,
        idle_ms=idle.p50_p99(),
        busy_ms=busy.p50_p99(),
    )
    log(
        f"concurrency {concurrency}: {n / seconds:,.0f} tasks/s = {run.ratio:.2f}x ideal, "
        f"GET p99 idle {run.idle_ms[1]:.1f} ms busy {run.busy_ms[1]:.1f} ms, "
        f"{run.max_connections} connections, errors {idle.errors + busy.errors}"
    )
    return run


def run(args: argparse.Namespace) -> int:
    levels = [int(c) for c in args.concurrency.split(",")]
    waves = 4 if args.quick else args.waves
    idle_seconds = 1.0 if args.quick else 3.0
    runs: list[Run] = []
    with bench_database("inflight") as url:
        for concurrency in levels:
            runs.append(run_one(url, concurrency, waves, idle_seconds))
    rows = []
    ok = True
    for r in runs:
        judged = r.concurrency >= 64
        ratio_verdict = verdict(r.ratio, IDEAL_TARGET, at_least=True) if judged else ""
        p99 = max(r.idle_ms[1], r.busy_ms[1])
        p99_verdict = verdict(p99, P99_TARGET_MS, at_least=False, strict=True, unit=" ms")
        ok &= (not judged or r.ratio >= IDEAL_TARGET) and p99 < P99_TARGET_MS
        rows.append(
            [
                f"2 x {r.concurrency}",
                r.tasks,
                f"{r.seconds:.2f}",
                f"{r.tasks / r.seconds:,.0f}",
                f"{r.ideal:,.0f}",
                f"{r.ratio:.2f}x",
                ratio_verdict,
                f"{r.cpu_per_task_ms:.2f}",
                r.max_connections,
                f"{r.rss_mb[0]:.0f} / {r.rss_mb[1]:.0f}",
                f"{r.idle_ms[0]:.1f} / {r.idle_ms[1]:.1f}",
                f"{r.busy_ms[0]:.1f} / {r.busy_ms[1]:.1f}",
                p99_verdict,
            ]
        )
    print_table(
        f"1-second tasks in flight, 2 instances — {machine_line()}",
        [
            "instances x slots",
            "tasks",
            "seconds",
            "tasks/s",
            "ideal",
            "x ideal",
            "target",
            "CPU ms/task",
            "max conns",
            "RSS MiB a / b",
            "GET p50/p99 idle ms",
            "GET p50/p99 busy ms",
            "p99 target",
        ],
        rows,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0], default_timeout=900)
    p.add_argument("--waves", type=int, default=16, help="seconds of work per slot (default 16)")
    p.add_argument("--concurrency", default="16,64,200", help="comma-separated levels")
    main(run, p.parse_args())
