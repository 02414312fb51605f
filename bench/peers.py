"""Peers: taskapp's 2-instance drain of no-op tasks vs. PgQueuer's and procrastinate's.

    python -m bench.peers [--quick] [--tasks 20000] [--rounds 3] [--concurrency N]
                          [--conversations 0] [--pgqueuer-batch-size 100]
                          [--procrastinate-concurrency 30] [--pgbench-seconds 5]
                          [--pgbench-batches 10 100] [--setup] [--pin]

Three drains of the same N tasks that do nothing, in the same run, each on a database of its
own on the same PostgreSQL, each with 2 worker processes, in `--rounds` rounds whose order
alternates (taskapp, PgQueuer, procrastinate; then the reverse; ...); each figure is the
median over the rounds:
  1. taskapp: bench/drain.py's drain_taskapp() with 2 instances of `--concurrency` work slots
     (default 200: hundreds in flight, a claim of up to 200 tasks), on tasks with
     `--conversations` conversations (default 0: nothing for the processor to do);
  2. PgQueuer: `pgq install` and `pgq autovac`, then 2 x `pgq run bench.peers:pgqueuer_factory`
     (one asyncpg connection each, an entrypoint that returns at once); N jobs enqueued in one
     batch (Queries.enqueue with lists); done when its queue table is empty and its log holds
     N `successful` rows. Settings from its performance-tuning guide: the asyncpg driver on a
     dedicated connection, `pgq autovac`, and a batch_size raised for short jobs (it names no
     value; 100 drained fastest of 10 / 25 / 100 here); max_concurrent_tasks unset (a safety
     ceiling); durability `durable`, its default, whose tables are logged like taskapp's;
  3. procrastinate: `procrastinate schema --apply`, then 2 x `procrastinate worker
     --concurrency 30` (its concurrency guide's example: async sub-workers per process), N jobs
     deferred with Task.batch_defer_async; done when all N jobs are `succeeded`.
The clock runs from the commit of the load (taken in the process that made it) until the
first poll that finds the load done (every 20 ms for all three: the drains take about a
second); every run starts its workers on an empty queue and waits until their connections
are idle before it loads. Also reported: pgbench running taskapp's own claim statement
(complete_and_claim from taskapp/sql/queue.sql, as the service runs it: generic plan, no JIT)
with no Python at all, 2 clients completing and claiming 10 and 100 tasks per transaction
(tasks/s = tps x batch): the database's own limit. `--pin` puts process n of every system on
a CPU of its own (taskapp's instance n by its CPU_AFFINITY, the peers' worker n by taskset;
PostgreSQL runs anywhere), the deployment taskapp's README recommends where instances have
cores to themselves; PgQueuer drains no faster or slower for it. Targets: taskapp ≥ 1.2 x
PgQueuer and ≥ 10 x procrastinate.

The peers are installed from the package index, at the versions pinned in
bench/requirements-peers.txt, into a venv of their own (bench/.venv-peers, made on the first run
and again whenever that file changes); their processes run from this checkout with that venv's
Python, so `bench.peers` is importable there. `--setup` only makes that venv. Exit code 3: the
peers could not be installed (is the package index reachable?).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_DIR,
    ROOT,
    BenchError,
    VenvUnavailable,
    add_pin_arg,
    bench_database,
    connect,
    insert_tasks,
    log,
    machine_line,
    main,
    on_cpu,
    parser,
    pinned_cpu,
    print_table,
    truncate_tasks,
    venv_python,
    venv_versions,
    verdict,
)
from bench.drain import DrainResult, add_drain_args, drain_taskapp

PEERS_VENV = BENCH_DIR / ".venv-peers"
PEERS_REQUIREMENTS = BENCH_DIR / "requirements-peers.txt"
PEER_PACKAGES = ("pgqueuer", "asyncpg", "typer", "procrastinate", "psycopg")
INSTALL_FAILED = 3  # exit code when the peers can't be installed
PROCESSES = 2  # worker processes per system: taskapp's 2 instances, 2 consumers, 2 workers
NOOP = "noop"  # the entrypoint / task name of the peers' no-op job
DSN_ENV = "BENCH_PEERS_DSN"  # how a peer process is told its database
TARGETS = {"PgQueuer": 1.2, "procrastinate": 10.0}  # taskapp ≥ target x peer
# The done-poll of all three drains. 20,000 jobs drain in about a second, where a 100 ms poll
# (bench/drain.py's) would cost up to 10 %. The probe is one LIMIT 1 query.
PEER_POLL_SECONDS = 0.02
# How pgbench runs the claim: as the service does (taskapp.database: no JIT, generic plan).
PGBENCH_OPTIONS = "-c jit=off -c plan_cache_mode=force_generic_plan"


class PeersUnavailable(BenchError):
    """The peers' venv could not be made (no package index, or a pin that does not install)."""


