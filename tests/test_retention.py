"""Retention: the housekeeper deletes finished tasks past RETENTION_*_SECONDS, in batches,
once across the cluster, leaving everything else as it was and the counts exact."""

from __future__ import annotations

import threading

import psycopg
import pytest
from flask.testing import FlaskClient

from taskapp import metrics
from taskapp.config import Settings
from taskapp.database import Database
from taskapp.housekeeper import PRUNE_BATCH, Housekeeper
from taskapp.worker import Worker

DAY = 86400


def add_finished(conn: psycopg.Connection, n: int, status: str, age_seconds: float) -> None:
    conn.execute(
        "WITH t AS ("
        " INSERT INTO tasks (title, max_attempts, status, processed_at, updated_at)"
        " SELECT %s || g, 3, %s, now(), now() - make_interval(secs => %s)"
        " FROM generate_series(1, %s) AS g RETURNING id),"
        " c AS (INSERT INTO conversations (task_id, content) SELECT id, 'c' FROM t)"
        " INSERT INTO task_errors (task_id, attempt, error) SELECT id, 1, 'e' FROM t",
        (status, status, age_seconds, n),
    )


def counts(conn: psycopg.Connection) -> tuple[dict[str, int], dict[str, int]]:
    kept = conn.execute(
        "SELECT status, sum(n)::int FROM task_counts GROUP BY status HAVING sum(n) <> 0"
    ).fetchall()
    true = conn.execute("SELECT status, count(*)::int FROM tasks GROUP BY status").fetchall()
    return dict(kept), dict(true)


def housekeeper(database: Database, settings: Settings, name: str = "a") -> Housekeeper:
    worker = Worker(
        database=database, settings=settings, processor=lambda t: None, instance_id=name
    )
    return Housekeeper(database=database, settings=settings, instance_id=name, worker=worker)


@pytest.fixture
def keeping(settings: Settings) -> Settings:
    return settings.with_changes(
        retention_completed_seconds=7 * DAY, retention_cancelled_seconds=DAY
    )


def test_only_finished_tasks_past_their_retention_are_deleted(
    gateway: Database, keeping: Settings, db_conn: psycopg.Connection
) -> None:
    add_finished(db_conn, PRUNE_BATCH + 500, "completed", 8 * DAY)  # two batches
    add_finished(db_conn, 10, "completed", 6 * DAY)  # not yet
    add_finished(db_conn, 10, "failed", 30 * DAY)  # failed tasks are kept for ever here
    add_finished(db_conn, 10, "cancelled", 2 * DAY)
    db_conn.execute("INSERT INTO tasks (title, max_attempts) VALUES ('pending', 3)")
    unexpired = (
        "SELECT id, updated_at, xmin::text FROM tasks"
        " WHERE NOT (status = 'completed' AND updated_at < now() - interval '7 days')"
        "   AND NOT (status = 'cancelled' AND updated_at < now() - interval '1 day')"
        " ORDER BY id"
    )
    kept_before = db_conn.execute(unexpired).fetchall()
    before = metrics.TASKS_PRUNED.labels(status="completed")._value.get()

    assert housekeeper(gateway, keeping).prune() == PRUNE_BATCH + 500 + 10

    remaining = dict(db_conn.execute("SELECT status, count(*) FROM tasks GROUP BY status"))
    assert remaining == {"completed": 10, "failed": 10, "pending": 1}
    orphans = db_conn.execute(
        "SELECT (SELECT count(*) FROM conversations WHERE task_id NOT IN (SELECT id FROM tasks)),"
        " (SELECT count(*) FROM task_errors WHERE task_id NOT IN (SELECT id FROM tasks))"
    ).fetchone()
    assert orphans == (0, 0)
    assert db_conn.execute("SELECT count(*) FROM conversations").fetchone()[0] == 20
    # Not one of them was written to (xmin: the transaction that last wrote the row).
    assert db_conn.execute(unexpired).fetchall() == kept_before
    kept, true = counts(db_conn)
    assert kept == true
    assert (
        metrics.TASKS_PRUNED.labels(status="completed")._value.get() - before == PRUNE_BATCH + 500
    )


def test_instances_pruning_at_once_delete_each_task_once(
    settings: Settings, keeping: Settings, db_conn: psycopg.Connection
) -> None:
    add_finished(db_conn, 5 * PRUNE_BATCH, "completed", 8 * DAY)
    databases = [Database(settings.database_url, pool_size=2) for _ in range(3)]
    pruned: list[int] = []
    start = threading.Barrier(3)

    def prune(database: Database, name: str) -> None:
        start.wait()
        pruned.append(housekeeper(database, keeping, name).prune(budget_seconds=30))

    threads = [
        threading.Thread(target=prune, args=(database, f"i{n}"))
        for n, database in enumerate(databases)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for database in databases:
        database.close()
    assert sum(pruned) == 5 * PRUNE_BATCH
    assert db_conn.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0
    kept, true = counts(db_conn)
    assert kept == true == {}


def test_without_retention_nothing_is_deleted(
    gateway: Database, settings: Settings, db_conn: psycopg.Connection, client: FlaskClient
) -> None:
    add_finished(db_conn, 5, "completed", 1000 * DAY)
    assert housekeeper(gateway, settings).prune() == 0
    assert client.get("/status").json["queue"]["completed"] == 5


def test_retention_settings_are_read_and_checked() -> None:
    settings = Settings.from_env(
        {"RETENTION_COMPLETED_SECONDS": "604800", "RETENTION_FAILED_SECONDS": "0"}
    )
    assert settings.retention == {"completed": 604800.0}
    with pytest.raises(ValueError, match="RETENTION_CANCELLED_SECONDS"):
        Settings.from_env({"RETENTION_CANCELLED_SECONDS": "-1"})
