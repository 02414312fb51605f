"""Growth: the HTTP and drain figures with 1,000 vs. 1,000,000 completed tasks of history.

    python -m bench.growth [--quick] [--sizes 1000 1000000] [--seconds 5] [--tasks 20000]
                           [--rounds 2]

Each history size has a database of its own, loaded first:
  1. history: `size` completed tasks with 2 processed conversations each (generate_series),
     VACUUM ANALYZE, CHECKPOINT;
  2. SQL, with 1,000 pending tasks: the claim statement of taskapp/sql/queue.sql under EXPLAIN
     ANALYZE (rolled back), the queue-count query behind /status and /metrics, and the list's
     total count, each the median of 5 runs, with the plans printed.
Then the sizes take turns for `--rounds` rounds (small, big, small, big, ...), each round:
  3. HTTP (bench/http.py's suite, WORKER_ENABLED=0) with 1,000 new pending tasks: GET reads
     random tasks across the whole history, PUT updates random pending ones; plus GET /status
     and GET /metrics;
  4. drain (bench/drain.py): everything but the history is deleted, then `--tasks` tasks are
     drained by 2 taskapp instances, and (after deleting those) by the raw loop with 2
     processes; then those are deleted too.
Each figure is the median of its rounds; its baseline is the same figure at the smallest size,
in the same run. Target: the largest size costs at most 1.3x the smallest on every HTTP and
drain figure.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

from bench import raw_loop
from bench.common import (
    bench_database,
    connect,
    delete_tasks,
    insert_history,
    insert_tasks,
    log,
    machine_line,
    main,
    parser,
    print_table,
    taskapp_server,
    verdict,
)
from bench.drain import add_drain_args, drain_taskapp
from bench.http import Load, measure, taskapp_suite
from taskapp.statements import statement

TARGET = 1.3
PENDING_FOR_HTTP = 1000
# The worker's claim: complete_and_claim with nothing to complete.
CLAIM_PARAMS = {
    "task_ids": [],
    "lease_tokens": [],
    "results": [],
    "instance_id": "bench-explain",
    "queues": ["default"],
    "limits": [1],
    "lease_seconds": 30,
}


@dataclass
class Figures:
    """Everything measured at one history size."""

    size: int
    rates: dict[str, float] = field(default_factory=dict)  # higher is better
    cpu_ms: dict[str, float] = field(default_factory=dict)  # server CPU per request
    sql_ms: dict[str, float] = field(default_factory=dict)  # lower is better
    plans: dict[str, str] = field(default_factory=dict)
    rounds: dict[str, list[float]] = field(default_factory=dict)  # each round's value


def explain(url: str, sql: str, params: dict[str, object]) -> tuple[str, float]:
    """EXPLAIN (ANALYZE, BUFFERS) in a transaction that is rolled back: (plan, execution ms)."""
    with connect(url, autocommit=False) as conn:
        rows = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", params).fetchall()
        conn.rollback()
    plan = "\n".join(row[0] for row in rows)
    ms = float(plan.rsplit("Execution Time:", 1)[1].split()[0])
    return plan, ms


def timed(url: str, sql: str, runs: int = 5) -> float:
    """Median wall time in ms of a read-only statement, client round trip included."""
    times = []
    with connect(url) as conn:
        for _ in range(runs):
            started = time.perf_counter()
            conn.execute(sql).fetchall()
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def sql_figures(url: str, figures: Figures) -> None:
    claim = statement("complete_and_claim")
    claim_runs = [explain(url, claim, CLAIM_PARAMS) for _ in range(5)]
    figures.plans["claim"] = claim_runs[-1][0]
    figures.sql_ms["SQL claim (EXPLAIN ANALYZE)"] = statistics.median(ms for _, ms in claim_runs)
    counts = statement("queue_counts")
    figures.plans["queue_counts"] = explain(url, counts, {})[0]
    figures.sql_ms["SQL queue counts (/status, /metrics)"] = timed(url, counts)
    figures.sql_ms["SQL SELECT count(*) FROM tasks (list total)"] = timed(
        url, "SELECT count(*) FROM tasks"
    )


def load_size(url: str, size: int) -> Figures:
    """Load `size` completed tasks of history into an empty database and take its SQL figures."""
    figures = Figures(size)
    log(f"history of {size:,} completed tasks: loading")
    insert_history(url, size)
    insert_tasks(url, PENDING_FOR_HTTP, wake=False)  # something for the claim to find
    sql_figures(url, figures)
    delete_tasks(url, f"id > {size}")
    return figures


def measure_round(url: str, figures: Figures, load: Load, args: argparse.Namespace) -> None:
    """One round of the HTTP and drain figures at one size; the history is left as it was."""
    log(f"{figures.size:,} rows of history: HTTP and drain")
    pending = insert_tasks(url, PENDING_FOR_HTTP, wake=False)
    with taskapp_server(url, WORKER_ENABLED=0) as app:
        app.start()
        # GET reads random tasks across the whole history; PUT updates the pending ones.
        results = taskapp_suite(app, load, (1, figures.size), (pending.first, pending.last))
        results.append(measure(app, "GET /status", "/status", load))
        results.append(measure(app, "GET /metrics", "/metrics", load))
    for r in results:
        figures.rounds.setdefault(r.name + " (req/s)", []).append(r.rps)
        figures.rounds.setdefault(r.name + " (CPU ms/req)", []).append(r.cpu_ms)

    history = f"id > {figures.size}"  # the history's ids are 1..size: keep those
    delete_tasks(url, history)
    app_drain = drain_taskapp(
        url, 2, args.tasks, args.concurrency, args.drain_timeout, truncate=False
    )
    figures.rounds.setdefault(APP_DRAIN, []).append(app_drain.rate)
    delete_tasks(url, history)
    ids = insert_tasks(url, args.tasks, wake=False)
    seconds = raw_loop.drain(url, 2, timeout=args.drain_timeout)
    figures.rounds.setdefault(RAW_DRAIN, []).append(ids.count / seconds)
    delete_tasks(url, history)


def settle_rounds(figures: Figures) -> None:
    """Each figure is the median of its rounds."""
    for name, values in figures.rounds.items():
        target = figures.cpu_ms if name.endswith("(CPU ms/req)") else figures.rates
        target[name] = statistics.median(values)


INFO_ONLY = ("GET /status", "GET /metrics", "raw loop")
APP_DRAIN, RAW_DRAIN = "drain, taskapp x2 (tasks/s)", "drain, raw loop x2 (tasks/s)"


def growth_rows(small: Figures, big: Figures) -> list[list[object]]:
    """Cost ratios big vs. small: time per request or task, CPU per request, SQL time."""
    rows: list[list[object]] = []
    for name, rate in small.rates.items():
        cost = rate / big.rates[name]
        info = any(tag in name for tag in INFO_ONLY)
        target = "(info)" if info else verdict(cost, TARGET, at_least=False)
        rows.append([name, rate, big.rates[name], f"{cost:.2f}x", target])
    # The drain figures move with the machine's load; the raw loop's, taken right after at the
    # same size, moves the same way, so their quotient shows taskapp's own share of the cost.
    small_share = small.rates[APP_DRAIN] / small.rates[RAW_DRAIN]
    big_share = big.rates[APP_DRAIN] / big.rates[RAW_DRAIN]
    rows.append(
        [
            "drain, taskapp x2 / raw loop x2",
            small_share,
            big_share,
            f"{small_share / big_share:.2f}x",
            "(info)",
        ]
    )
    for name, ms in [*small.cpu_ms.items(), *small.sql_ms.items()]:
        big_ms = {**big.cpu_ms, **big.sql_ms}[name]
        label = name.replace("SQL", "SQL ms:")
        rows.append([label, ms, big_ms, f"{big_ms / ms:.2f}x", "(info)"])
    return rows


def run(args: argparse.Namespace) -> int:
    sizes = [1_000, 10_000] if args.quick else sorted(args.sizes)
    if args.quick:
        args.tasks, args.rounds = 1000, 1
    load = Load(seconds=1.0 if args.quick else args.seconds, connections=args.connections)
    stamp = machine_line()
    with bench_database("growth_small") as small_url, bench_database("growth_big") as big_url:
        small, big = load_size(small_url, sizes[0]), load_size(big_url, sizes[-1])
        # The sizes take turns, round after round, so a slow spell of the machine falls on
        # both instead of on whichever size happened to run during it.
        for n in range(args.rounds):
            log(f"round {n + 1} of {args.rounds}")
            measure_round(small_url, small, load, args)
            measure_round(big_url, big, load, args)
    for figures in (small, big):
        settle_rounds(figures)
    for f in (small, big):
        print(f"\n#### Claim plan with {f.size:,} rows of history\n\n```\n{f.plans['claim']}\n```")
    print(
        f"\n#### Queue counts plan with {big.size:,} rows of history\n\n"
        f"```\n{big.plans['queue_counts']}\n```"
    )
    print_table(
        f"Growth: {small.size:,} vs. {big.size:,} completed tasks of history "
        f"(HTTP {load.connections} connections, {load.seconds:g} s; drain {args.tasks:,} tasks; "
        f"median of {args.rounds} alternating round(s)) "
        f"— {stamp}",
        ["figure", f"{small.size:,} rows", f"{big.size:,} rows", "cost ratio", "target"],
        growth_rows(small, big),
    )
    return 0


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0], default_timeout=2400)
    p.add_argument("--sizes", type=int, nargs=2, default=[1_000, 1_000_000])
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per endpoint")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of both sizes")
    add_drain_args(p)
    main(run, p.parse_args())
