"""Sustained drain: 2 instances at full speed for 10 minutes while the history grows.

    python -m bench.sustained [--quick] [--minutes 10] [--backlog 8000] [--concurrency N]
                              [--compare]

A feeder keeps at least --backlog tasks pending (2 conversations each, inserted in chunks),
so the two instances never run dry, and every completed task stays in the table as history
(hundreds of thousands of rows by the end). Completions are counted every second from the
kept counts (task_counts). Reported: the rate of the first and of the last minute and their
ratio (target: last ≥ 0.8 x first), and the tables before and after: size, live and dead
rows, the share of updates that were HOT, and how often autovacuum ran.

With --compare, the same run is repeated on a database whose tables have PostgreSQL's
default storage settings (migration 0010 reset): what the hygiene settings buy.

Autovacuum is half of what is measured, so when the server at BENCH_PG_URL has it off (this
project's CI machines do), the runs go to a private PostgreSQL with stock settings instead,
started for the bench (tools/embedded_pg.py) and removed afterwards.
--quick: 20 s per run, windows of 5 s.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    PG_ADMIN_URL,
    BenchError,
    bench_database,
    connect,
    insert_tasks,
    log,
    machine_line,
    main,
    migrate_schema,
    parser,
    print_table,
    taskapp_server,
    verdict,
)

TARGET = 0.8
TABLES = ("tasks", "conversations", "task_counts")
_TABLE_STATS = """
SELECT c.relname, pg_total_relation_size(c.oid), pg_indexes_size(c.oid),
       s.n_live_tup, s.n_dead_tup, s.n_tup_upd, s.n_tup_hot_upd, s.autovacuum_count
