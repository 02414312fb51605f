"""The database engine, and the schema brought up to date under an advisory lock."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import psycopg
from flask import Flask
from psycopg.pq import TransactionStatus
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError

from . import models  # noqa: F401  (registers the tables on db.metadata)
from .config import Settings
from .extensions import db, migrate

log = logging.getLogger(__name__)

MIGRATIONS_DIR = str(Path(__file__).resolve().parent.parent / "migrations")


# A connection back in use within this time is not pinged: it just worked. One idle for longer
# (through an outage, a restart, a terminated backend) is pinged, and replaced if dead.
PING_AFTER_IDLE_SECONDS = 1.0
# Connections are closed and replaced after this long (server-side state and memory stay fresh).
RECYCLE_AFTER_SECONDS = 1800
# Connections beyond the pool's size opened for a burst, closed when they come back.
POOL_OVERFLOW = 10
# The engine's own pool serves only the transactions of the less frequent writes (delete,
# retry, cancel, conversations) and health checks; statements have a pool of their own.
TRANSACTION_POOL_SIZE = 5


def statement_pool_size(settings: Settings) -> int:
    """Connections the statement pool keeps: enough that a burst of requests and the worker
    threads reuse connections instead of opening new ones (it only grows as the load asks)."""
    return settings.db_pool_size or settings.worker_concurrency + 20


def engine_options(settings: Settings) -> dict[str, object]:
    return {
        "pool_size": TRANSACTION_POOL_SIZE,
        "max_overflow": POOL_OVERFLOW,
        "pool_timeout": 5,
        "pool_recycle": RECYCLE_AFTER_SECONDS,
        "connect_args": {
            "connect_timeout": 5,
            # A client that vanishes mid-transaction (network cut before COMMIT) must not
            # keep a task's row locked, which claims and the rescuer would skip, for hours:
            # the server drops idle transactions and probes dead peers.
            "options": (
                "-c timezone=UTC -c idle_in_transaction_session_timeout=60000"
                " -c tcp_keepalives_idle=15 -c tcp_keepalives_interval=5"
                " -c tcp_keepalives_count=3"
            ),
            "application_name": f"taskapp:{settings.instance_id[:8]}",
        },
    }


def ping_idle_connections(engine: Engine) -> None:
    """Like pool_pre_ping, but only for connections idle a while: no extra round trip per
    request under load, and still no request handed a connection that died while idle."""

    @event.listens_for(engine, "checkin")
    def _checked_in(dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError() from exc  # the pool discards it and tries another


class StatementPoolTimeout(psycopg.OperationalError):
    """Every connection of the statement pool stayed busy for the whole pool timeout."""


class StatementPool:
    """Autocommit psycopg connections for the statements that need no transaction.

    The hottest paths (task reads, single-statement writes, the queue) run one statement per
    connection checkout. Through SQLAlchemy's pool each checkout also toggled autocommit,
    rolled back on return and ran pool events: a sixth of a GET's CPU in the worker process.
    Here a checkout is a list pop under a lock; connections stay in autocommit.

    Connections are opened through the engine (its connect arguments and timeouts), then
    detached from its pool. Unlike a pool that reconnects in the background while callers wait
    (psycopg_pool), a checkout that needs a new connection opens it at once, so a database that
    is down fails a request in milliseconds, not after the pool timeout.
    """

    def __init__(self, engine: Engine, size: int, timeout: float, recycle: float) -> None:
        self._engine = engine
        self._size = size
        self._max_size = size + POOL_OVERFLOW
        self._timeout = timeout
        self._recycle = recycle
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._waiting = 0
        self._in_use = 0
        # (connection, opened at, returned at): checked out last-in first-out, so a quiet
        # period leaves the same few connections warm.
        self._idle: list[tuple[psycopg.Connection[Any], float, float]] = []
        self._closed = False
        self._pid = os.getpid()

    def connection(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A connection for the block, returned to the pool after it (closed if it broke)."""
        return _Checkout(self)

    def stats(self) -> dict[str, int]:
        """Connections checked out, idle, and the most there may be (for /status)."""
        with self._lock:
            return {"in_use": self._in_use, "idle": len(self._idle), "max": self._max_size}

    def successor(self) -> StatementPool:
        """An empty pool with the same settings, to take over from this one."""
        return StatementPool(self._engine, self._size, self._timeout, self._recycle)

    def close(self) -> None:
        """Close the idle connections, and each busy one when it comes back. In a forked
        child they belong to the parent: they are only forgotten, as SQLAlchemy's
        dispose(close=False) does."""
        self._closed = True
        if os.getpid() == self._pid:
            self._discard_idle()
        else:
            self._idle = []

    def _checkout(self) -> tuple[psycopg.Connection[Any], float]:
        with self._lock:
            if self._in_use >= self._max_size:
                self._wait_for_a_free_slot()
            self._in_use += 1
            entry = self._idle.pop() if self._idle else None
        try:
            return self._ready(entry)
        except BaseException:
            self._release_slot()
            raise

    def _wait_for_a_free_slot(self) -> None:
        deadline = time.monotonic() + self._timeout
        self._waiting += 1
        try:
            while self._in_use >= self._max_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._freed.wait(remaining):
                    raise StatementPoolTimeout(
                        f"no database connection free within {self._timeout:g}s"
                    )
        finally:
            self._waiting -= 1

    def _ready(
        self, entry: tuple[psycopg.Connection[Any], float, float] | None
    ) -> tuple[psycopg.Connection[Any], float]:
        if entry is not None:
            conn, opened_at, returned_at = entry
            if time.monotonic() - returned_at < PING_AFTER_IDLE_SECONDS or _alive(conn):
                return conn, opened_at
            # Dead after idling: so, most likely, are the others (a restart, a failover).
            conn.close()
            self._discard_idle()
        return self._open(), time.monotonic()

    def _checkin(self, conn: psycopg.Connection[Any], opened_at: float, failed: bool) -> None:
        if failed and (conn.broken or conn.closed):
            # As SQLAlchemy does on a disconnect: the connections opened before this one are
            # presumed gone too (a restart, a failover, every backend terminated), so they
            # are replaced instead of failing a request each.
            self._discard_idle()
        now = time.monotonic()
        reusable = (
            not self._closed
            and not conn.closed
            and conn.info.transaction_status == TransactionStatus.IDLE
            and now - opened_at < self._recycle
        )
        with self._lock:
            kept = reusable and len(self._idle) < self._size
            if kept:
                self._idle.append((conn, opened_at, now))
            self._free_slot()
        if not kept:
            conn.close()

    def _release_slot(self) -> None:
        with self._lock:
            self._free_slot()

    def _free_slot(self) -> None:
        self._in_use -= 1
        if self._waiting:
            self._freed.notify()

    def _discard_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _, _ in idle:
            conn.close()

    def _open(self) -> psycopg.Connection[Any]:
        pooled = self._engine.raw_connection()
        conn: psycopg.Connection[Any] = pooled.driver_connection
        pooled.detach()  # ours from now on; the engine's pool opens another when it needs one
        conn.autocommit = True
        return conn


