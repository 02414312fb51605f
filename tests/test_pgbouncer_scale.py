"""Issue 16's first "done when", at its scale: 8 instances of 4 work threads each, their
statements through one PgBouncer (transaction mode) with a server pool of 10 and their LISTEN
connections direct. 2,000 tasks created over HTTP complete exactly once, their pickup stays
prompt, and PostgreSQL, sampled every 20 ms, never sees more than the pool plus one listener
per instance."""

from __future__ import annotations

import collections
import json
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import requests

from tests.support import status_counts, wait_for
from tools.pgbouncer import PgBouncer

INSTANCES = 8
WORK_THREADS = 4
SERVER_POOL = 10
# Each instance's own pool, on the client side of PgBouncer, which lends its SERVER_POOL server
# connections to them one transaction at a time: so it may well be larger than 10. Direct, the
# instances could open 8 x (12 + 1) = 104 connections, more than PostgreSQL's default
# max_connections of 100: without PgBouncer this cluster might not even fit on the server.
CLIENT_POOL = 12
TASKS = 2_000
CLIENT_THREADS = 8
SAMPLE_SECONDS = 0.02
# started_at - created_at, the median task's: a claim woken by the direct LISTEN takes
# milliseconds. With LISTEN through PgBouncer only a busy dispatcher's next claim (made with its
# completions) or the 30 s poll picks a task up: a p50 of ~190 ms and a p95 of ~2 s here.
PICKUP_P50_SECONDS = 0.1
LISTENER = "taskapp-listener"


def dbname(url: str) -> str:
    return url.rpartition("/")[2]


@pytest.fixture
def bouncer(server_url: str) -> Iterator[PgBouncer]:
    with PgBouncer.in_front_of(server_url, pool_size=SERVER_POOL) as running:
        yield running


class ConnectionSampler:
    """Counts the test database's client backends every SAMPLE_SECONDS on a connection of its
    own: the listeners (direct, named taskapp-listener) and every other one, which can only be
    PgBouncer's (each instance's pool and migrations go through it). The test's own connections
    are left out by their pids."""

    def __init__(self, database_url: str, own_pids: set[int]) -> None:
        self._conn = psycopg.connect(database_url, autocommit=True)
        self._own = sorted(own_pids | {self._conn.info.backend_pid})
        self.samples: list[tuple[int, int]] = []  # (listeners, other)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            row = self._conn.execute(
                "SELECT count(*) FILTER (WHERE application_name = %s),"
                "       count(*) FILTER (WHERE application_name IS DISTINCT FROM %s)"
                " FROM pg_stat_activity"
                " WHERE datname = current_database() AND backend_type = 'client backend'"
                "   AND pid <> ALL(%s)",
                (LISTENER, LISTENER, self._own),
            ).fetchone()
            self.samples.append(row)
            self._stop.wait(SAMPLE_SECONDS)

    def peaks(self) -> tuple[int, int, int]:
        """The most listeners, other connections and connections in all, of any sample."""
        return (
            max(listeners for listeners, _ in self.samples),
            max(other for _, other in self.samples),
            max(listeners + other for listeners, other in self.samples),
        )

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._conn.close()


def create_tasks(urls: list[str], count: int) -> list[int]:
    """POST count tasks of one conversation each, spread over the instances round robin."""

    def create(n: int, session: requests.Session) -> int:
        body = {"title": f"scale {n}", "conversations": [{"content": f"scale {n}"}]}
        response = session.post(f"{urls[n % len(urls)]}/tasks/", json=body, timeout=10)
        assert response.status_code == 201, (response.status_code, response.text[:300])
        return int(response.json()["id"])

    sessions = threading.local()

    def create_in_thread(n: int) -> int:
        if not hasattr(sessions, "session"):
            sessions.session = requests.Session()
        return create(n, sessions.session)

    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        return list(pool.map(create_in_thread, range(count)))