# -- the peers' venv ----------------------------------------------------------------------------


def peers_python() -> Path:
    """The peers' venv's Python, made (or remade) when missing or out of date."""
    try:
        return venv_python(PEERS_VENV, PEERS_REQUIREMENTS.read_text(), "the peers")
    except VenvUnavailable as exc:
        raise PeersUnavailable(str(exc)) from None


def peer_env(dsn: str) -> dict[str, str]:
    env = {**os.environ, DSN_ENV: dsn, "PYTHONPATH": str(ROOT)}
    env.pop("VIRTUAL_ENV", None)
    return env


def run_peer(python: Path, args: list[str], dsn: str, *, timeout: float = 300, **env: str) -> str:
    """Run Python code (`-c ...`) or a console script of the peers' venv to completion."""
    cmd = [str(python), *args] if args[0] == "-c" else [str(python.parent / args[0]), *args[1:]]
    done = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**peer_env(dsn), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise BenchError(
            f"{' '.join(args[:3])} … failed ({done.returncode}):\n{done.stderr[-3000:]}"
        )
    return done.stdout


def with_app_name(dsn: str, name: str) -> str:
    """The DSN with an application_name, so the bench can find the process's connections."""
    return f"{dsn}{'&' if '?' in dsn else '?'}application_name={name}"


# -- the peers' own code: runs in the peers' venv -----------------------------------------------


@contextlib.asynccontextmanager
async def pgqueuer_factory() -> Any:
    """The consumer `pgq run bench.peers:pgqueuer_factory` starts: PgQueuer's documented
    factory (an async context manager yielding a PgQueuer) on one asyncpg connection, with
    one entrypoint that does nothing."""
    import asyncpg
    from pgqueuer import PgQueuer
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job

    connection = await asyncpg.connect(os.environ[DSN_ENV])
    pgq = PgQueuer(AsyncpgDriver(connection))

    @pgq.entrypoint(NOOP)
    async def noop(job: Job) -> None:
        return None

    try:
        yield pgq
    finally:
        if not connection.is_closed():
            await connection.close()


def _procrastinate_app() -> Any:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=os.environ[DSN_ENV]))

    @app.task(name=NOOP)
    async def noop() -> None:
        return None

    return app


def __getattr__(name: str) -> Any:
    # `procrastinate --app=bench.peers.procrastinate_app`: built on first use, so importing
    # this module needs no procrastinate (the bench itself runs in the project's venv).
    if name == "procrastinate_app":
        app = _procrastinate_app()
        globals()[name] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


async def _enqueue_pgqueuer(n: int) -> float:
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    connection = await asyncpg.connect(os.environ[DSN_ENV])
    try:
        # One statement in autocommit: the batch commits when the call returns.
        await Queries(AsyncpgDriver(connection)).enqueue([NOOP] * n, [None] * n, [0] * n)
        return time.monotonic()
    finally:
        await connection.close()


async def _enqueue_procrastinate(n: int) -> float:
    app = __getattr__("procrastinate_app")
    async with app.open_async():
        await app.tasks[NOOP].batch_defer_async(*({} for _ in range(n)))
        return time.monotonic()


def enqueue_main(peer: str, n: int) -> None:
    """Enqueue n no-op jobs in one batch; print the monotonic clock at their commit."""
    import asyncio

    enqueue = {"pgqueuer": _enqueue_pgqueuer, "procrastinate": _enqueue_procrastinate}[peer]
    print(f"COMMITTED {asyncio.run(enqueue(n))!r}", flush=True)


# -- running a peer -----------------------------------------------------------------------------


