"""Memory: RSS of one taskapp instance idle, and after draining 100,000 tasks.

    python -m bench.memory [--quick] [--tasks 100000] [--concurrency N]

RSS is VmRSS of the instance (the gunicorn worker process) read from /proc. Stages: idle
(started, no request, settled 3 s), warm (after a 1,000-task drain: caches and pools filled),
during the big drain (peak, sampled every 0.5 s) and after it (settled 3 s). The baseline is
the hello-world gunicorn worker (bench/hello_app.py, same gunicorn settings) idle, in the
same run. Targets: idle < 120 MB; after the drain at most 10 % above idle.
"""

from __future__ import annotations

import argparse
import threading
import time

from bench.common import (
    BenchError,
    Server,
    bench_database,
    hello_server,
    insert_tasks,
    log,
    machine_line,
    main,
    parser,
    print_table,
    rss_mb,
    taskapp_server,
    verdict,
    wait_completed,
)
from bench.drain import add_drain_args

TARGET_IDLE_MB = 120.0
TARGET_GROWTH = 0.10
SETTLE_SECONDS = 3.0
WARMUP_TASKS = 1000


def instance_pid(server: Server) -> int:
    pids = server.worker_pids()
    if len(pids) != 1:
        raise BenchError(f"{server.name}: expected one worker process, found {pids}")
    return pids[0]


class PeakSampler:
    """Samples a process's RSS in a thread; .peak is the highest seen."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def run(args: argparse.Namespace) -> int:
    tasks = 1_500 if args.quick else args.tasks
    stamp = machine_line()
    with hello_server() as hello:
        hello.start()
        time.sleep(SETTLE_SECONDS)
        hello_mb = rss_mb(instance_pid(hello))
    with (
        bench_database("memory") as url,
        taskapp_server(url, WORKER_CONCURRENCY=args.concurrency) as app,
    ):
        app.start()
        pid = instance_pid(app)
        time.sleep(SETTLE_SECONDS)
        idle = rss_mb(pid)
        log(f"idle: {idle:.1f} MB")
        wait_completed(url, insert_tasks(url, WARMUP_TASKS), timeout=args.drain_timeout)
        time.sleep(SETTLE_SECONDS)
        warm = rss_mb(pid)
        log(f"after {WARMUP_TASKS:,} tasks: {warm:.1f} MB")
        with PeakSampler(pid) as sampler:
            ids = insert_tasks(url, tasks)
            seconds = wait_completed(url, ids, timeout=args.drain_timeout)
        time.sleep(SETTLE_SECONDS)
        after = rss_mb(pid)
        log(f"after {tasks:,} more tasks ({tasks / seconds:,.0f} tasks/s): {after:.1f} MB")
    growth = after / idle - 1
    rows = [
        ["hello world worker, idle (baseline)", hello_mb, "", "", ""],
        [
            "taskapp instance, idle",
            idle,
            f"{idle / hello_mb:.2f}x",
            "",
            verdict(idle, TARGET_IDLE_MB, at_least=False, strict=True, unit=" MB"),
        ],
        [
            f"after a {WARMUP_TASKS:,}-task warm-up",
            warm,
            f"{warm / hello_mb:.2f}x",
            f"{warm / idle - 1:+.1%}",
            "",
        ],
        [
            f"peak during the {tasks:,}-task drain",
            sampler.peak,
            f"{sampler.peak / hello_mb:.2f}x",
            f"{sampler.peak / idle - 1:+.1%}",
            "",
        ],
        [
            f"after the {tasks:,}-task drain",
            after,
            f"{after / hello_mb:.2f}x",
            f"{growth:+.1%}",
            verdict(growth * 100, TARGET_GROWTH * 100, at_least=False, unit=" %"),
        ],
    ]
    print_table(
        f"Memory (VmRSS) of one instance, WORKER_CONCURRENCY={args.concurrency} — {stamp}",
        ["stage", "RSS MB", "x hello", "vs idle", "target"],
        rows,
    )
    return 0


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0], default_timeout=1800)
    add_drain_args(p)
    p.set_defaults(tasks=100_000, drain_timeout=1500)
    main(run, p.parse_args())