FROM pg_class AS c JOIN pg_stat_user_tables AS s ON s.relid = c.oid
WHERE c.relname = ANY(%s)
ORDER BY array_position(%s, c.relname::text)
"""


@dataclass(frozen=True)
class TableStats:
    name: str
    total_bytes: int
    index_bytes: int
    live: int
    dead: int
    updates: int
    hot_updates: int
    autovacuums: int


def table_stats(url: str) -> list[TableStats]:
    with connect(url) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        rows = conn.execute(_TABLE_STATS, (list(TABLES), list(TABLES))).fetchall()
    return [TableStats(*row) for row in rows]


def counted(conn, status: str) -> int:  # type: ignore[no-untyped-def]
    """Tasks of this status, from the counts the triggers keep (cheap at any table size)."""
    row = conn.execute("SELECT coalesce(sum(n), 0) FROM task_counts WHERE status = %s", (status,))
    return int(row.fetchone()[0])


class Feeder(threading.Thread):
    """Keeps at least `backlog` tasks pending, a chunk of `backlog` at a time."""

    def __init__(self, url: str, backlog: int) -> None:
        super().__init__(name="feeder", daemon=True)
        self.url, self.backlog = url, backlog
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.ran_dry = 0  # checks that found nothing pending while the instances ran

    def run(self) -> None:
        try:
            with connect(self.url) as conn:
                while not self.stop.is_set():
                    left = counted(conn, "pending")
                    if left == 0:
                        self.ran_dry += 1
                    if left < self.backlog:
                        insert_tasks(self.url, self.backlog, analyze=False, wake=True)
                    else:
                        self.stop.wait(0.1)
        except BaseException as exc:  # reported by the run, not lost in a thread
            self.error = exc


@dataclass(frozen=True)
class Run:
    label: str
    seconds: float
    window: float
    samples: list[tuple[float, int]]  # (seconds since the start, completed so far)
    before: list[TableStats]
    after: list[TableStats]
    ran_dry: int

    def rate(self, start: float, end: float) -> float:
        """Completions per second between two times, from the nearest samples."""
        first = min(self.samples, key=lambda s: abs(s[0] - start))
        last = min(self.samples, key=lambda s: abs(s[0] - end))
        return (last[1] - first[1]) / (last[0] - first[0])

    @property
    def first_rate(self) -> float:
        return self.rate(0, self.window)

    @property
    def last_rate(self) -> float:
        return self.rate(self.seconds - self.window, self.seconds)

    @property
    def total(self) -> int:
        return self.samples[-1][1] - self.samples[0][1]


def sustain(url: str, label: str, seconds: float, window: float, args: argparse.Namespace) -> Run:
    before = table_stats(url)
    samples: list[tuple[float, int]] = []
    feeder = Feeder(url, args.backlog)
    with contextlib.ExitStack() as stack:
        for n in range(2):
            server = taskapp_server(url, name=f"taskapp-{n}", WORKER_CONCURRENCY=args.concurrency)
            stack.enter_context(server)
            server.start()
        feeder.start()
        stack.callback(feeder.join, 30)
        stack.callback(feeder.stop.set)
        with connect(url) as conn:
            # The clock starts once the backlog is there and the instances are at work.
            while counted(conn, "completed") == 0:
                if feeder.error:
                    raise BenchError(f"the feeder failed: {feeder.error}")
                time.sleep(0.05)
            started = time.perf_counter()
            while (now := time.perf_counter() - started) <= seconds:
                samples.append((now, counted(conn, "completed")))
                if feeder.error:
                    raise BenchError(f"the feeder failed: {feeder.error}")
                time.sleep(1.0)
    run = Run(label, seconds, window, samples, before, table_stats(url), feeder.ran_dry)
    log(
        f"{label}: first {window:.0f}s {run.first_rate:,.0f}/s, last {run.last_rate:,.0f}/s"
        f" ({run.last_rate / run.first_rate:.2f}x), {run.total:,} tasks"
    )
    return run


@contextlib.contextmanager
def stock_server() -> Iterator[str | None]:
    """None when BENCH_PG_URL's server runs autovacuum; else the admin URL of a private
    PostgreSQL with stock settings, for the length of the bench."""
    with connect(PG_ADMIN_URL) as conn:
        autovacuum = conn.execute("SHOW autovacuum").fetchone()[0]  # type: ignore[index]
    if autovacuum == "on":
        yield None
        return
    from tools.embedded_pg import EmbeddedPostgres

    log("autovacuum is off on BENCH_PG_URL's server: starting a private stock PostgreSQL")
    with tempfile.TemporaryDirectory(prefix="bench-sustained-") as scratch:
        server = EmbeddedPostgres(Path(scratch) / "pgdata")
        # tempfile's directory is root's; the server may run as another user (see embedded_pg).
        Path(scratch).chmod(0o755)
        with server:
            yield server.url()


@contextlib.contextmanager
def fresh_database(admin_url: str | None, n: int) -> Iterator[str]:
    if admin_url is None:
        with bench_database("sustained") as url:
            yield url
        return
    name = f"sustained_{n}"
    with connect(admin_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    migrate_schema(url)
    yield url


def reset_hygiene(url: str) -> None:
    """Back to PostgreSQL's defaults: reset whatever storage options the tables have (the
    migrations set them; read from pg_class, so no copy of them is kept here)."""
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT relname, reloptions FROM pg_class"
            " WHERE relname = ANY(%s) AND reloptions IS NOT NULL",
            (list(TABLES),),
        ).fetchall()
        for table, options in rows:
            names = ", ".join(option.split("=", 1)[0] for option in options)
            conn.execute(f"ALTER TABLE {table} RESET ({names})")


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def run(args: argparse.Namespace) -> int:
    seconds = 20.0 if args.quick else args.minutes * 60.0
    window = 5.0 if args.quick else 60.0
    if seconds < 2 * window:
        raise BenchError(f"a run of {seconds:.0f}s has no separate first and last {window:.0f}s")
    stamp = machine_line()
    runs: list[Run] = []
    arms = [("settings of migration 0010", False)]
    if args.compare:
        arms.append(("PostgreSQL's defaults", True))
    with stock_server() as admin_url:
        where = "BENCH_PG_URL's server" if admin_url is None else "a private stock server"
        for n, (label, defaults) in enumerate(arms):
            with fresh_database(admin_url, n) as url:
                if defaults:
                    reset_hygiene(url)
                runs.append(sustain(url, label, seconds, window, args))

    rows = []
    for r in runs:
        ratio = r.last_rate / r.first_rate
        rows.append(
            [
                r.label,
                f"{r.total:,}",
                f"{r.first_rate:,.0f}",
                f"{r.last_rate:,.0f}",
                f"{ratio:.2f}x",
                verdict(ratio, TARGET, at_least=True),
            ]
        )
    print_table(
        f"Sustained drain, 2 instances x {args.concurrency} threads, {seconds:.0f} s,"
        f" first and last {window:.0f} s — {stamp}",
        ["tables", "tasks", "first tasks/s", "last tasks/s", "last/first", "target"],
        rows,
    )
    table_rows = []
    for r in runs:
        for b, a in zip(r.before, r.after, strict=True):
            updates = a.updates - b.updates
            hot = a.hot_updates - b.hot_updates
            table_rows.append(
                [
                    r.label,
                    a.name,
                    f"{mib(b.total_bytes)} → {mib(a.total_bytes)}",
                    f"{mib(b.index_bytes)} → {mib(a.index_bytes)}",
                    f"{a.live:,}",
                    f"{a.dead:,}",
                    f"{hot / updates:.0%}" if updates else "-",
                    a.autovacuums - b.autovacuums,
                ]
            )
    print_table(
        "Tables before → after (MiB; rows and autovacuums at the end)",
        ["tables", "table", "total MiB", "indexes MiB", "live", "dead", "HOT", "autovacuums"],
        table_rows,
    )
    print(f"- PostgreSQL: {where}, autovacuum on.\n")
    if any(r.ran_dry for r in runs):
        log("note: the backlog ran dry at times; raise --backlog for a full-speed run")
    return 0


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0], default_timeout=3600)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--backlog", type=int, default=8000, help="pending tasks kept at least")
    p.add_argument("--concurrency", type=int, default=32, help="WORKER_CONCURRENCY")
    p.add_argument("--compare", action="store_true", help="also run on default table settings")
    main(run, p.parse_args())