@dataclass
class Peer:
    name: str  # as shown in the table
    key: str  # pgqueuer / procrastinate
    settings: str  # what the table's notes say about how it ran
    install: Callable[[Path, str], None]
    worker_cmd: Callable[[Path, int], list[str]]
    reset_sql: str
    open_probe: str  # a row while jobs are still open
    done_probe: str  # how many jobs ended successfully
    url: str = ""
    python: Path = field(default=Path(), repr=False)
    pin: bool = False  # --pin: worker process n on pinned_cpu(n), as taskapp's instance n is


def pgqueuer_peer(batch_size: int, max_concurrent: int | None) -> Peer:
    def install(python: Path, url: str) -> None:
        # Its documented CLI; it reads the database from PGDSN.
        run_peer(python, ["pgq", "install"], url, PGDSN=url)
        run_peer(python, ["pgq", "autovac"], url, PGDSN=url)

    def worker(python: Path, n: int) -> list[str]:
        cmd = [str(python.parent / "pgq"), "run", "bench.peers:pgqueuer_factory"]
        cmd += ["--batch-size", str(batch_size)]
        if max_concurrent:
            cmd += ["--max-concurrent-tasks", str(max_concurrent)]
        return cmd

    cap = f", max_concurrent_tasks {max_concurrent}" if max_concurrent else ""
    return Peer(
        name="PgQueuer",
        key="pgqueuer",
        settings=(
            f"`pgq run` x {PROCESSES}, asyncpg driver (one connection per consumer), "
            f"batch_size {batch_size}{cap}, durability durable (the default: all tables "
            "logged, like taskapp's), `pgq autovac` applied"
        ),
        install=install,
        worker_cmd=worker,
        reset_sql="TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics",
        open_probe="SELECT 1 FROM pgqueuer LIMIT 1",
        done_probe="SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'",
    )


def procrastinate_peer(concurrency: int) -> Peer:
    app = "--app=bench.peers.procrastinate_app"

    def install(python: Path, url: str) -> None:
        run_peer(python, ["procrastinate", app, "schema", "--apply"], url)

    def worker(python: Path, n: int) -> list[str]:
        cmd = [str(python.parent / "procrastinate"), app, "worker"]
        return [*cmd, "--name", f"bench-{n}", "--concurrency", str(concurrency)]

    return Peer(
        name="procrastinate",
        key="procrastinate",
        settings=(
            f"`procrastinate worker` x {PROCESSES}, concurrency {concurrency}, "
            "PsycopgConnector (psycopg pool), listen_notify on, finished jobs kept (the default)"
        ),
        install=install,
        worker_cmd=worker,
        reset_sql="TRUNCATE procrastinate_jobs, procrastinate_events CASCADE",
        open_probe="SELECT 1 FROM procrastinate_jobs WHERE status IN ('todo', 'doing') LIMIT 1",
        done_probe="SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'",
    )