def _alive(conn: psycopg.Connection[Any]) -> bool:
    try:
        conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


class _Checkout:
    """One use of a pooled connection, as a context manager (a class: cheaper than a generator
    on a path every request takes)."""

    __slots__ = ("_conn", "_opened_at", "_pool")

    def __init__(self, pool: StatementPool) -> None:
        self._pool = pool

    def __enter__(self) -> psycopg.Connection[Any]:
        self._conn, self._opened_at = self._pool._checkout()
        return self._conn

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self._pool._checkin(self._conn, self._opened_at, failed=exc_type is not None)


_statement_pools: weakref.WeakKeyDictionary[Engine, StatementPool] = weakref.WeakKeyDictionary()
_statement_pools_lock = threading.Lock()


def attach_statement_pool(engine: Engine, size: int) -> None:
    """Give the engine a statement pool keeping `size` connections. Disposing of the engine
    (its end, or a gunicorn worker's first step after fork, see taskapp.runtime) closes the
    pool and puts an empty one with the same settings in its place."""
    with _statement_pools_lock:
        _new_statement_pool(engine, size)


def statement_pool(engine: Engine) -> StatementPool:
    """The engine's statement pool; an engine made without init_database (tests, tools) gets
    one the size of its own pool on first use."""
    pool = _statement_pools.get(engine)
    if pool is None:
        with _statement_pools_lock:
            pool = _statement_pools.get(engine) or _new_statement_pool(engine, engine.pool.size())
    return pool


def _new_statement_pool(engine: Engine, size: int) -> StatementPool:
    # The caller holds _statement_pools_lock.
    pool = StatementPool(engine, size, timeout=engine.pool.timeout(), recycle=RECYCLE_AFTER_SECONDS)
    _statement_pools[engine] = pool
    if not event.contains(engine, "engine_disposed", _renew_statement_pool):
        event.listen(engine, "engine_disposed", _renew_statement_pool)
    return pool


def _renew_statement_pool(engine: Engine) -> None:
    with _statement_pools_lock:
        old = _statement_pools.get(engine)
        if old is None:
            return
        _statement_pools[engine] = old.successor()
    old.close()


def autocommit_connection(engine: Engine) -> AbstractContextManager[psycopg.Connection[Any]]:
    """A pooled psycopg connection in autocommit mode, for statements that need no transaction
    (a `conn.transaction()` block still makes one): no BEGIN/COMMIT round trips and none of
    SQLAlchemy's per-statement bookkeeping."""
    return statement_pool(engine).connection()


def init_database(app: Flask) -> None:
    settings: Settings = app.config["TASKAPP"]
    app.config["SQLALCHEMY_DATABASE_URI"] = settings.database_url
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options(settings)
    db.init_app(app)
    migrate.init_app(app, db, directory=MIGRATIONS_DIR)
    with app.app_context():
        ping_idle_connections(db.engine)
        attach_statement_pool(db.engine, statement_pool_size(settings))


def upgrade_schema(app: Flask) -> None:
    """Apply pending migrations; safe when many instances start at once (see migrations/env.py)."""
    from flask_migrate import upgrade

    with app.app_context():
        upgrade(directory=MIGRATIONS_DIR)
