"""Behind PgBouncer in transaction mode (a real one, Debian's `pgbouncer`): statements go
through it, the LISTEN connection goes to PostgreSQL directly (LISTEN_DATABASE_URL), and
nothing relies on a session outliving its transaction. A LISTEN sent through PgBouncer is
accepted and hears nothing: then the worker wakes by polling and the log says so."""

from __future__ import annotations

import collections
import logging
import threading
import time

import psycopg
import pytest

from taskapp import database as database_module
from taskapp.database import Database
from tests.support import EventLog, Load, create_task, task_row, wait_for
from tools.pgbouncer import PgBouncer

# A task's pickup when only LISTEN can make it prompt (the poll interval is far longer).
PROMPT_SECONDS = 2.0


def dbname(url: str) -> str:
    return url.rpartition("/")[2]


def connections(db_conn: psycopg.Connection) -> collections.Counter[str]:
    """The service's backends of this database: the listeners' (direct) and the pools' (each
    PgBouncer server connection carries the application_name of the last client it served)."""
    rows = db_conn.execute(
        "SELECT application_name FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name LIKE 'taskapp%'"
    ).fetchall()
    return collections.Counter(
        "listener" if name == "taskapp-listener" else "pooled" for (name,) in rows
    )


def run_named_statements(gateway: Database, threads: int = 8) -> list[str]:
    """Named statements from many threads at once; the errors they met."""
    failures: list[str] = []

    def run() -> None:
        for _ in range(60):
            try:
                gateway.fetch("queue_counts")
                gateway.fetch("ping")
            except psycopg.Error as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(60)
    gateway.close()
    return failures


def test_a_server_that_refuses_session_options_gets_no_prepared_statements(
    pgbouncer, database_url, caplog
):
    """PgBouncer as installed refuses libpq's `options`: taskapp connects without them, says
    so once, and prepares nothing even with DB_PREPARED_STATEMENTS on."""
    database_module._refuses_options.clear()
    gateway = Database(pgbouncer.url(dbname(database_url)), pool_size=6)
    with caplog.at_level(logging.WARNING, logger="taskapp.database"):
        assert run_named_statements(gateway) == []
    refusals = [r for r in caplog.records if "refuses session options" in r.getMessage()]
    assert len(refusals) == 1


@pytest.fixture
def lenient_pgbouncer(server_url: str):
    """A PgBouncer that accepts and drops libpq's `options` (ignore_startup_parameters)."""
    with PgBouncer.in_front_of(server_url, ignore_startup_parameters="options") as bouncer:
        yield bouncer


def test_prepared_statements_fail_through_pgbouncer_unless_turned_off(
    lenient_pgbouncer, database_url
):
    """With nothing to tell it is a pooler, DB_PREPARED_STATEMENTS=0 is what keeps psycopg
    from preparing: on, the fifth run of a statement breaks on another server session."""
    url = lenient_pgbouncer.url(dbname(database_url))
    preparing = run_named_statements(Database(url, pool_size=6, prepared_statements=True))
    assert any("PreparedStatement" in f or "SqlStatementName" in f for f in preparing)
    assert run_named_statements(Database(url, pool_size=6, prepared_statements=False)) == []


def test_two_instances_behind_pgbouncer_create_process_and_complete(
    instances, pgbouncer, database_url, db_conn
):
    through_pgbouncer = pgbouncer.url(dbname(database_url))
    group = [
        instances(
            wait=False,
            DATABASE_URL=through_pgbouncer,
            LISTEN_DATABASE_URL=database_url,
            DB_PREPARED_STATEMENTS=0,
            WORKER_CONCURRENCY=4,
            DB_POOL_SIZE=6,
            # Only a working LISTEN makes a task start within PROMPT_SECONDS.
            POLL_INTERVAL_SECONDS=30,
        )
        for _ in range(2)
    ]
    for instance in group:
        instance.wait_healthy()
    wait_for(lambda: connections(db_conn)["listener"] == 2, what="both listeners, direct")
    peak = 0
    # One event log for the whole run: a second one opened later would miss what came between.
    with EventLog(database_url) as events:
        with Load([i.url for i in group], threads=8) as load:
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:
                peak = max(peak, connections(db_conn)["pooled"])
                time.sleep(0.05)
        assert load.bad == [], load.bad[:3]
        assert load.codes[201] >= 100, dict(load.codes)
        created = load.created_ids()
        wait_for(
            lambda: (
                db_conn.execute(
                    "SELECT count(*) FROM tasks WHERE id = ANY(%s) AND status = 'completed'",
                    (created,),
                ).fetchone()[0]
                == len(created)
            ),
            timeout=30,
            what="every task completed",
        )
        # Its last completion event may trail its commit by a moment.
        wait_for(
            lambda: (
                len({e["task_id"] for e in events.events("task.completed")} & set(created))
                == len(created)
            ),
            timeout=10,
            what="every completion's event",
        )
        completions = collections.Counter(e["task_id"] for e in events.events("task.completed"))
    assert all(completions[t] == 1 for t in created), "a task completed twice, or unseen"
    # PostgreSQL saw PgBouncer's server pool and the two direct listeners, nothing more.
    print(f"\n{len(created)} tasks; {dict(load.codes)}; peak {peak} server connections")
    assert peak <= pgbouncer.pool_size

    started = time.monotonic()
    task = create_task(group[0].url, "prompt")
    wait_for(
        lambda: task_row(db_conn, task["id"])["status"] == "completed",
        timeout=PROMPT_SECONDS,
        interval=0.01,
        what="a task picked up through the direct LISTEN",
    )
    print(f"picked up and completed {time.monotonic() - started:.3f}s after its POST")
    for instance in group:
        assert "LISTEN hears no notifications" not in instance.log()
        assert "Exception in thread" not in instance.log()


def test_listen_through_pgbouncer_says_so_and_the_worker_polls(
    instances, pgbouncer, database_url, db_conn
):
    instance = instances(
        DATABASE_URL=pgbouncer.url(dbname(database_url)),
        DB_PREPARED_STATEMENTS=0,
        POLL_INTERVAL_SECONDS=0.5,
    )
    wait_for(
        lambda: "LISTEN hears no notifications" in instance.log(),
        what="the listener saying it hears nothing",
    )
    tasks = [create_task(instance.url, f"polled {n}") for n in range(5)]
    for task in tasks:
        wait_for(
            lambda task=task: task_row(db_conn, task["id"])["status"] == "completed",
            timeout=10,
            what="a task picked up by polling",
        )
    assert instance.log().count("LISTEN hears no notifications") == 1


def test_migrations_run_through_pgbouncer(pgbouncer, server_url) -> None:
    """The schema upgrade (one transaction under a transaction-scoped advisory lock) works
    through PgBouncer too, on a new database."""
    import uuid

    from psycopg import sql

    from taskapp import create_app
    from taskapp.config import Settings
    from taskapp.database import upgrade_schema

    name = f"taskapp_bouncer_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        app = create_app(Settings(database_url=pgbouncer.url(name), auto_migrate=False).validated())
        upgrade_schema(app)
        with psycopg.connect(server_url.rpartition("/")[0] + "/" + name) as conn:
            (version,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        assert version
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
