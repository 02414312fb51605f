"""Flow control across the cluster (issue 13's "Done when"): real gunicorn instances, real HTTP.

Limits are set through the /queues API, tasks created with POST /tasks/, and what happened is
read back from the database: every task's `started_at` (when the claim admitted its latest
attempt, on PostgreSQL's clock after the limits' locks) and `processed_at`, and a sampler
counting a key's running tasks every few milliseconds on a connection of its own. Each test
fails when the limit it checks is not enforced (each was checked by running it against a
claim with that limit taken out).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from taskapp.statements import statement
from tests.support import EventLog, Instance, create_task, healthy, wait_for

SLEEP = "tests.processors.flow:sleep_briefly"
THROTTLE = "tests.processors.flow:throttle_first"
# Small pools: four instances and the tests' own connections share max_connections.
COMMON = {"DB_POOL_SIZE": 4, "ACCESS_LOG": ""}


def start_group(instances: Callable[..., Instance], count: int, **env: object) -> list[Instance]:
    group = (instances(wait=False, **{**COMMON, **env}) for _ in range(count))
    return list(healthy(*group, timeout=60))


def put(url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = requests.put(url, json=body, timeout=10)
    assert response.status_code == 200, (response.status_code, response.text)
    return response.json()


def post(url: str) -> dict[str, Any]:
    response = requests.post(url, timeout=30)
    assert response.status_code == 200, (response.status_code, response.text)
    return response.json()


def create_many(
    urls: Sequence[str], count: int, title: str, threads: int = 8, **fields: Any
) -> list[dict[str, Any]]:
    """POST `count` tasks, spread over the instances, `threads` at a time."""

    def one(n: int) -> dict[str, Any]:
        return create_task(urls[n % len(urls)], f"{title} {n}", **fields)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(count)))


def db_now(conn: psycopg.Connection) -> datetime:
    return conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]


def rows(conn: psycopg.Connection, where: str, params: Sequence[object] = ()) -> list[Any]:
    cursor = conn.execute(
        "SELECT id, status, attempts, created_at, started_at, processed_at,"
        " processing_instance_id, concurrency_key FROM tasks WHERE " + where + " ORDER BY id",
        params,
    )
    cursor.row_factory = psycopg.rows.namedtuple_row
    return cursor.fetchall()


def max_overlap(intervals: Sequence[tuple[datetime, datetime]]) -> int:
    """The most intervals [start, end) open at one moment (an end at t closes before a start
    at t opens)."""
    events = sorted(
        itertools.chain(((start, 1) for start, _ in intervals), ((end, -1) for _, end in intervals))
    )
    most = running = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def most_in_window(starts: Sequence[datetime], window: timedelta) -> int:
    """The most starts in any half-open window [t, t + window)."""
    ordered = sorted(starts)
    return max(
        (sum(1 for s in ordered[i:] if s < first + window) for i, first in enumerate(ordered)),
        default=0,
    )


class RunningSampler:
    """Counts a key's `processing` tasks every few milliseconds from a thread of its own."""

    def __init__(self, database_url: str, queue: str, key: str, interval: float = 0.003):
        self._conn = psycopg.connect(database_url, autocommit=True)
        self._params = (queue, key)
        self._interval = interval
        self._stop = threading.Event()
        self.samples: collections.Counter[int] = collections.Counter()
        self._thread = threading.Thread(target=self._run, name="test-sampler", daemon=True)

    def _run(self) -> None:
        query = (
            "SELECT count(*) FROM tasks WHERE status = 'processing'"
            " AND queue = %s AND concurrency_key = %s"
        )
        while not self._stop.is_set():
            (n,) = self._conn.execute(query, self._params).fetchone()  # type: ignore[misc]
            self.samples[n] += 1
            time.sleep(self._interval)

    def __enter__(self) -> RunningSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._conn.close()


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


def test_a_key_limited_to_3_never_runs_more_than_3_on_4_instances(
    instances: Callable[..., Instance], database_url: str, conn: psycopg.Connection
) -> None:
    group = start_group(instances, 4, WORKER_CONCURRENCY=8, TASK_PROCESSOR=SLEEP)
    urls = [i.url for i in group]
    key = put(f"{urls[0]}/queues/default/keys/K", {"concurrency_limit": 3})
    assert key["concurrency_limit"] == 3, key
    with EventLog(database_url) as events, RunningSampler(database_url, "default", "K") as sampler:
        created = create_many(urls, 200, "keyed", concurrency_key="K")
        ids = [task["id"] for task in created]
        wait_for(
            lambda: conn.execute(
                "SELECT count(*) = 200 FROM tasks WHERE status = 'completed'"
            ).fetchone()[0],  # type: ignore[index]
            timeout=60,
            interval=0.2,
            what="200 tasks completed",
        )
        time.sleep(0.5)  # the last events arrive
    done = rows(conn, "concurrency_key = 'K'")
    assert [t.id for t in done] == sorted(ids)
    assert {t.status for t in done} == {"completed"}
    assert {t.attempts for t in done} == {1}
    # Sampled: never more than 3 running, and the limit was reached (it bound).
    assert max(sampler.samples) == 3, sampler.samples
    assert sum(sampler.samples.values()) > 500, sampler.samples
    # From every task's admission and finish: never more than 3 at once.
    assert max_overlap([(t.started_at, t.processed_at) for t in done]) == 3
    # Cluster-wide: the instances shared the work.
    assert len({t.processing_instance_id for t in done}) >= 3
    # Exactly once: one claim and one completion recorded per task.
    for kind in ("task.claimed", "task.completed"):
        counts = collections.Counter(e["task_id"] for e in events.events(kind))
        assert counts == {task_id: 1 for task_id in ids}, kind


