"""Flow control in-process, on a real PostgreSQL: concurrency keys, rates, throttles and pause
as the claim obeys them, the /queues API, WORKER_QUEUES and QUEUE_PROCESSORS.

The same guarantees across real gunicorn instances are in tests/test_flow_cluster.py.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import psycopg
import pytest
from flask.testing import FlaskClient

from taskapp import queue
from taskapp.config import ConfigError, Settings
from taskapp.database import Database
from taskapp.processor import Context, TaskSnapshot
from taskapp.worker import Worker
from tests.api_helpers import assert_problem
from tests.support import task_errors, wait_for


@pytest.fixture
def database(gateway: Database) -> Database:
    return gateway


def add_tasks(
    conn: psycopg.Connection, n: int, *, key: str | None = None, queue_name: str = "default"
) -> list[int]:
    rows = conn.execute(
        "INSERT INTO tasks (title, max_attempts, queue, concurrency_key)"
        " SELECT 't' || g, 3, %s, %s FROM generate_series(1, %s) AS g RETURNING id",
        (queue_name, key, n),
    ).fetchall()
    return [row[0] for row in rows]


def running(conn: psycopg.Connection, key: str) -> int:
    return conn.execute(
        "SELECT count(*) FROM tasks WHERE status = 'processing' AND concurrency_key = %s", (key,)
    ).fetchone()[0]


def statuses(conn: psycopg.Connection, ids: list[int]) -> list[str]:
    rows = conn.execute("SELECT status FROM tasks WHERE id = ANY(%s) ORDER BY id", (ids,))
    return [row[0] for row in rows.fetchall()]


def claim(database: Database, limit: int = 10, **limits: int) -> list[queue.Claim]:
    return queue.claim(
        database, instance_id="a", limit=limits or {"default": limit}, lease_seconds=30
    )


# -- concurrency keys -----------------------------------------------------------------------


def test_racing_claims_never_admit_more_than_a_keys_limit(
    settings: Settings, db_conn: psycopg.Connection
) -> None:
    db_conn.execute("INSERT INTO queues (name, key_concurrency_limit) VALUES ('default', 3)")
    add_tasks(db_conn, 60, key="K")
    add_tasks(db_conn, 30)
    database = Database(settings.database_url, pool_size=8)
    most, start = 0, threading.Barrier(8)
    try:
        for _ in range(5):
            claims: list[queue.Claim] = []

            def race(claims: list[queue.Claim] = claims) -> None:
                start.wait()
                claims.extend(claim(database, limit=4))

            threads = [threading.Thread(target=race) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            most = max(most, running(db_conn, "K"))
            for claimed in claims:  # finish them all for the next round
                queue.complete(database, claimed, instance_id="a")
    finally:
        database.close()
    assert most == 3


def test_a_saturated_key_does_not_block_the_tasks_behind_it(
    database: Database, db_conn: psycopg.Connection
) -> None:
    db_conn.execute("INSERT INTO queues (name, key_concurrency_limit) VALUES ('default', 1)")
    add_tasks(db_conn, 50, key="A")
    later = add_tasks(db_conn, 5, key="B") + add_tasks(db_conn, 3)
    first = queue.complete_and_claim_many(
        database, [], instance_id="a", limits={"default": 10}, lease_seconds=30
    )
    assert [c.task.concurrency_key for c in first.claims] == ["A"]
    assert first.refused == 9  # the dispatcher looks again at once
    second = claim(database)
    assert sorted(c.task.id for c in second) == [later[0], *later[5:]]  # B's first
    assert statuses(db_conn, later) == ["processing", *["pending"] * 4, *["processing"] * 3]


def test_a_keys_own_limit_overrides_its_queues_default(
    client: FlaskClient, database: Database, db_conn: psycopg.Connection
) -> None:
    assert client.put("/queues/default", json={"key_concurrency_limit": 1}).status_code == 200
    response = client.put("/queues/default/keys/tenant:7", json={"concurrency_limit": 4})
    assert response.status_code == 200
    assert response.json["effective_concurrency_limit"] == 4
    add_tasks(db_conn, 10, key="tenant:7")
    add_tasks(db_conn, 10, key="tenant:8")
    for _ in range(4):
        claim(database)
    assert (running(db_conn, "tenant:7"), running(db_conn, "tenant:8")) == (4, 1)
    assert client.get("/queues/default/keys/tenant:7").json["running"] == 4


# -- rates and throttles --------------------------------------------------------------------


def test_a_rate_spaces_starts_evenly_and_allows_its_burst(
    client: FlaskClient, database: Database, db_conn: psycopg.Connection
) -> None:
    rate = {"limit": 4, "period_seconds": 1, "burst": 2}
    assert client.put("/queues/default", json={"rate_limit": rate}).status_code == 200
    ids = add_tasks(db_conn, 6)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "pending" in statuses(db_conn, ids):
        claim(database)
        due = queue.seconds_until_next_due(database)
        time.sleep(min(due if due is not None else 0.05, 0.5))
    starts = [
        row[0]
        for row in db_conn.execute(
            "SELECT extract(epoch FROM started_at) FROM tasks ORDER BY started_at"
        ).fetchall()
    ]
    assert len(starts) == 6
    times = [float(t) for t in starts]
    assert times[1] - times[0] < 0.1  # the burst of 2
    # n starts span at least (n - burst) intervals of 1/4 s, measured on one clock: any second
    # holds at most limit + burst - 1 = 5 starts.
    for i, j in itertools.combinations(range(len(times)), 2):
        assert times[j] - times[i] >= (j - i + 1 - 2) * 0.25 - 1e-6, (i, j, times)
    assert times[-1] - times[0] < 2


def test_a_throttle_holds_back_the_keys_other_tasks_and_not_the_others(
    run_worker: Any, db_conn: psycopg.Connection
) -> None:
    # One at a time per key: the throttle comes before the key's next task starts.
    db_conn.execute("INSERT INTO queues (name, key_concurrency_limit) VALUES ('default', 1)")
    first, *rest = add_tasks(db_conn, 3, key="api-key-1")
    other = add_tasks(db_conn, 1, key="api-key-2")
    started: dict[int, float] = {}

    def processor(task: TaskSnapshot, context: Context) -> None:
        started.setdefault(task.id, time.monotonic())
        if task.id == first and len(task_errors(db_conn, first)) == 0:
            context.throttle(1.5, "429 Too Many Requests")

    begun = time.monotonic()
    run_worker(processor, worker_concurrency=4)
    wait_for(lambda: set(statuses(db_conn, [first, *rest, *other])) == {"completed"}, timeout=10)
    assert started[other[0]] - begun < 0.5
    assert all(started[task_id] - begun >= 1.4 for task_id in rest), started
    (deferral,) = task_errors(db_conn, first)
    assert deferral["error"].startswith("Throttled: 429 Too Many Requests")
    row = db_conn.execute(
        "SELECT throttle_reason FROM concurrency_keys WHERE key = 'api-key-1'"
    ).fetchone()
    assert row[0].startswith("Throttled: 429")


# -- pause and resume -----------------------------------------------------------------------


def test_a_paused_queue_claims_nothing_and_resume_wakes_the_worker(
    client: FlaskClient, run_worker: Any, db_conn: psycopg.Connection
) -> None:
    assert client.post("/queues/llm/pause").json["paused"] is True
    paused = add_tasks(db_conn, 3, queue_name="llm")
    others = add_tasks(db_conn, 3)
    run_worker(lambda task: None, worker_queues=(("default", 2), ("llm", 2)))
    wait_for(lambda: set(statuses(db_conn, others)) == {"completed"})
    assert statuses(db_conn, paused) == ["pending"] * 3
    listed = {q["name"]: q for q in client.get("/queues/").json}
    assert listed["llm"]["counts"]["pending"] == 3 and listed["llm"]["paused"]
    resumed = time.monotonic()
    assert client.post("/queues/llm/resume").json["paused"] is False
    wait_for(lambda: set(statuses(db_conn, paused)) == {"completed"}, timeout=5)
    # Woken, not found by a poll (POLL_INTERVAL_SECONDS is 0.2 s in these tests).
    assert time.monotonic() - resumed < 2


def test_a_pause_waits_for_a_claim_in_flight(client: FlaskClient, database_url: str) -> None:
    with psycopg.connect(database_url) as claim_in_flight:
        # What taskapp_admit() holds until the claim commits.
        claim_in_flight.execute(
            "SELECT pg_advisory_xact_lock_shared(taskapp_flow_lock('default', NULL))"
        )
        done = threading.Event()
        pauser = threading.Thread(target=lambda: (client.post("/queues/default/pause"), done.set()))
        pauser.start()
        assert not done.wait(0.5)  # still waiting on the claim
        claim_in_flight.commit()
        assert done.wait(5)
        pauser.join()


# -- the API --------------------------------------------------------------------------------


def test_tasks_name_their_queue_and_key(client: FlaskClient) -> None:
    created = client.post("/tasks/", json={"title": "t", "queue": "llm", "concurrency_key": "k"})
    assert created.status_code == 201
    assert (created.json["queue"], created.json["concurrency_key"]) == ("llm", "k")
    assert client.post("/tasks/", json={"title": "u"}).json["queue"] == "default"
    listed = client.get("/tasks/?queue=llm")
    assert [t["id"] for t in listed.json] == [created.json["id"]]
    assert listed.headers["X-Total-Count"] == "1"
    moved = client.put(f"/tasks/{created.json['id']}", json={"queue": "other"})
    assert moved.json["queue"] == "other"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"title": "t", "queue": ""}, "queue"),
        ({"title": "t", "queue": "has space"}, "queue"),
        ({"title": "t", "queue": "x" * 65}, "queue"),
        ({"title": "t", "concurrency_key": ""}, "concurrency_key"),
        ({"title": "t", "concurrency_key": "a b"}, "concurrency_key"),
        ({"title": "t", "concurrency_key": "k" * 201}, "concurrency_key"),
    ],
)
def test_bad_queue_names_and_keys_are_422s(client: FlaskClient, body: dict, field: str) -> None:
    assert_problem(client.post("/tasks/", json=body), 422, field)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"rate_limit": {"limit": 0, "period_seconds": 1}}, "rate_limit.limit"),
        ({"rate_limit": {"limit": 1, "period_seconds": 0}}, "rate_limit.period_seconds"),
        ({"rate_limit": {"limit": 1, "period_seconds": "60"}}, "rate_limit.period_seconds"),
        ({"rate_limit": {"limit": 1}}, "rate_limit.period_seconds"),
        ({"rate_limit": {"limit": 1, "period_seconds": 1, "burst": 0}}, "rate_limit.burst"),
        ({"key_concurrency_limit": 0}, "key_concurrency_limit"),
        ({"key_concurrency_limit": True}, "key_concurrency_limit"),
        ({"paused": True}, "paused"),
    ],
)
def test_bad_limits_are_422s_and_change_nothing(
    client: FlaskClient, body: dict, field: str
) -> None:
    before = client.get("/queues/default").json
    assert_problem(client.put("/queues/default", json=body), 422, field)
    assert client.get("/queues/default").json == before


def test_a_processing_task_keeps_its_queue_and_key(client: FlaskClient, database: Database) -> None:
    task = client.post("/tasks/", json={"title": "t", "concurrency_key": "k"}).json
    (claimed,) = claim(database)
    body = assert_problem(client.put(f"/tasks/{task['id']}", json={"concurrency_key": "j"}), 409)
    assert "processing" in body["detail"]
    assert client.get(f"/tasks/{task['id']}").json["concurrency_key"] == "k"
    assert claimed.task.concurrency_key == "k"


def test_a_key_without_limits_or_tasks_is_a_404_and_delete_forgets_one(
    client: FlaskClient,
) -> None:
    assert_problem(client.get("/queues/default/keys/openai/gpt-4o"), 404)
    response = client.put("/queues/default/keys/openai/gpt-4o", json={"concurrency_limit": 2})
    assert response.json["key"] == "openai/gpt-4o"
    assert [k["key"] for k in client.get("/queues/default/keys/").json] == ["openai/gpt-4o"]
    assert client.delete("/queues/default/keys/openai/gpt-4o").status_code == 204
    assert_problem(client.get("/queues/default/keys/openai/gpt-4o"), 404)
    assert_problem(client.delete("/queues/default/keys/openai/gpt-4o"), 404)


def test_metrics_show_running_and_throttled_per_queue(
    client: FlaskClient, database: Database, db_conn: psycopg.Connection
) -> None:
    add_tasks(db_conn, 2, queue_name="llm")
    client.post("/queues/llm/pause")
    db_conn.execute(
        "INSERT INTO concurrency_keys (queue, key, throttled_until)"
        " VALUES ('llm', 'k', now() + interval '1 minute')"
    )
    client.post("/queues/llm/resume")
    claim(database, llm=1)
    text = client.get("/metrics").get_data(as_text=True)
    assert 'taskapp_queue_running{queue="llm"} 1.0' in text
    assert 'taskapp_queue_throttled_keys{queue="llm"} 1.0' in text
    assert 'taskapp_queue_paused{queue="llm"} 0.0' in text


# -- settings -------------------------------------------------------------------------------


def test_worker_queues_and_queue_processors_are_read_and_checked() -> None:
    env = {"WORKER_QUEUES": "default:4, llm:16,batch", "WORKER_CONCURRENCY": "2"}
    settings = Settings.from_env(env)
    assert settings.served_queues == {"default": 4, "llm": 16, "batch": 2}
    assert Settings.from_env({}).served_queues == {"default": 1}
    processors = Settings.from_env({"QUEUE_PROCESSORS": "llm=examples.sentiment:process"})
    assert processors.processor_for("llm") == "examples.sentiment:process"
    assert processors.processor_for("default") == processors.task_processor
    for bad, named in [
        ({"WORKER_QUEUES": "a:0"}, "WORKER_QUEUES"),
        ({"WORKER_QUEUES": "a,a"}, "twice"),
        ({"WORKER_QUEUES": "bad name:2"}, "WORKER_QUEUES"),
        ({"QUEUE_PROCESSORS": "llm"}, "QUEUE_PROCESSORS"),
        ({"QUEUE_PROCESSORS": "llm=nocolon"}, "QUEUE_PROCESSORS"),
    ]:
        with pytest.raises(ConfigError, match=named):
            Settings.from_env(bad)


def test_each_queue_runs_its_own_processor(
    gateway: Database, settings: Settings, db_conn: psycopg.Connection
) -> None:
    seen: dict[int, str] = {}
    default_ids = add_tasks(db_conn, 2)
    llm_ids = add_tasks(db_conn, 2, queue_name="llm")
    worker = Worker(
        database=gateway,
        settings=settings.with_changes(worker_queues=(("default", 1), ("llm", 1))),
        processor=lambda task: seen.setdefault(task.id, "default"),
        processors={"llm": lambda task: seen.setdefault(task.id, "llm")},
        instance_id="in-process",
    )
    worker.start()
    try:
        wait_for(lambda: set(statuses(db_conn, default_ids + llm_ids)) == {"completed"})
    finally:
        worker.stop(grace=0)
    assert [seen[i] for i in default_ids + llm_ids] == ["default"] * 2 + ["llm"] * 2
