"""What every benchmark shares: databases, gunicorn servers, bulk loads, wrk, tables.

Everything here cleans up after itself: a bench database is dropped when its block ends (and
stale ones left by a killed run are dropped at the next start), servers run in their own
process group and are stopped (then killed) on the way out, and `main()` puts a hard time
limit on the whole script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from tools.gunicorn_process import GunicornError, GunicornProcess, children, free_port

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
# The taskapp tree under test: this checkout, or another one (e.g. a branch with a proposed
# change, checked out with `git worktree add`) to compare with the same harness.
TASKAPP_ROOT = Path(os.environ.get("BENCH_TASKAPP_ROOT") or ROOT).resolve()
WRK_SCRIPT = BENCH_DIR / "wrk" / "taskapp.lua"
HELLO_CONFIG = BENCH_DIR / "hello_gunicorn.conf.py"
PG_ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DB_PREFIX = "taskapp_bench_"


class BenchError(RuntimeError):
    """A benchmark could not run (server did not start, queue did not drain, ...)."""


class TimeLimit(BaseException):
    """The script ran past its --timeout; raised from SIGALRM so cleanups still run."""


# -- output -------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_line() -> str:
    """Where and when: the line each result table is stamped with."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with connect(PG_ADMIN_URL) as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{now} · {os.cpu_count()} cpu ({cpu}) · {mem_gb:.0f} GB · PostgreSQL {pg} · "
        f"Python {platform.python_version()} · load {load}"
    )


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A small Markdown table on stdout (pastes straight into bench/README.md)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n### {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    print(flush=True)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value)


def verdict(
    value: float, target: float, *, at_least: bool, strict: bool = False, unit: str = ""
) -> str:
    """PASS/MISS against a target: value >= target (at_least), else value <= target, or
    value < target when strict."""
    if at_least:
        ok, sign = value >= target, "≥"
    elif strict:
        ok, sign = value < target, "<"
    else:
        ok, sign = value <= target, "≤"
    return f"{'PASS' if ok else 'MISS'} ({sign} {target:g}{unit})"


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 200 samples is the 198th)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-pct * len(ordered) // 100))))
    return ordered[rank - 1]


# -- script scaffolding -------------------------------------------------------------------------


def parser(description: str, *, default_timeout: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smoke run: small counts, short runs")
    p.add_argument(
        "--timeout",
        type=int,
        default=default_timeout,
        help=f"hard limit for the whole script in seconds (default {default_timeout})",
    )
    return p


def add_pin_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pin",
        action="store_true",
        help="pin each server process, taskapp's (CPU_AFFINITY) and its baseline's (taskset) "
        "alike, to a CPU of its own (pinned_cpu)",
    )