# Issue 13's own case is 30 starts a minute, every 60-s window: a minute of the suite, so it
# runs with the soak tests (-m soak). The suite runs 10 starts per 10 s, which the claim's GCRA
# arithmetic treats alike (period_seconds is the API's own parameter). Either way the starts
# come period / limit apart (1 s or 2 s), so each may be a quarter second late and the limit is
# still reached in the first window.
@pytest.mark.parametrize(
    ("rate_limit", "window_seconds"),
    [
        pytest.param(10, 10, id="10-per-10s"),
        pytest.param(30, 60, id="30-a-minute", marks=pytest.mark.soak),
    ],
)
def test_a_rate_holds_in_every_window(
    instances: Callable[..., Instance],
    conn: psycopg.Connection,
    rate_limit: int,
    window_seconds: int,
) -> None:
    group = start_group(instances, 2, WORKER_QUEUES="rated:4")
    urls = [i.url for i in group]
    rate = {"limit": rate_limit, "period_seconds": window_seconds}
    queue = put(f"{urls[0]}/queues/rated", {"rate_limit": rate})
    assert queue["rate_limit"] == {**rate, "burst": 1}, queue
    # A backlog that outlasts the window: unlimited, the two instances would start it at once.
    create_many(urls, 100, "rated", queue="rated")
    first = wait_for(
        lambda: conn.execute("SELECT min(started_at) FROM tasks").fetchone()[0],  # type: ignore[index]
        timeout=10,
        what="a first start",
    )
    window = timedelta(seconds=window_seconds)
    wait_for(
        lambda: db_now(conn) > first + window + timedelta(seconds=1),
        timeout=window_seconds + 15,
        interval=0.1,
        what="a full window",
    )
    starts = [t.started_at for t in rows(conn, "started_at IS NOT NULL")]
    assert most_in_window(starts, window) <= rate_limit, sorted(starts)
    in_first = sum(1 for s in starts if s < first + window)
    assert in_first >= rate_limit * 9 // 10, sorted(starts)  # the limit was reached: it bound
    assert rows(conn, "status = 'pending'"), "the backlog ran out"


def test_a_saturated_key_does_not_hold_back_another(
    instances: Callable[..., Instance], conn: psycopg.Connection
) -> None:
    group = start_group(instances, 2, WORKER_CONCURRENCY=8, TASK_PROCESSOR=SLEEP)
    urls = [i.url for i in group]
    put(f"{urls[0]}/queues/default/keys/A", {"concurrency_limit": 1})
    create_many(urls, 200, "a", concurrency_key="A")
    created = create_many(urls, 20, "b", threads=4, concurrency_key="B")
    b_ids = [task["id"] for task in created]
    wait_for(
        lambda: all(t.status == "completed" for t in rows(conn, "id = ANY(%s)", (b_ids,))),
        timeout=30,
        interval=0.1,
        what="B's tasks completed",
    )
    late = [
        (t.id, t.started_at - t.created_at)
        for t in rows(conn, "id = ANY(%s)", (b_ids,))
        if t.started_at - t.created_at > timedelta(seconds=2)
    ]
    assert not late, late
    # A's backlog was still there all along, one at a time.
    a = rows(conn, "concurrency_key = 'A'")
    assert sum(1 for t in a if t.status == "pending") > 100
    finished = [(t.started_at, t.processed_at) for t in a if t.status == "completed"]
    assert max_overlap(finished) == 1


