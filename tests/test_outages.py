"""Database outages under load: every connection of the service terminated, and a PostgreSQL
restart (on a private server the test owns: the shared one must never be restarted).

What must hold: the API answers 503 problem+json while the database is unusable (never a 500,
never a hang) and recovers by itself; the worker thread survives and carries on; the LISTEN
connection comes back; no task is lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
import requests

from tests.support import (
    Instance,
    Load,
    conversation_statuses,
    create_task,
    healthy,
    status_counts,
    task_row,
    wait_for,
)

PROBLEM = "application/problem+json"


def backends(db_conn: psycopg.Connection, application: str) -> set[int]:
    """Server pids of this database's connections whose application_name is LIKE the pattern."""
    rows = db_conn.execute(
        "SELECT pid FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name LIKE %s"
        " AND pid <> pg_backend_pid()",
        (application,),
    ).fetchall()
    return {pid for (pid,) in rows}


def all_completed(db_conn: psycopg.Connection, task_ids: list[int]) -> Callable[[], bool]:
    def check() -> bool:
        (done,) = db_conn.execute(
            "SELECT count(*) FROM tasks WHERE id = ANY(%s) AND status = 'completed'", (task_ids,)
        ).fetchone()
        return done == len(set(task_ids))

    return check


def test_terminating_every_connection_costs_a_few_503s_and_nothing_else(instances, db_conn):
    # A 30 s poll: only a live LISTEN connection can make a new task start within 2 s.
    group = healthy(*(instances(wait=False, POLL_INTERVAL_SECONDS=30) for _ in range(2)))
    listeners = wait_for(
        lambda: len(pids := backends(db_conn, "taskapp-listener")) == 2 and pids,
        what="both instances listening",
    )
    threads, cuts = 6, 3
    terminated: list[str] = []
    with Load([i.url for i in group], threads=threads) as load:
        for _ in range(cuts):
            load.wait_more(60)
            # The pool ("taskapp:<instance>") and the listener ("taskapp-listener"),
            # of this test database only: other sessions may share the server.
            rows = db_conn.execute(
                "SELECT application_name, pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name LIKE 'taskapp%'"
                " AND pid <> pg_backend_pid()"
            ).fetchall()
            terminated += [name for name, _ in rows]
            cut_at = time.monotonic()
        load.wait_more(60)
        after = load.created_ids(since=cut_at)

    print(f"\nterminated {len(terminated)} connections in {cuts} cuts; answers {dict(load.codes)}")
    assert terminated.count("taskapp-listener") >= 2
    assert len(terminated) > 2 * cuts, "the pools' connections were terminated too"
    assert load.bad == []
    # At most the requests in flight when their connection was cut; the pool's pre-ping
    # replaces the idle ones unnoticed.
    assert load.codes[503] <= threads * cuts
    assert after, "tasks were created after the cut"
    wait_for(all_completed(db_conn, load.created_ids()), timeout=15, what="every task completed")
    assert status_counts(db_conn).keys() == {"completed"}

    # Both instances listen again, on new connections.
    wait_for(
        lambda: len(pids := backends(db_conn, "taskapp-listener")) == 2 and not pids & listeners,
        timeout=10,
        what="both listeners reconnected",
    )
    started = time.monotonic()
    task = create_task(group[0].url, "after the cut")
    wait_for(
        lambda: task_row(db_conn, task["id"])["status"] == "completed",
        timeout=2,
        interval=0.01,
        what="a new task picked up by a woken worker",
    )
    print(f"picked up and completed {time.monotonic() - started:.2f}s after its POST")


def test_a_postgres_restart_costs_503s_and_no_task(private_postgres):
    private_postgres.create_database("taskapp")
    url = private_postgres.url("taskapp")
    # The service creates the schema itself; the work takes a moment, so some tasks are
    # mid-processing when the database goes.
    instance = Instance(
        url,
        PROCESSING_MIN_SECONDS=0.02,
        PROCESSING_MAX_SECONDS=0.1,
        WORKER_CONCURRENCY=4,
        LEASE_SECONDS=6,
    )
    try:
        instance.start()
        with Load([instance.url], threads=2) as load:
            wait_for(lambda: len(load.created_ids()) >= 20, timeout=15, what="tasks created")
            private_postgres.stop()
            down_at = time.monotonic()

            # While it is down: quick 503s, as problem+json (the health check has its own body).
            for method, path in (("POST", "/tasks/"), ("GET", "/tasks/"), ("GET", "/tasks/1")):
                asked = time.monotonic()
                response = requests.request(
                    method, instance.url + path, json={"title": "down"}, timeout=10
                )
                assert response.status_code == 503, (path, response.status_code, response.text)
                assert response.headers["Content-Type"].startswith(PROBLEM)
                assert response.json()["status"] == 503
                assert time.monotonic() - asked < 6, "a request hung on the dead database"
            health = requests.get(instance.url + "/health", timeout=10)
            assert (health.status_code, health.json()["status"]) == (503, "unhealthy")
            # Down long enough for every background thread to notice (the housekeeper runs
            # every LEASE_SECONDS / 3) and back off.
            wait_for(lambda: load.codes[503] >= 10, timeout=5, what="the load seeing 503s")
            wait_for(
                lambda: (
                    "housekeeping failed" in (log := instance.log())
                    and "listener disconnected" in log
                ),
                timeout=10,
                what="the housekeeper and the listener failing",
            )

            private_postgres.start()
            up_at = time.monotonic()
            first = wait_for(
                lambda: load.created_ids(since=up_at), timeout=20, what="the API creating again"
            )[0]
            api_back = time.monotonic() - up_at
            with psycopg.connect(url, autocommit=True) as conn:
                wait_for(
                    lambda: task_row(conn, first)["status"] == "completed",
                    timeout=15,
                    what="the worker completing tasks again",
                )
            worker_back = time.monotonic() - up_at
            wait_for(lambda: len(load.created_ids(since=up_at)) >= 20, timeout=20)

        print(f"\ndown {up_at - down_at:.2f}s; answers {dict(load.codes)}")
        print(
            f"after PostgreSQL came back: API {api_back:.2f}s, worker {worker_back:.2f}s; "
            f"slowest answer {load.slowest:.2f}s"
        )
        assert load.bad == []
        assert load.slowest < 6
        created = load.created_ids()
        with psycopg.connect(url, autocommit=True) as conn:
            wait_for(all_completed(conn, created), timeout=30, what="every task completed")
            assert status_counts(conn).keys() == {"completed"}
            assert all(conversation_statuses(conn, t) == ["processed"] for t in created)
        # The same worker thread carried on: no restart, the instance's counts go on.
        worker = instance.status()["worker"]
        assert worker["running"] is True
        assert worker["processed"] >= len(created)
        assert "Exception in thread" not in instance.log()
    finally:
        instance.stop()