def test_eight_instances_share_a_server_pool_of_ten(
    bouncer, instances, database_url, db_conn, tmp_path: Path
) -> None:
    # bouncer before instances: the instances stop first, and record their stop through it.
    record = tmp_path / "runs.jsonl"
    booting = time.monotonic()
    group = [
        instances(
            wait=False,
            DATABASE_URL=bouncer.url(dbname(database_url)),
            LISTEN_DATABASE_URL=database_url,
            DB_PREPARED_STATEMENTS=0,
            DB_POOL_SIZE=CLIENT_POOL,
            WORKER_CONCURRENCY=WORK_THREADS,
            # Only a working LISTEN makes an idle worker claim a new task within the median.
            POLL_INTERVAL_SECONDS=30,
            # Appends each run's conversation to the record: a task run twice shows twice.
            TASK_PROCESSOR="tests.processors:record_contents",
            TEST_PROCESSOR_SECONDS=0,
            TEST_PROCESSOR_RECORD=record,
        )
        for _ in range(INSTANCES)
    ]
    with ConnectionSampler(database_url, {db_conn.info.backend_pid}) as sampler:
        for instance in group:
            instance.wait_healthy(timeout=60)
        wait_for(
            lambda: (
                db_conn.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name = %s",
                    (LISTENER,),
                ).fetchone()[0]
                == INSTANCES
            ),
            what="every instance's listener, direct",
        )
        started = time.monotonic()
        booted_seconds = started - booting
        created = create_tasks([i.url for i in group], TASKS)
        created_seconds = time.monotonic() - started
        try:
            wait_for(
                lambda: status_counts(db_conn).get("completed") == TASKS,
                timeout=30,
                interval=0.1,
                what="every task completed",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; tasks by status: {status_counts(db_conn)}") from None
        drained_seconds = time.monotonic() - started
    listeners, pooled, total = sampler.peaks()
    # Prompt pickup: the claim's clock (started_at) against the insert's (created_at).
    pickups = [
        float(seconds)
        for (seconds,) in db_conn.execute(
            "SELECT extract(epoch FROM started_at - created_at) FROM tasks"
        ).fetchall()
    ]
    p50 = statistics.median(pickups)
    p95 = statistics.quantiles(pickups, n=20)[-1]
    print(
        f"\n{INSTANCES} instances up in {booted_seconds:.1f}s; {TASKS} tasks created in"
        f" {created_seconds:.1f}s, all completed after {drained_seconds:.1f}s;"
        f" {len(sampler.samples)} samples; peak {pooled} server"
        f" connections + {listeners} listeners = {total}; pickup p50 {p50 * 1000:.0f} ms,"
        f" p95 {p95 * 1000:.0f} ms, max {max(pickups) * 1000:.0f} ms"
    )

    # PostgreSQL saw PgBouncer's server pool and one listener per instance, never more, though
    # the instances' pools hold up to INSTANCES x CLIENT_POOL client connections to PgBouncer.
    assert len(sampler.samples) > 100, "too few samples to have watched the run"
    assert pooled <= SERVER_POOL
    assert listeners <= INSTANCES
    assert total <= SERVER_POOL + INSTANCES
    # ... and the pool was in use: the ceiling was met, not just left unreached.
    assert pooled >= SERVER_POOL // 2, f"only {pooled} server connections: no load on the pool"

    # Exactly once: one claim each (attempts), no failed attempt, one processor run each.
    assert sorted(created) == list(range(1, TASKS + 1))
    attempts = collections.Counter(
        a for (a,) in db_conn.execute("SELECT attempts FROM tasks").fetchall()
    )
    assert attempts == {1: TASKS}, attempts
    assert db_conn.execute("SELECT count(*) FROM task_errors").fetchone()[0] == 0
    conversation_of = dict(db_conn.execute("SELECT id, task_id FROM conversations").fetchall())
    runs = collections.Counter(
        conversation_of[json.loads(line)["id"]] for line in record.read_text().splitlines()
    )
    assert set(runs) == set(created), "a task's processor never ran"
    assert [t for t, n in runs.items() if n != 1] == [], "a task's processor ran twice"

    # Prompt pickup, the direct LISTEN's doing: through PgBouncer it would hear nothing.
    assert p50 < PICKUP_P50_SECONDS
    for instance in group:
        assert "LISTEN hears no notifications" not in instance.log()
        assert "Exception in thread" not in instance.log()