class PeerWorkers:
    """The peer's worker processes, each in its own session; stopped (then killed) on exit."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def app_name(self, n: int) -> str:
        return f"bench-peers-{self.peer.key}-{os.getpid()}-{n}"

    def start(self) -> None:
        for n in range(PROCESSES):
            fd, path = tempfile.mkstemp(prefix=f"bench-{self.peer.key}-{n}-", suffix=".log")
            proc = subprocess.Popen(
                on_cpu(
                    pinned_cpu(n) if self.peer.pin else None,
                    self.peer.worker_cmd(self.peer.python, n),
                ),
                cwd=ROOT,
                env=peer_env(with_app_name(self.peer.url, self.app_name(n))),
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                start_new_session=True,
            )
            os.close(fd)
            self.procs.append((proc, Path(path)))

    def check_alive(self) -> None:
        for proc, path in self.procs:
            if proc.poll() is not None:
                tail = path.read_text(errors="replace")[-3000:]
                raise BenchError(f"{self.peer.name} worker exited ({proc.returncode}):\n{tail}")

    def wait_idle(self, timeout: float = 60.0, quiet: float = 0.5) -> None:
        """Until every worker has connected and none of its connections has done anything for
        `quiet` seconds: started and waiting for work."""
        probe = """
            SELECT count(DISTINCT application_name),
                   count(*) FILTER (WHERE state <> 'idle'
                                    OR state_change > now() - make_interval(secs => %s))
            FROM pg_stat_activity
            WHERE datname = current_database() AND application_name LIKE %s
        """
        pattern = f"bench-peers-{self.peer.key}-{os.getpid()}-%"
        deadline = time.monotonic() + timeout
        with connect(self.peer.url) as conn:
            while True:
                self.check_alive()
                names, busy = conn.execute(probe, (quiet, pattern)).fetchone()  # type: ignore[misc]
                if names == PROCESSES and busy == 0:
                    return
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.peer.name} workers not idle after {timeout}s")
                time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc, path in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{self.peer.name} worker {proc.pid} did not stop in {timeout}s; killed it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if not os.environ.get("BENCH_KEEP_LOGS"):
                path.unlink(missing_ok=True)
        self.procs = []

    def __enter__(self) -> PeerWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def drain_peer(peer: Peer, tasks: int, timeout: float) -> DrainResult:
    """Start the peer's workers on an empty queue, enqueue `tasks` no-op jobs in one batch,
    and time them from that commit until all have succeeded."""
    with connect(peer.url) as conn:
        conn.execute(peer.reset_sql)
    with PeerWorkers(peer) as workers:
        workers.start()
        workers.wait_idle()
        out = run_peer(peer.python, ["-c", _enqueue_code(peer.key, tasks)], peer.url)
        match = re.search(r"^COMMITTED (\S+)$", out, re.M)
        if match is None:
            raise BenchError(f"{peer.name} enqueue printed no commit time:\n{out}")
        committed_at = float(match.group(1))
        deadline = time.monotonic() + timeout
        with connect(peer.url) as conn:
            while conn.execute(peer.open_probe).fetchone() is not None:
                if time.monotonic() > deadline:
                    raise BenchError(f"{peer.name}: jobs still open after {timeout}s")
                workers.check_alive()
                time.sleep(PEER_POLL_SECONDS)
            seconds = time.monotonic() - committed_at
            succeeded = conn.execute(peer.done_probe).fetchone()[0]  # type: ignore[index]
    if succeeded != tasks:
        raise BenchError(f"{peer.name}: {succeeded} of {tasks} jobs succeeded")
    result = DrainResult(peer.name, PROCESSES, tasks, seconds)
    log(f"{peer.name} x{PROCESSES}: {result.rate:,.0f} tasks/s")
    return result


def _enqueue_code(key: str, tasks: int) -> str:
    return f"from bench.peers import enqueue_main; enqueue_main({key!r}, {tasks})"


# -- pgbench ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PgbenchResult:
    batch: int
    tps: float
    seconds: float
    preloaded: int

    @property
    def rate(self) -> float:
        return self.tps * self.batch


def pgbench_path() -> str:
    found = shutil.which("pgbench") or "/usr/lib/postgresql/15/bin/pgbench"
    if not Path(found).exists():
        raise BenchError("pgbench not found (apt-get install -y postgresql-client)")
    return found


def pgbench_script() -> str:
    """taskapp's own claim statement as a pgbench script: each transaction completes the
    client's previous batch (the ids and lease tokens it kept with \\gset) and claims the next
    :limits of the default queue; its answer is read whole, as the dispatcher reads it."""
    # Here, not at the top: the peers' processes import this module in their own venv.
    from taskapp.statements import statement

    text = re.sub(r"%\((\w+)\)s", r":\1", statement("complete_and_claim")).replace("%%", "%")
    no_results = (
        "array_fill(NULL::text, ARRAY[coalesce(cardinality(CAST(:task_ids AS bigint[])), 0)])"
    )
    text = text.replace("CAST(:results AS text[])", no_results)
    for name, value in {":instance_id": "'pgbench'", ":queues": "'{default}'"}.items():
        text = text.replace(name, value)
    text = text.replace(":lease_seconds", "30").strip().rstrip(";")
    head, answer = text.split("\nSELECT CASE WHEN row_number()")
    answer = re.sub(r"\nORDER BY [^\n]*$", "", "SELECT CASE WHEN row_number()" + answer)
    return (
        f"{head}, answer AS ({answer})\n"
        "SELECT coalesce(array_agg(id) FILTER (WHERE id IS NOT NULL), '{}') AS task_ids,\n"
        "       coalesce(array_agg(lease_token) FILTER (WHERE id IS NOT NULL), '{}')"
        " AS lease_tokens,\n"
        "       sum(coalesce(length(finished), 0) + coalesce(length(conversations), 0)"
        " + coalesce(length(processed), 0)) AS read\n"
        "FROM answer\n\\gset\n"
    )


def pgbench_claim(
    url: str, batch: int, seconds: int, conversations: int, start: int = 50_000
) -> PgbenchResult:
    """The claim statement at `batch` tasks per transaction, 2 clients, `seconds` s. The queue
    must not run dry (a claim of nothing is cheap and would inflate tps): it is loaded with
    `start` pending tasks, and with 4 times as many again until some are left at the end."""
    preload = start
    with tempfile.NamedTemporaryFile("w", suffix=".sql", prefix="bench-claim-") as script:
        script.write(pgbench_script())
        script.flush()
        for _ in range(5):
            truncate_tasks(url)
            insert_tasks(url, preload, conversations=conversations, wake=False)
            cmd = [pgbench_path(), "-n", "-M", "prepared", "-c", str(PROCESSES)]
            cmd += ["-j", str(PROCESSES), "-T", str(seconds), "-f", script.name]
            cmd += ["-D", f"limits={{{batch}}}", "-D", "task_ids={}", "-D", "lease_tokens={}"]
            env = {**os.environ, "PGOPTIONS": PGBENCH_OPTIONS}
            done = subprocess.run(
                [*cmd, url], capture_output=True, text=True, timeout=seconds + 120, env=env
            )
            tps = re.search(r"^tps = ([\d.]+)", done.stdout, re.M)
            failed = re.search(r"^number of failed transactions: (\d+)", done.stdout, re.M)
            if done.returncode != 0 or tps is None or (failed and int(failed.group(1))):
                raise BenchError(
                    f"pgbench failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
                )
            with connect(url) as conn:
                left = conn.execute(
                    "SELECT count(*) FROM tasks WHERE status = 'pending'"
                ).fetchone()[0]  # type: ignore[index]
            if left > 0:
                result = PgbenchResult(batch, float(tps.group(1)), seconds, preload)
                log(f"pgbench batch {batch}: {result.tps:,.0f} tps, {result.rate:,.0f} tasks/s")
                return result
            log(f"pgbench batch {batch}: {preload:,} tasks ran out; loading {4 * preload:,}")
            preload *= 4
    raise BenchError(f"pgbench batch {batch}: the queue still ran dry with {preload:,} tasks")


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Runs:
    results: dict[str, list[DrainResult]] = field(default_factory=dict)

    def add(self, result: DrainResult) -> None:
        self.results.setdefault(result.who, []).append(result)

    def median_rate(self, who: str) -> float:
        return statistics.median(r.rate for r in self.results[who])

    def median_seconds(self, who: str) -> float:
        return statistics.median(r.seconds for r in self.results[who])


def round_order(names: list[str], round_index: int) -> list[str]:
    """Forward in even rounds, reversed in odd ones: no system always runs first or last."""
    return names if round_index % 2 == 0 else names[::-1]


def run(args: argparse.Namespace) -> int:
    try:
        python = peers_python()
    except PeersUnavailable as exc:
        log(f"FAILED: {exc}")
        return INSTALL_FAILED
    versions = venv_versions(python, PEER_PACKAGES, "the peers")
    if args.setup:
        print(" ".join(f"{k}=={v}" for k, v in versions.items()))
        return 0
    tasks = 1000 if args.quick else args.tasks
    rounds = 1 if args.quick and args.rounds is None else (args.rounds or 3)
    seconds = 2 if args.quick and args.pgbench_seconds is None else (args.pgbench_seconds or 5)
    stamp = machine_line()
    peers = [
        pgqueuer_peer(args.pgqueuer_batch_size, args.pgqueuer_max_concurrent_tasks),
        procrastinate_peer(args.procrastinate_concurrency),
    ]
    runs = Runs()
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(bench_database("peers"))
        for peer in peers:
            peer.url = stack.enter_context(bench_database(f"peers_{peer.key}", migrate=False))
            peer.python = python
            peer.pin = args.pin
            peer.install(python, peer.url)
        drains: dict[str, Callable[[], DrainResult]] = {
            "taskapp": lambda: drain_taskapp(
                url,
                PROCESSES,
                tasks,
                args.concurrency,
                args.drain_timeout,
                conversations=args.conversations,
                poll=PEER_POLL_SECONDS,
                pin=args.pin,
            ),
            **{
                peer.name: (lambda peer=peer: drain_peer(peer, tasks, args.drain_timeout))  # type: ignore[misc]
                for peer in peers
            },
        }
        for r in range(rounds):
            order = round_order(list(drains), r)
            log(f"round {r + 1}/{rounds}: {', '.join(order)}")
            for name in order:
                runs.add(drains[name]())
        pgbench = [
            pgbench_claim(url, batch, seconds, args.conversations) for batch in args.pgbench_batches
        ]
    report(args, runs, pgbench, peers, versions, tasks, rounds, seconds, stamp)
    return 0


def report(
    args: argparse.Namespace,
    runs: Runs,
    pgbench: list[PgbenchResult],
    peers: list[Peer],
    versions: dict[str, str],
    tasks: int,
    rounds: int,
    seconds: int,
    stamp: str,
) -> None:
    taskapp = runs.median_rate("taskapp")
    rows: list[list[object]] = []
    for who, results in runs.results.items():
        rate = runs.median_rate(who)
        label = {
            "taskapp": f"taskapp, {PROCESSES} instances x {args.concurrency} thread(s)",
            "PgQueuer": f"PgQueuer {versions['pgqueuer']}, {PROCESSES} consumers",
            "procrastinate": f"procrastinate {versions['procrastinate']}, {PROCESSES} workers",
        }[who]
        target = TARGETS.get(who)
        rows.append(
            [
                label,
                tasks,
                runs.median_seconds(who),
                rate,
                " ".join(f"{r.rate:,.0f}" for r in results),
                "" if who == "taskapp" else f"{taskapp / rate:.2f}x",
                verdict(taskapp / rate, target, at_least=True) if target else "",
            ]
        )
    for result in pgbench:
        rows.append(
            [
                f"pgbench, the claim, {result.batch} per transaction, {PROCESSES} clients",
                f"{result.preloaded:,} loaded",
                float(result.seconds),
                result.rate,
                f"{result.tps:,.0f} tps",
                f"{taskapp / result.rate:.2f}x",
                "(limit)",
            ]
        )
    print_table(
        f"Peers: drain of {tasks:,} no-op tasks, {PROCESSES} worker processes each, median of "
        f"{rounds} alternating round(s) — {stamp}",
        ["run", "tasks", "seconds", "tasks/s", "tasks/s per round", "taskapp / this", "target"],
        rows,
    )
    print(f"- taskapp: bench/drain.py's drain, {args.conversations} conversation(s) per task.")
    for peer in peers:
        print(f"- {peer.name}: {peer.settings}.")
    print(
        f"- pgbench: taskapp's complete_and_claim (taskapp/sql/queue.sql) completing and "
        f"claiming a batch per transaction, generic plan, no JIT, {seconds} s each, tasks/s = "
        "tps x batch."
    )
    if args.pin:
        print(
            "- --pin: each system's process n on CPU pinned_cpu(n) (taskapp's instances by "
            "their CPU_AFFINITY, the peers' workers by taskset); pgbench and PostgreSQL free."
        )
    print("- peers' venv: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
    print(flush=True)


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0], default_timeout=3600)
    add_drain_args(p, concurrency=200)
    p.add_argument(
        "--rounds", type=int, default=None, help="rounds of the 3 drains (default 3, --quick 1)"
    )
    p.add_argument(
        "--conversations", type=int, default=0, help="conversations per taskapp task (default 0)"
    )
    p.add_argument(
        "--pgqueuer-batch-size",
        type=int,
        default=100,
        help="jobs per dequeue (default 100; PgQueuer's own default is 10)",
    )
    p.add_argument(
        "--pgqueuer-max-concurrent-tasks", type=int, default=None, help="default: unlimited"
    )
    p.add_argument(
        "--procrastinate-concurrency",
        type=int,
        default=30,
        help="sub-workers per worker (default 30, its docs' example; its own default is 1)",
    )
    p.add_argument(
        "--pgbench-seconds", type=int, default=None, help="per batch size (default 5, --quick 2)"
    )
    p.add_argument("--pgbench-batches", type=int, nargs="+", default=[10, 100])
    p.add_argument("--setup", action="store_true", help="only make the peers' venv")
    add_pin_arg(p)
    main(run, p.parse_args())