def main(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> None:
    """Run a benchmark with a hard time limit; SIGTERM/SIGINT/timeout still clean up."""

    def on_alarm(signum: int, frame: object) -> None:
        raise TimeLimit(f"gave up after --timeout {args.timeout}s")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(args.timeout)
    try:
        drop_stale_databases()
        code = run(args)
    except (BenchError, TimeLimit) as exc:
        log(f"FAILED: {exc}")
        code = 2
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    finally:
        signal.alarm(0)
    sys.exit(code)


# -- databases ----------------------------------------------------------------------------------


def connect(url: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=autocommit, connect_timeout=10)


def listen_to_events(conn: psycopg.Connection[Any]) -> None:
    """LISTEN on taskapp_events as an instance with a stream does: PostgreSQL sends events
    only while someone says it watches (taskapp_watch_events, migration 0011)."""
    conn.execute("SELECT taskapp_watch_events(3600)")
    conn.execute("LISTEN taskapp_events")


def database_url(name: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_database(name: str) -> None:
    with connect(PG_ADMIN_URL) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def drop_stale_databases() -> None:
    """Drop bench databases whose creating process is gone (a run that was killed -9)."""
    with connect(PG_ADMIN_URL) as conn:
        names = [r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()]
    for name in names:
        match = re.fullmatch(DB_PREFIX + r"\w+_(\d+)", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            log(f"dropping stale database {name}")
            drop_database(name)


@contextlib.contextmanager
def bench_database(tag: str, *, migrate: bool = True) -> Iterator[str]:
    """A fresh database `taskapp_bench_<tag>_<pid>` with taskapp's schema; dropped afterwards."""
    name = f"{DB_PREFIX}{tag}_{os.getpid()}"
    drop_database(name)
    with connect(PG_ADMIN_URL) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = database_url(name)
    try:
        if migrate:
            migrate_schema(url)
        yield url
    finally:
        drop_database(name)


def migrate_schema(
    url: str, root: Path = TASKAPP_ROOT, python: Path = Path(sys.executable)
) -> None:
    """Bring the schema up to date the way the service of the tree at root does on start
    (AUTO_MIGRATE=1)."""
    env = {**os.environ, "DATABASE_URL": url, "AUTO_MIGRATE": "1", "PYTHONPATH": str(root)}
    done = subprocess.run(
        [str(python), "-c", "from taskapp import create_app; create_app()"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise BenchError(f"migration failed:\n{done.stdout}\n{done.stderr}")


@dataclass(frozen=True)
class IdRange:
    first: int
    last: int
    committed_at: float  # time.perf_counter() when the insert committed
    finished_before: int = 0  # tasks finished when these were inserted (the triggers' count)

    @property
    def count(self) -> int:
        return self.last - self.first + 1


_INSERT_TASKS = """
WITH t AS (
    INSERT INTO tasks (title, description, max_attempts, status, attempts, run_after,
                       created_at, updated_at, processed_at {key_column})
    SELECT 'bench task ' || g, 'generated by bench/common.py', 3, %(status)s, %(attempts)s,
           now(), now() - %(age)s * interval '1 second', now(), %(processed_at)s {key_value}
    FROM generate_series(1, %(n)s) AS g
    RETURNING id
), c AS (
    INSERT INTO conversations (task_id, content, status)
    SELECT t.id, 'conversation ' || k, %(conversation_status)s
    FROM t, generate_series(1, %(conversations)s) AS k
)
SELECT min(id), max(id) FROM t
"""


# How many tasks are finished, from the counts the triggers keep (migration 0002): the same
# cost however far a drain has got, where a scan for open tasks wades through the finished ones.
_FINISHED = (
    "SELECT coalesce(sum(n), 0) FROM task_counts"
    " WHERE status IN ('completed', 'failed', 'cancelled')"
)


def insert_tasks(
    url: str,
    n: int,
    *,
    conversations: int = 2,
    completed: bool = False,
    wake: bool = True,
    analyze: bool = True,
    keys: int = 0,
) -> IdRange:
    """Bulk-insert n tasks (each with `conversations` conversations) in one transaction.

    Pending tasks are claimable at once, and `taskapp_wakeup` is notified on commit so idle
    workers start immediately; completed ones are history (status completed, processed).
    With `keys`, each task gets one of that many concurrency keys, round robin (without, no
    key column is named, so a tree from before flow control takes the insert too).
    """
    statement = _INSERT_TASKS.format(
        key_column=", concurrency_key" if keys else "",
        key_value=", 'key-' || (g %% %(keys)s)" if keys else "",
    )
    params = {
        "keys": keys,
        "n": n,
        "conversations": conversations,
        "status": "completed" if completed else "pending",
        "attempts": 1 if completed else 0,
        "age": 86400 if completed else 0,
        "processed_at": datetime.now(UTC) if completed else None,
        "conversation_status": "processed" if completed else "active",
    }
    with connect(url, autocommit=False) as conn:
        before = conn.execute(_FINISHED).fetchone()[0]  # type: ignore[index]
        first, last = conn.execute(statement, params).fetchone()  # type: ignore[misc]
        # As autovacuum soon would after a bulk load: plans see the table's real size.
        # (ANALYZE counts the rows this transaction inserted.)
        if analyze:
            conn.execute("ANALYZE tasks, conversations")
        if wake and not completed:
            conn.execute("SELECT pg_notify('taskapp_wakeup', '')")
        conn.commit()
        committed_at = time.perf_counter()
    return IdRange(first, last, committed_at, before)


def insert_history(url: str, n: int, *, chunk: int = 250_000) -> None:
    """n completed tasks with 2 processed conversations each, then VACUUM ANALYZE (as
    autovacuum would after a bulk load), so plans reflect the table's real size, and a
    CHECKPOINT, so the measurements that follow see a settled table instead of sharing the
    machine with the checkpointer writing out the load (hundreds of MB at a million rows)."""
    done = 0
    while done < n:
        insert_tasks(url, min(chunk, n - done), completed=True)
        done += min(chunk, n - done)
    with connect(url) as conn:
        conn.execute("VACUUM ANALYZE tasks, conversations")
        try:
            conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            log("no privilege to CHECKPOINT: the load may still be written out during the runs")


def truncate_tasks(url: str) -> None:
    """Empty the queue tables (a fresh heap and indexes: no dead tuples from an earlier run)."""
    with connect(url) as conn:
        conn.execute("TRUNCATE tasks, conversations, task_errors, idempotency_keys CASCADE")


def delete_tasks(url: str, where: str, params: Sequence[object] = ()) -> None:
    """DELETE FROM tasks WHERE <where> (conversations go by cascade), then VACUUM ANALYZE."""
    with connect(url) as conn:
        conn.execute(f"DELETE FROM tasks WHERE {where}", params)  # type: ignore[arg-type]
        conn.execute("VACUUM ANALYZE tasks, conversations")


def wait_completed(url: str, ids: IdRange, *, timeout: float, interval: float = 0.1) -> float:
    """Block until every task in ids is completed; return the seconds since they were committed.

    The poll reads the finished count the triggers keep (a few rows), so it costs the service
    under test next to nothing at any point of the drain; then every task is checked.
    """
    deadline = time.perf_counter() + timeout
    with connect(url) as conn:
        while conn.execute(_FINISHED).fetchone()[0] < ids.finished_before + ids.count:  # type: ignore[index]
            if time.perf_counter() > deadline:
                raise BenchError(f"tasks {ids.first}..{ids.last} still open after {timeout}s")
            time.sleep(interval)
        elapsed = time.perf_counter() - ids.committed_at
        bad = conn.execute(
            "SELECT count(*) FROM tasks WHERE status <> 'completed' AND id BETWEEN %s AND %s",
            (ids.first, ids.last),
        ).fetchone()[0]  # type: ignore[index]
    if bad:
        raise BenchError(f"{bad} task(s) of {ids.first}..{ids.last} ended not completed")
    return elapsed


# -- venvs of their own ------------------------------------------------------------------------


class VenvUnavailable(BenchError):
    """A bench venv could not be made (no package index, or a pin that does not install)."""


def venv_python(venv: Path, requirements: str, what: str) -> Path:
    """The Python of a venv holding `requirements` (a requirements file's text), made (or
    remade) when missing or out of date: for peers, or another tree of taskapp's."""
    python = venv / "bin" / "python"
    stamp = venv / ".requirements-installed"
    if python.exists() and stamp.exists() and stamp.read_text() == requirements:
        return python
    log(f"installing {what} into {venv}")
    shutil.rmtree(venv, ignore_errors=True)
    venv.mkdir(parents=True)
    wanted = venv / "requirements.txt"
    wanted.write_text(requirements)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", "-r", str(wanted)],
    ]
    for cmd in steps:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise VenvUnavailable(f"{' '.join(cmd[:4])} … took over 900 s") from None
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
            shutil.rmtree(venv, ignore_errors=True)
            raise VenvUnavailable(
                f"could not install {what} (is the package index reachable?):\n{tail}"
            )
    stamp.write_text(requirements)
    return python


def venv_versions(python: Path, packages: Sequence[str], what: str) -> dict[str, str]:
    """The installed version of each package in the venv of `python`, for a table's notes."""
    code = (
        "import importlib.metadata as m\n"
        f"for name in {tuple(packages)!r}: print(name, m.version(name))"
    )
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise BenchError(f"the venv of {what} is broken:\n{done.stderr}")
    return dict(line.split(" ", 1) for line in done.stdout.splitlines())


# -- servers ------------------------------------------------------------------------------------


@dataclass
class Server:
    """One gunicorn master (and its workers) in its own process group."""

    name: str
    app: str
    config: Path
    env: dict[str, str]
    ready_paths: tuple[str, ...] = ("/health",)
    cwd: Path = TASKAPP_ROOT
    python: Path = Path(sys.executable)
    port: int = field(default_factory=free_port)
    # --pin: the whole process tree on this CPU (taskset), for a baseline pinned as taskapp is
    # by its own CPU_AFFINITY (taskapp_server sets that instead).
    cpu: int | None = None
    process: GunicornProcess | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path | None:
        return None if self.process is None else self.process.log_path

    def start(self, timeout: float = 60.0) -> Server:
        fd, path = tempfile.mkstemp(prefix=f"bench-{self.name}-", suffix=".log")
        os.close(fd)
        self.process = self.make_process(Path(path))
        self.process.command = on_cpu(self.cpu, self.process.command)
        self.process.start()
        try:
            self.process.wait_ready(self.ready_paths, timeout=timeout)
        except GunicornError as exc:
            raise BenchError(str(exc)) from None
        return self

    def make_process(self, log_path: Path) -> GunicornProcess:
        # Its own session: the bench's Ctrl-C is turned into a clean stop, and stop() can
        # kill every worker of the group afterwards.
        return GunicornProcess(
            self.port,
            self.env,
            config=self.config,
            app=self.app,
            cwd=self.cwd,
            log_path=log_path,
            own_session=True,
            name=self.name,
            python=self.python,
        )

    def worker_pids(self) -> list[int]:
        assert self.process is not None and self.process.pid is not None
        return children(self.process.pid)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the master, wait, then SIGKILL the whole process group."""
        if self.process is None:
            return
        if self.process.stop(timeout) == -signal.SIGKILL:
            log(f"{self.name} did not stop in {timeout}s; killed it")
        if self.log_path is not None and not os.environ.get("BENCH_KEEP_LOGS"):
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def taskapp_env(url: str, **overrides: object) -> dict[str, str]:
    """Environment of a bench instance: instant processor, quiet access log, own database."""
    env = {
        "DATABASE_URL": url,
        "AUTO_MIGRATE": "1",
        "PROCESSING_MIN_SECONDS": "0",
        "PROCESSING_MAX_SECONDS": "0",
        "WEB_CONCURRENCY": "1",
        "ACCESS_LOG": "",
    }
    env.update({key: str(value) for key, value in overrides.items()})
    return env


def taskapp_server(
    url: str,
    name: str = "taskapp",
    *,
    root: Path = TASKAPP_ROOT,
    python: Path = Path(sys.executable),
    cpu: int | None = None,
    **overrides: object,
) -> Server:
    """One taskapp instance of the tree at root (run by `python`, a venv with that tree's
    requirements): `gunicorn -c gunicorn.conf.py wsgi:app`, not yet started; on `cpu`, when
    given, by its own CPU_AFFINITY, as a deployment would pin it."""
    if cpu is not None:
        overrides["CPU_AFFINITY"] = cpu
    return Server(
        name=name,
        app="wsgi:app",
        config=root / "gunicorn.conf.py",
        env=taskapp_env(url, **overrides),
        ready_paths=("/health",),
        cwd=root,
        python=python,
    )


def hello_server(*, cpu: int | None = None, **overrides: object) -> Server:
    """The baseline: Flask hello-world under taskapp's own gunicorn settings (on `cpu`, when
    given, as taskapp is with CPU_AFFINITY)."""
    env = {"WEB_CONCURRENCY": "1", **{k: str(v) for k, v in overrides.items()}}
    return Server(
        name="hello",
        app="bench.hello_app:app",
        config=HELLO_CONFIG,
        env={**env, "BENCH_TASKAPP_ROOT": str(TASKAPP_ROOT)},
        ready_paths=("/",),
        cwd=ROOT,
        cpu=cpu,
    )


def pinned_cpu(n: int) -> int:
    """The CPU of the n-th process of a pinned run (--pin): each on one of its own, in turn,
    of the CPUs this process may use. taskapp gets it as CPU_AFFINITY (its own pinning, as a
    deployment would set it); a baseline or a peer through taskset (on_cpu), the same pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[n % len(cpus)]


def on_cpu(cpu: int | None, command: list[str]) -> list[str]:
    """The command, run on `cpu` with every process and thread it starts (None: as it is)."""
    return command if cpu is None else ["taskset", "-c", str(cpu), *command]


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time the processes (all their threads) have used so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


# -- HTTP load ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpResult:
    name: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms: float = float("nan")  # server CPU (user + system) per request, when measured

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 1.0


def wrk(
    name: str,
    url: str,
    *,
    seconds: float,
    connections: int,
    threads: int = 1,
    method: str = "GET",
    body: object | None = None,
    random_ids: tuple[int, int] | None = None,
) -> HttpResult:
    """Load one URL with wrk for a fixed time over fixed connections.

    With random_ids=(first, last), `__ID__` in the URL's path is replaced per request by a
    random id in first..last. Non-2xx answers and socket errors count as errors.
    """
    env = {
        **os.environ,
        "WRK_METHOD": method,
        "WRK_BODY": json.dumps(body) if body is not None else "",
        "WRK_ID_MIN": str(random_ids[0] if random_ids else 1),
        "WRK_ID_MAX": str(random_ids[1] if random_ids else 0),
    }
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(WRK_SCRIPT),
        url,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("WRK_JSON ")]
    if done.returncode != 0 or not lines:
        raise BenchError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    data = json.loads(lines[-1].removeprefix("WRK_JSON "))
    seconds_run = data["duration_us"] / 1e6
    return HttpResult(
        name=name,
        requests=data["requests"],
        seconds=seconds_run,
        rps=data["requests"] / seconds_run,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=data["errors"],
    )


def http_json(method: str, url: str, body: object | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")
