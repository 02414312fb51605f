"""Retention under load: a million expired tasks pruned while 2 instances drain new work.

    python -m bench.retention [--quick] [--history 1000000] [--tasks 50000] [--concurrency N]

The database first holds --history completed tasks (2 conversations each) last changed 30
days ago. Two instances drain --tasks new tasks twice, in the same run: first with no
retention (the baseline), then with RETENTION_COMPLETED_SECONDS of a week, so their
housekeepers prune the history while they drain. Reported: both drain rates and their ratio
(target ≥ 0.8 x), how many expired tasks were pruned during the second drain, how long the
whole history took to go, and that the new tasks and the counts are untouched and exact.
"""

from __future__ import annotations

import argparse
import contextlib
import time

from bench.common import (
    BenchError,
    bench_database,
    connect,
    insert_history,
    insert_tasks,
    log,
    machine_line,
    main,
    parser,
    print_table,
    taskapp_server,
    verdict,
    wait_completed,
)

TARGET = 0.8
WEEK = 7 * 86400


def expired(url: str) -> int:
    with connect(url) as conn:
        return conn.execute(
            "SELECT count(*) FROM tasks WHERE updated_at < now() - interval '7 days'"
        ).fetchone()[0]  # type: ignore[index]


def drain(url: str, tasks: int, concurrency: int, timeout: float, **env: object) -> tuple:
    """Drain `tasks` new tasks with 2 instances; return (seconds, expired before, after,
    seconds until no expired task was left, or None)."""
    with contextlib.ExitStack() as stack:
        for n in range(2):
            server = taskapp_server(url, name=f"taskapp-{n}", WORKER_CONCURRENCY=concurrency, **env)
            stack.enter_context(server)
            server.start()
        before = expired(url)
        ids = insert_tasks(url, tasks, wake=True)
        seconds = wait_completed(url, ids, timeout=timeout)
        after = expired(url)
        gone_after = None
        if env:
            deadline = time.perf_counter() + timeout
            while expired(url):
                if time.perf_counter() > deadline:
                    raise BenchError(f"expired tasks still left after {timeout}s")
                time.sleep(0.5)
            gone_after = time.perf_counter() - ids.committed_at
    return seconds, before, after, gone_after, ids


def run(args: argparse.Namespace) -> int:
    history = 10_000 if args.quick else args.history
    tasks = 1_000 if args.quick else args.tasks
    stamp = machine_line()
    with bench_database("retention") as url:
        log(f"loading {history:,} completed tasks 30 days old…")
        insert_history(url, history)
        with connect(url) as conn:
            conn.execute("UPDATE tasks SET updated_at = now() - interval '30 days'")
            conn.execute("VACUUM ANALYZE tasks")
        # A first drain warms the machine, the caches and the new instances' code paths up:
        # whichever run came first would otherwise look slower.
        drain(url, max(tasks // 5, 500), args.concurrency, args.drain_timeout)
        base, _, _, _, _ = drain(url, tasks, args.concurrency, args.drain_timeout)
        log(f"without retention: {tasks / base:,.0f} tasks/s")
        pruning, before, after, gone, ids = drain(
            url,
            tasks,
            args.concurrency,
            args.drain_timeout,
            RETENTION_COMPLETED_SECONDS=WEEK,
        )
        log(f"with retention: {tasks / pruning:,.0f} tasks/s, pruned {before - after:,} meanwhile")
        with connect(url) as conn:
            new_left = conn.execute(
                "SELECT count(*) FROM tasks WHERE id BETWEEN %s AND %s AND status = 'completed'",
                (ids.first, ids.last),
            ).fetchone()[0]  # type: ignore[index]
            kept = conn.execute("SELECT sum(n) FROM task_counts").fetchone()[0]  # type: ignore[index]
            true = conn.execute("SELECT count(*) FROM tasks").fetchone()[0]  # type: ignore[index]
    if new_left != tasks or kept != true:
        raise BenchError(f"new tasks left {new_left} of {tasks}; counts {kept} vs {true} rows")
    ratio = base / pruning
    print_table(
        f"Drain of {tasks:,} tasks while {history:,} expired ones are pruned — {stamp}",
        ["run", "seconds", "tasks/s", "x no pruning", "target"],
        [
            ["2 instances, no retention", base, tasks / base, "1.00x", ""],
            [
                "2 instances, pruning meanwhile",
                pruning,
                tasks / pruning,
                f"{ratio:.2f}x",
                verdict(ratio, TARGET, at_least=True),
            ],
        ],
    )
    print(
        f"pruned during that drain: {before - after:,}; whole history gone "
        f"{gone:.0f}s after the drain began ({history / gone:,.0f} tasks/s); "
        f"new tasks untouched ({new_left:,} completed), counts exact ({kept:,} = {true:,} rows)"
    )
    return 0


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0], default_timeout=1800)
    p.add_argument("--history", type=int, default=1_000_000)
    p.add_argument("--tasks", type=int, default=50_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--drain-timeout", type=float, default=900)
    main(run, p.parse_args())
