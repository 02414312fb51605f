"""The Database gateway's pool: reuse, idle checks, dead connections, exhaustion and closing, on
a real PostgreSQL (connections are terminated with pg_terminate_backend, as a restart would)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from flask.testing import FlaskClient

from taskapp import database as database_module
from taskapp.config import normalize_database_url
from taskapp.database import Database, PoolTimeout
from tests.support import wait_for

POOL_SIZE = 2
POOL_TIMEOUT = 0.5


@pytest.fixture
def gateway(database_url: str) -> Iterator[Database]:
    gateway = Database(
        normalize_database_url(database_url), pool_size=POOL_SIZE, pool_timeout=POOL_TIMEOUT
    )
    yield gateway
    gateway.close()


def backend_pid(gateway: Database) -> int:
    with gateway.connection() as conn:
        return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def terminate(db_conn: psycopg.Connection, *pids: int) -> None:
    for pid in pids:
        db_conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_connections_are_reused_and_stay_in_autocommit(gateway: Database) -> None:
    first = backend_pid(gateway)
    with gateway.connection() as conn:
        assert conn.autocommit
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == first
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS scratch (x int)")
        conn.execute("INSERT INTO scratch VALUES (1)")  # committed at once, no transaction
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_stats_count_the_connections_in_use_and_idle(gateway: Database) -> None:
    pool = gateway.pool
    with pool.connection(), pool.connection():
        assert pool.stats() == {"in_use": 2, "idle": 0, "max": POOL_SIZE, "waiting": 0}
    assert pool.stats() == {"in_use": 0, "idle": 2, "max": POOL_SIZE, "waiting": 0}
    assert gateway.max_connections == POOL_SIZE + 1  # and the listener's


def test_stats_count_the_statements_waiting_for_a_connection(gateway: Database) -> None:
    pool = gateway.pool
    with contextlib.ExitStack() as held:
        for _ in range(POOL_SIZE):
            held.enter_context(pool.connection())
        # It gives up after POOL_TIMEOUT: only its wait is of interest here.
        waiter = threading.Thread(target=lambda: gateway.fetchone("ping"), daemon=True)
        waiter.start()
        wait_for(lambda: pool.stats()["waiting"] == 1, what="a statement waiting")
        assert pool.stats()["in_use"] == POOL_SIZE
    waiter.join(5)
    assert pool.stats()["waiting"] == 0


def test_connection_killed_while_idle_is_replaced_unnoticed(
    gateway: Database, db_conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = backend_pid(gateway)
    terminate(db_conn, old)
    monkeypatch.setattr(database_module, "PING_AFTER_IDLE_SECONDS", 0.0)  # every checkout pings
    assert backend_pid(gateway) != old


def test_connection_dying_in_use_fails_that_statement_and_discards_the_idle_ones(
    gateway: Database, db_conn: psycopg.Connection
) -> None:
    pool = gateway.pool
    with pool.connection() as a, pool.connection() as b:
        pids = [c.execute("SELECT pg_backend_pid()").fetchone()[0] for c in (a, b)]
    terminate(db_conn, *pids)  # both now idle in the pool, and dead
    with pytest.raises(psycopg.OperationalError), pool.connection() as conn:
        conn.execute("SELECT 1")
    # The other dead one was dropped with it: the next statement gets a fresh connection at
    # once, without the idle check (it was returned well under a second ago).
    assert backend_pid(gateway) not in pids


def test_connection_left_in_a_transaction_is_not_reused(gateway: Database) -> None:
    with gateway.connection() as conn:
        conn.execute("BEGIN")
        in_transaction = conn
    assert in_transaction.closed
    with gateway.connection() as conn:
        assert conn is not in_transaction


@pytest.fixture
def exhausted(gateway: Database) -> Iterator[threading.Event]:
    """Every connection of the pool held by a thread until the event is set."""
    size = POOL_SIZE
    held, release = threading.Barrier(size + 1), threading.Event()

    def hold() -> None:
        with gateway.connection():
            held.wait()
            release.wait(10)

    threads = [threading.Thread(target=hold) for _ in range(size)]
    for thread in threads:
        thread.start()
    held.wait(10)
    yield release
    release.set()
    for thread in threads:
        thread.join()


def test_exhausted_pool_times_out_with_a_database_error(
    gateway: Database, exhausted: threading.Event, db_conn: psycopg.Connection
) -> None:
    started = time.monotonic()
    with pytest.raises(PoolTimeout) as raised, gateway.connection():
        pass
    assert time.monotonic() - started >= POOL_TIMEOUT
    assert isinstance(raised.value, psycopg.OperationalError)  # the API's 503
    opened = db_conn.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = 'taskapp' AND datname = current_database()"
    ).fetchone()[0]
    assert opened == POOL_SIZE  # waiting, never a connection beyond the pool's size
    exhausted.set()
    assert backend_pid(gateway) > 0  # free again


def test_a_waiting_checkout_gets_the_first_connection_freed(
    gateway: Database, exhausted: threading.Event
) -> None:
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(backend_pid(gateway)))
    waiter.start()
    wait_for(lambda: gateway.pool._waiting == 1, timeout=0.4, interval=0.01)
    exhausted.set()
    waiter.join(5)
    assert got and got[0] > 0


def test_close_closes_the_idle_connections(gateway: Database, db_conn: psycopg.Connection) -> None:
    pid = backend_pid(gateway)
    gateway.close()
    # The backend exits a moment after its client closes the connection.
    wait_for(
        lambda: (
            db_conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()[0]
            == 0
        ),
        timeout=5,
        what="the idle connection's backend gone",
    )
    assert backend_pid(gateway) != pid  # a new pool, on first use


def test_api_answers_503_while_every_pooled_connection_is_dead(
    client: FlaskClient, db_conn: psycopg.Connection
) -> None:
    created = client.post("/tasks/", json={"title": "t"})
    assert created.status_code == 201
    path = created.headers["Location"]
    db_conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND application_name LIKE 'taskapp:%'"
    )
    first = client.get(path)
    assert first.status_code == 503
    assert first.mimetype == "application/problem+json"
    assert client.get(path).status_code == 200  # the rest were dropped with it


def test_the_claim_runs_on_its_generic_plan_and_leaves_the_session_as_it_was(
    gateway: Database,
) -> None:
    """`-- plan: generic` (the dispatcher's claim): once psycopg has prepared it, PostgreSQL
    runs it on one plan instead of planning it anew every round, and the setting that makes it
    so ends with the statement's transaction."""
    params = {
        "task_ids": [],
        "lease_tokens": [],
        "results": [],
        "instance_id": "plan-test",
        "queues": ["no-such-queue"],
        "limits": [1],
        "lease_seconds": 30,
    }
    with gateway.connection() as conn:
        for _ in range(8):  # psycopg prepares on the fifth execution
            gateway.fetch("complete_and_claim", params, conn=conn)
        generic, custom = conn.execute(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
            " WHERE statement LIKE '%%-- plan: generic%%'"
        ).fetchone()
        assert generic > 0 and custom == 0, (generic, custom)
        assert conn.execute("SHOW plan_cache_mode").fetchone()[0] == "auto"
