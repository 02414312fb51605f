"""The statement pool: reuse, idle checks, dead connections, exhaustion and disposal, on a real
PostgreSQL (connections are terminated with pg_terminate_backend, as a restart would)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from flask.testing import FlaskClient
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from taskapp import database
from taskapp.config import normalize_database_url
from taskapp.database import StatementPoolTimeout, autocommit_connection, statement_pool
from tests.support import wait_for


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(normalize_database_url(database_url), pool_size=2, pool_timeout=0.5)
    yield engine
    engine.dispose()


def backend_pid(engine: Engine) -> int:
    with autocommit_connection(engine) as conn:
        return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def terminate(db_conn: psycopg.Connection, *pids: int) -> None:
    for pid in pids:
        db_conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_connections_are_reused_and_stay_in_autocommit(engine: Engine) -> None:
    first = backend_pid(engine)
    with autocommit_connection(engine) as conn:
        assert conn.autocommit
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == first
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS scratch (x int)")
        conn.execute("INSERT INTO scratch VALUES (1)")  # committed at once, no transaction
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_stats_count_the_connections_in_use_and_idle(engine: Engine) -> None:
    pool = statement_pool(engine)
    most = engine.pool.size() + database.POOL_OVERFLOW
    with pool.connection(), pool.connection():
        assert pool.stats() == {"in_use": 2, "idle": 0, "max": most}
    assert pool.stats() == {"in_use": 0, "idle": 2, "max": most}


def test_connection_killed_while_idle_is_replaced_unnoticed(
    engine: Engine, db_conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = backend_pid(engine)
    terminate(db_conn, old)
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 0.0)  # every checkout pings
    assert backend_pid(engine) != old


def test_connection_dying_in_use_fails_that_statement_and_discards_the_idle_ones(
    engine: Engine, db_conn: psycopg.Connection
) -> None:
    pool = statement_pool(engine)
    with pool.connection() as a, pool.connection() as b:
        pids = [c.execute("SELECT pg_backend_pid()").fetchone()[0] for c in (a, b)]
    terminate(db_conn, *pids)  # both now idle in the pool, and dead
    with pytest.raises(psycopg.OperationalError), pool.connection() as conn:
        conn.execute("SELECT 1")
    # The other dead one was dropped with it: the next statement gets a fresh connection at
    # once, without the idle check (it was returned well under a second ago).
    assert backend_pid(engine) not in pids


def test_a_burst_beyond_the_pool_size_is_closed_when_it_ends(
    engine: Engine, db_conn: psycopg.Connection
) -> None:
    pool = statement_pool(engine)
    with pool.connection() as a, pool.connection() as b, pool.connection() as c:
        pids = [x.execute("SELECT pg_backend_pid()").fetchone()[0] for x in (a, b, c)]
    alive = db_conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
    ).fetchone()[0]
    assert alive == engine.pool.size() == 2


def test_connection_left_in_a_transaction_is_not_reused(engine: Engine) -> None:
    with autocommit_connection(engine) as conn:
        conn.execute("BEGIN")
        in_transaction = conn
    assert in_transaction.closed
    with autocommit_connection(engine) as conn:
        assert conn is not in_transaction


@pytest.fixture
def exhausted(engine: Engine) -> Iterator[threading.Event]:
    """Every connection of the statement pool held by a thread until the event is set."""
    size = engine.pool.size() + database.POOL_OVERFLOW
    held, release = threading.Barrier(size + 1), threading.Event()

    def hold() -> None:
        with autocommit_connection(engine):
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
    engine: Engine, exhausted: threading.Event
) -> None:
    started = time.monotonic()
    with pytest.raises(StatementPoolTimeout) as raised, autocommit_connection(engine):
        pass
    assert time.monotonic() - started >= engine.pool.timeout()
    assert isinstance(raised.value, psycopg.OperationalError)  # the API's 503
    exhausted.set()
    assert backend_pid(engine) > 0  # free again


def test_a_waiting_checkout_gets_the_first_connection_freed(
    engine: Engine, exhausted: threading.Event
) -> None:
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(backend_pid(engine)))
    waiter.start()
    wait_for(lambda: statement_pool(engine)._waiting == 1, timeout=0.4, interval=0.01)
    exhausted.set()
    waiter.join(5)
    assert got and got[0] > 0


def test_dispose_closes_the_idle_connections(engine: Engine, db_conn: psycopg.Connection) -> None:
    pid = backend_pid(engine)
    engine.dispose()
    alive = db_conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
    assert alive.fetchone()[0] == 0
    assert backend_pid(engine) != pid  # a new pool, on first use


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
