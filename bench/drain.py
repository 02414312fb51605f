"""Queue drain: 20,000 tasks through taskapp (1 and 2 instances) vs. the raw psycopg loop.

    python -m bench.drain [--quick] [--tasks 20000] [--concurrency N]

Each instance is one gunicorn process (`gunicorn -c gunicorn.conf.py wsgi:app`) with the
instant processor (PROCESSING_MIN/MAX_SECONDS=0) and WORKER_CONCURRENCY work slots (from
--concurrency, default: $WORKER_CONCURRENCY or 32, so the dispatcher can batch). The instances
start on an empty queue; the tasks (2 conversations each) are inserted in one transaction that
notifies `taskapp_wakeup`, and the clock runs from that commit until every task is `completed`.
The baseline, bench/raw_loop.py, drains the same load with the same number of processes; each
taskapp run follows its baseline directly, so the pair sees the same machine. Target: 2
instances ≥ 0.6 x raw loop, 2 processes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import dataclass

from bench import raw_loop
from bench.common import (
    bench_database,
    insert_tasks,
    log,
    machine_line,
    main,
    parser,
    pinned_cpu,
    print_table,
    taskapp_server,
    truncate_tasks,
    verdict,
    wait_completed,
)

TARGET = 0.6  # 2 instances vs. 2 raw processes


@dataclass(frozen=True)
class DrainResult:
    who: str
    processes: int
    tasks: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds


def drain_raw(url: str, processes: int, tasks: int, timeout: float) -> DrainResult:
    truncate_tasks(url)
    ids = insert_tasks(url, tasks, wake=False)
    seconds = raw_loop.drain(url, processes, timeout=timeout)
    result = DrainResult("raw loop", processes, ids.count, seconds)
    log(f"raw loop x{processes}: {result.rate:,.0f} tasks/s")
    return result


def drain_taskapp(
    url: str,
    instances: int,
    tasks: int,
    concurrency: int,
    timeout: float,
    *,
    truncate: bool = True,
    conversations: int = 2,
    poll: float = 0.1,
    pin: bool = False,
) -> DrainResult:
    """Start `instances` taskapp instances on an empty queue, then time a drain of `tasks`
    (each with `conversations` conversations; bench/peers.py drains them with none), polling
    every `poll` seconds for the end. `pin`: instance n on pinned_cpu(n) (CPU_AFFINITY)."""
    if truncate:
        truncate_tasks(url)
    with contextlib.ExitStack() as stack:
        for n in range(instances):
            server = taskapp_server(
                url,
                name=f"taskapp-{n}",
                cpu=pinned_cpu(n) if pin else None,
                WORKER_CONCURRENCY=concurrency,
            )
            stack.enter_context(server)
            server.start()
        ids = insert_tasks(url, tasks, conversations=conversations, wake=True)
        seconds = wait_completed(url, ids, timeout=timeout, interval=poll)
    result = DrainResult("taskapp", instances, ids.count, seconds)
    log(f"taskapp x{instances} (concurrency {concurrency}): {result.rate:,.0f} tasks/s")
    return result


def paired_rows(
    pairs: list[tuple[DrainResult, DrainResult]], concurrency: int
) -> list[list[object]]:
    rows: list[list[object]] = []
    for raw, app in pairs:
        ratio = app.rate / raw.rate
        target = verdict(ratio, TARGET, at_least=True) if app.processes == 2 else ""
        rows.append(
            [
                f"raw loop, {raw.processes} process(es)",
                raw.tasks,
                raw.seconds,
                raw.rate,
                "1.00x",
                "",
            ]
        )
        rows.append(
            [
                f"taskapp, {app.processes} instance(s) x {concurrency} thread(s)",
                app.tasks,
                app.seconds,
                app.rate,
                f"{ratio:.2f}x",
                target,
            ]
        )
    return rows


HEADERS = ["run", "tasks", "seconds", "tasks/s", "x raw", "target"]


def run(args: argparse.Namespace) -> int:
    tasks = 1000 if args.quick else args.tasks
    stamp = machine_line()
    pairs = []
    with bench_database("drain") as url:
        for processes in (1, 2):
            raw = drain_raw(url, processes, tasks, args.drain_timeout)
            app = drain_taskapp(url, processes, tasks, args.concurrency, args.drain_timeout)
            pairs.append((raw, app))
    print_table(
        f"Queue drain of {tasks:,} tasks (instant processor) — {stamp}",
        HEADERS,
        paired_rows(pairs, args.concurrency),
    )
    return 0


def add_drain_args(p: argparse.ArgumentParser, *, concurrency: int = 32) -> None:
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument(
        "--concurrency",
        type=int,
        default=int(os.environ.get("WORKER_CONCURRENCY") or concurrency),
        help=f"WORKER_CONCURRENCY of each instance (default: $WORKER_CONCURRENCY or {concurrency})",
    )
    p.add_argument("--drain-timeout", type=float, default=600, help="seconds allowed per drain")


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0], default_timeout=1800)
    add_drain_args(p)
    main(run, p.parse_args())