def test_a_paused_queue_starts_nothing_while_another_drains(
    instances: Callable[..., Instance], conn: psycopg.Connection
) -> None:
    # A poll much slower than the 1 s allowed: only the resume's wake-up can meet it.
    group = start_group(
        instances, 2, WORKER_QUEUES="a:4,b:4", TASK_PROCESSOR=SLEEP, POLL_INTERVAL_SECONDS=5
    )
    urls = [i.url for i in group]
    create_many(urls, 300, "a", queue="a")
    wait_for(lambda: rows(conn, "queue = 'a' AND status = 'processing'"), what="a's tasks running")
    paused = post(f"{urls[0]}/queues/a/pause")
    assert paused["paused"] is True, paused
    paused_at = db_now(conn)
    # For 10 s, b's tasks come in one at a time and run at once; a starts nothing anywhere.
    b_ids: list[int] = []
    while db_now(conn) < paused_at + timedelta(seconds=10):
        b_ids.append(create_task(urls[len(b_ids) % 2], "b", queue="b")["id"])
        time.sleep(0.2)
    assert not rows(conn, "queue = 'a' AND started_at > %s", (paused_at,))
    assert not rows(conn, "queue = 'a' AND status = 'processing'"), "running tasks finish"
    a_pending = rows(conn, "queue = 'a' AND status = 'pending'")
    assert len(a_pending) > 100
    assert requests.get(f"{urls[1]}/queues/a", timeout=10).json()["paused"] is True
    assert len(b_ids) >= 40
    b = wait_for(
        lambda: (
            all(t.status == "completed" for t in rows(conn, "id = ANY(%s)", (b_ids,)))
            and rows(conn, "id = ANY(%s)", (b_ids,))
        ),
        timeout=5,
        what="b's tasks completed",
    )
    slow = [
        (t.id, t.started_at - t.created_at)
        for t in b
        if t.started_at - t.created_at > timedelta(seconds=1)
    ]
    assert not slow, slow
    # Resume: the backlog starts at once.
    resumed = post(f"{urls[1]}/queues/a/resume")
    assert resumed["paused"] is False, resumed
    resumed_at = db_now(conn)
    restarted = wait_for(
        lambda: rows(conn, "queue = 'a' AND started_at > %s", (paused_at,)),
        timeout=5,
        interval=0.02,
        what="a's backlog started",
    )
    first = min(t.started_at for t in restarted)
    assert first - resumed_at <= timedelta(seconds=1), first - resumed_at


def test_a_throttle_holds_back_its_key_across_the_cluster(
    instances: Callable[..., Instance], conn: psycopg.Connection, tmp_path: Path
) -> None:
    group = start_group(
        instances,
        2,
        WORKER_CONCURRENCY=4,
        TASK_PROCESSOR=THROTTLE,
        TEST_FLOW_DIR=tmp_path,
        TEST_FLOW_MIN_SECONDS=0.02,
        TEST_FLOW_MAX_SECONDS=0.05,
    )
    urls = [i.url for i in group]
    throttler = create_task(urls[0], "throttle", concurrency_key="T")["id"]
    wait_for(
        lambda: requests.get(f"{urls[0]}/tasks/{throttler}", timeout=5).json()["deferrals"],
        timeout=10,
        what="the throttle",
    )
    (throttled_at,) = conn.execute(
        "SELECT at FROM task_errors WHERE task_id = %s", (throttler,)
    ).fetchone()  # type: ignore[misc]
    key = requests.get(f"{urls[1]}/queues/default/keys/T", timeout=5).json()
    until = datetime.fromisoformat(key["throttled_until"])
    assert timedelta(seconds=1.9) < until - throttled_at < timedelta(seconds=2.5), key
    # The key's other tasks, on either instance, wait; another key's run at once.
    held = [create_task(urls[n % 2], "held", concurrency_key="T")["id"] for n in range(10)]
    free = [create_task(urls[n % 2], "free", concurrency_key="U")["id"] for n in range(10)]
    assert db_now(conn) < until, "too slow to create the tasks inside the throttle"
    every = [throttler, *held, *free]
    wait_for(
        lambda: all(t.status == "completed" for t in rows(conn, "id = ANY(%s)", (every,))),
        timeout=20,
        what="all completed",
    )
    t_starts = [t.started_at for t in rows(conn, "id = ANY(%s)", ([throttler, *held],))]
    assert min(t_starts) >= until, (until, sorted(t_starts))
    assert min(t_starts) - until < timedelta(seconds=1), (until, sorted(t_starts))
    for task in rows(conn, "id = ANY(%s)", (free,)):
        assert task.started_at < until
        assert task.started_at - task.created_at < timedelta(seconds=1)


def test_the_claim_updates_what_it_admitted_by_index_not_by_scanning_every_task(
    db_conn: psycopg.Connection,
) -> None:
    """At 20,000 pending tasks (the drain benchmark's), a claim of 32 must not hash the whole
    table: taskapp_admit() was estimated at 1,000 rows, and the drain fell to a tenth."""
    db_conn.execute(
        "INSERT INTO tasks (title, max_attempts) SELECT 'todo', 3 FROM generate_series(1, 20000)"
    )
    db_conn.execute("ANALYZE tasks")
    params = {
        "task_ids": [],
        "lease_tokens": [],
        "results": [],
        "instance_id": "a",
        "queues": ["default"],
        "limits": [32],
        "lease_seconds": 30,
    }
    explain = "EXPLAIN " + statement("complete_and_claim")
    plan = "\n".join(row[0] for row in db_conn.execute(explain, params))
    assert "Seq Scan on tasks" not in plan, plan
