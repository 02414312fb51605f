"""The one way into PostgreSQL: a Database gateway with one connection pool and named statements.

create_app makes one `Database` and hands it to everything that talks to PostgreSQL: the
services behind the routes, the queue, the worker, the listener and the metrics. Every
statement comes from taskapp/sql/*.sql (taskapp.statements) and runs on a pooled psycopg
connection in autocommit; a write of several statements runs in `transaction()`. The only
other connection an instance opens is the listener's, for LISTEN.

Flask-SQLAlchemy's models stay the schema of record that Alembic migrations are generated
from; its engine has no pool (NullPool) and is used only by the schema upgrade at start, before
this pool opens any connection. So one instance holds at most `DB_POOL_SIZE + 1` connections.

Nothing relies on a session outliving a statement or a transaction, so DATABASE_URL may lead
to PgBouncer in transaction mode: the migrations' advisory lock is a transaction's, the session
settings below are sent at connect time or not at all, and with DB_PREPARED_STATEMENTS=0 (or
to a server that refuses the session settings, as PgBouncer does) psycopg prepares nothing.
Only LISTEN needs a session of its own: LISTEN_DATABASE_URL.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import psycopg
from flask import Flask, current_app
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import RowFactory, namedtuple_row
from sqlalchemy.pool import NullPool

from . import models  # noqa: F401  (registers the tables on db.metadata)
from .config import Settings
from .extensions import db, migrate
from .statements import statement, wants_generic_plan

log = logging.getLogger(__name__)

MIGRATIONS_DIR = str(Path(__file__).resolve().parent.parent / "migrations")
EXTENSION_KEY = "taskapp.database"

# A connection back in use within this time is not pinged: it just worked. One idle for longer
# (through an outage, a restart, a terminated backend) is pinged, and replaced if dead.
PING_AFTER_IDLE_SECONDS = 1.0
# Connections are closed and replaced after this long (server-side state and memory stay fresh).
RECYCLE_AFTER_SECONDS = 1800
# How long a statement waits for a free connection before it fails (a 503 for a request).
POOL_TIMEOUT_SECONDS = 5.0

# A client that vanishes mid-transaction (network cut before COMMIT) must not keep a task's
# row locked, which claims and the rescuer would skip, for hours: the server drops idle
# transactions and probes dead peers. No JIT: every statement here is a short one, and the
# claim's cost estimate (a LIMIT per served queue it can't see) passes jit_above_cost, which
# made each claim spend ~70 ms compiling for ~3 ms of work (a drain at a third of its speed).
SESSION_OPTIONS = (
    "-c timezone=UTC -c idle_in_transaction_session_timeout=60000 -c jit=off"
    " -c tcp_keepalives_idle=15 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"
)


# PgBouncer refuses the `options` startup parameter ("unsupported startup parameter"): to such
# a server (remembered by conninfo) connections are opened without SESSION_OPTIONS, and the
# pooler's and the server's settings stand in for them (README, "Behind PgBouncer").
_refuses_options: set[str] = set()
_refuses_options_lock = threading.Lock()


def connect(
    conninfo: str, *, application_name: str, autocommit: bool = True, prepare: bool = False
) -> psycopg.Connection[Any]:
    """A new connection with the session settings. `prepare`: psycopg prepares a statement
    run five times (a GET's statement then costs 130 us instead of 320 us), which a pooler in
    transaction mode breaks: the next transaction may run on another server session, which
    does not know it (DuplicatePreparedStatement, or none such). So never to a pooler."""
    if conninfo not in _refuses_options:
        try:
            return _connect(conninfo, application_name, autocommit, SESSION_OPTIONS, prepare)
        except psycopg.OperationalError as exc:
            if "unsupported startup parameter" not in str(exc):
                raise
            with _refuses_options_lock:
                first = conninfo not in _refuses_options
                _refuses_options.add(conninfo)
            if first:
                log.warning(
                    "the database server (a pooler?) refuses session options: connecting"
                    " without them and preparing no statements; idle_in_transaction_session"
                    "_timeout, timezone and TCP keepalives are the server's or the pooler's"
                )
    return _connect(conninfo, application_name, autocommit, None, False)


def _connect(
    conninfo: str, application_name: str, autocommit: bool, options: str | None, prepare: bool
) -> psycopg.Connection[Any]:
    extra: dict[str, Any] = {"options": options} if options else {}
    return psycopg.connect(
        conninfo,
        autocommit=autocommit,
        # psycopg's default: prepared on the fifth execution; None: never.
        prepare_threshold=5 if prepare else None,
        connect_timeout=5,
        application_name=application_name,
        **extra,
    )


def conninfo(database_url: str) -> str:
    """The libpq form of a `postgresql+psycopg://` URL."""
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


class PoolTimeout(psycopg.OperationalError):
    """Every connection of the pool stayed busy for the whole pool timeout."""


class Pool:
    """Autocommit psycopg connections, at most `size` of them.

    A checkout is a list pop under a lock: through SQLAlchemy's pool each checkout also
    toggled autocommit, rolled back on return and ran pool events, a sixth of a GET's CPU.
    Unlike a pool that reconnects in the background while callers wait (psycopg_pool), a
    checkout that needs a new connection opens it at once, so a database that is down fails
    a request in milliseconds, not after the pool timeout.
    """

    def __init__(
        self,
        conninfo: str,
        size: int,
        timeout: float,
        recycle: float,
        application_name: str,
        prepare: bool = True,
    ) -> None:
        self._conninfo = conninfo
        self._prepare = prepare
        self._size = size
        self._timeout = timeout
        self._recycle = recycle
        self._application_name = application_name
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._waiting = 0
        self._in_use = 0
        # (connection, opened at, returned at): checked out last-in first-out, so a quiet
        # period leaves the same few connections warm.
        self._idle: list[tuple[psycopg.Connection[Any], float, float]] = []
        self._closed = False
        self._pid = os.getpid()

    @property
    def size(self) -> int:
        return self._size

    def connection(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A connection for the block, returned to the pool after it (closed if it broke)."""
        return _Checkout(self)

    def stats(self) -> dict[str, int]:
        """Connections checked out, idle, the most there may be, and the callers waiting."""
        with self._lock:
            return {
                "in_use": self._in_use,
                "idle": len(self._idle),
                "max": self._size,
                "waiting": self._waiting,
            }

    def successor(self) -> Pool:
        """An empty pool with the same settings, to take over from this one."""
        return Pool(
            self._conninfo,
            self._size,
            self._timeout,
            self._recycle,
            self._application_name,
            self._prepare,
        )

    def close(self) -> None:
        """Close the idle connections, and each busy one when it comes back. In a forked
        child they belong to the parent: they are only forgotten."""
        self._closed = True
        if os.getpid() == self._pid:
            self._discard_idle()
        else:
            self._idle = []

    def _checkout(self) -> tuple[psycopg.Connection[Any], float]:
        with self._lock:
            if self._in_use >= self._size:
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
            while self._in_use >= self._size:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._freed.wait(remaining):
                    raise PoolTimeout(f"no database connection free within {self._timeout:g}s")
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
            # The connections opened before this one are presumed gone too (a restart, a
            # failover, every backend terminated): replaced instead of failing a request each.
            self._discard_idle()
        now = time.monotonic()
        reusable = (
            not self._closed
            and not conn.closed
            and conn.info.transaction_status == TransactionStatus.IDLE
            and now - opened_at < self._recycle
        )
        with self._lock:
            if reusable:
                self._idle.append((conn, opened_at, now))
            self._free_slot()
        if not reusable:
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
        return connect(
            self._conninfo, application_name=self._application_name, prepare=self._prepare
        )


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

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    def __enter__(self) -> psycopg.Connection[Any]:
        self._conn, self._opened_at = self._pool._checkout()
        return self._conn

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self._pool._checkin(self._conn, self._opened_at, failed=exc_type is not None)


class Database:
    """An instance's way into PostgreSQL: its pool, its named statements, its LISTEN conninfo."""

    def __init__(
        self,
        database_url: str,
        *,
        pool_size: int,
        pool_timeout: float = POOL_TIMEOUT_SECONDS,
        application_name: str = "taskapp",
        listen_url: str | None = None,
        prepared_statements: bool = True,
    ) -> None:
        self.conninfo = conninfo(database_url)
        # The listener's own connection (LISTEN needs a session of its own, so not through a
        # pooler in transaction mode): LISTEN_DATABASE_URL, else the pool's database.
        self.listen_conninfo = conninfo(listen_url) if listen_url else self.conninfo
        self._lock = threading.Lock()
        self._pool = Pool(
            self.conninfo,
            pool_size,
            pool_timeout,
            RECYCLE_AFTER_SECONDS,
            application_name,
            prepared_statements,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        return cls(
            settings.database_url,
            pool_size=settings.db_pool_size,
            application_name=f"taskapp:{settings.instance_id[:8]}",
            listen_url=settings.listen_url,
            prepared_statements=settings.db_prepared_statements,
        )

    @property
    def pool(self) -> Pool:
        return self._pool

    def connection(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A pooled connection in autocommit (a `conn.transaction()` block still makes one)."""
        return self._pool.connection()

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection inside a transaction, committed when the block ends."""
        with self._pool.connection() as conn, conn.transaction():
            yield conn

    def fetch(
        self,
        name: str,
        params: dict[str, Any] | None = None,
        *,
        row_factory: RowFactory[Any] = namedtuple_row,
        conn: psycopg.Connection[Any] | None = None,
    ) -> list[Any]:
        """Run one named statement (on `conn`, or autocommitted on its own) and return its
        rows (none for a plain write)."""
        generic = wants_generic_plan(name)
        if conn is not None:
            return _fetch(conn, statement(name), params, row_factory, generic)
        with self._pool.connection() as own:
            return _fetch(own, statement(name), params, row_factory, generic)

    def fetchone(
        self,
        name: str,
        params: dict[str, Any] | None = None,
        *,
        row_factory: RowFactory[Any] = namedtuple_row,
        conn: psycopg.Connection[Any] | None = None,
    ) -> Any:
        """The first row of a named statement, or None."""
        rows = self.fetch(name, params, row_factory=row_factory, conn=conn)
        return rows[0] if rows else None

    def listen_connection(self) -> psycopg.Connection[Any]:
        """A dedicated connection for LISTEN, outside the pool (it is held for good)."""
        return connect(self.listen_conninfo, application_name="taskapp-listener")

    def listen(
        self, conn: psycopg.Connection[Any], channel: str, *, listening: bool = True
    ) -> None:
        """LISTEN (or UNLISTEN) on a channel of the listener's connection."""
        verb = sql.SQL("LISTEN {}" if listening else "UNLISTEN {}")
        conn.execute(verb.format(sql.Identifier(channel)))

    def notify(self, channel: str) -> None:
        """An empty NOTIFY on `channel`, sent at once."""
        self.fetch("notify", {"channel": channel})

    def stats(self) -> dict[str, int]:
        """The pool's connections in use, idle, the most there may be, and callers waiting."""
        return self._pool.stats()

    @property
    def max_connections(self) -> int:
        """The most connections this instance opens: the pool's and the listener's one."""
        return self._pool.size + 1

    def after_fork(self) -> None:
        """In a forked child: forget the parent's connections (Pool.close only forgets them
        in another process), open our own from now on."""
        self.close()

    def close(self) -> None:
        """Close the idle connections, and the busy ones when they come back."""
        with self._lock:
            old, self._pool = self._pool, self._pool.successor()
        old.close()


# For a prepared statement PostgreSQL weighs a generic plan against planning anew for each
# call's values, and for the dispatcher's claim (a dozen CTEs over arrays whose lengths only
# the values tell) it plans anew every time: ~1.5 ms of planning for ~1 ms of work, each round.
# The generic plan is as good (the same indexes, bench/README.md), so such statements are sent
# in one pipeline behind a transaction-local plan_cache_mode: still one round trip, and nothing
# outlives the statement's own transaction (PgBouncer-safe). Unprepared statements (PgBouncer,
# DB_PREPARED_STATEMENTS=0) are planned every time whatever the mode, so they skip it.
_GENERIC_PLAN_FOR_THIS_TRANSACTION = (
    "SELECT set_config('plan_cache_mode', 'force_generic_plan', true)"
)


def _fetch(
    conn: psycopg.Connection[Any],
    sql: str,
    params: dict[str, Any] | None,
    row_factory: RowFactory[Any],
    generic_plan: bool = False,
) -> list[Any]:
    if generic_plan and conn.prepare_threshold is not None:
        with conn.pipeline() as pipeline, conn.cursor(row_factory=row_factory) as cursor:
            conn.execute(_GENERIC_PLAN_FOR_THIS_TRANSACTION, prepare=False)
            cursor.execute(sql, params)
            pipeline.sync()
            return cursor.fetchall() if cursor.description else []
    with conn.cursor(row_factory=row_factory) as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def get_database(app: Flask | None = None) -> Database:
    """The app's Database (the current app's by default)."""
    database: Database = (app or current_app).extensions[EXTENSION_KEY]
    return database


def init_database(app: Flask) -> None:
    settings: Settings = app.config["TASKAPP"]
    app.config["SQLALCHEMY_DATABASE_URI"] = settings.database_url
    # The engine only runs migrations: no pool, so it holds no connection once they are done.
    # Its connections are made as the pool's are (no prepared statements, options if allowed).
    migrate_conninfo = conninfo(settings.database_url)
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
        "poolclass": NullPool,
        "creator": lambda: connect(
            migrate_conninfo, application_name="taskapp-migrate", autocommit=False
        ),
    }
    db.init_app(app)
    migrate.init_app(app, db, directory=MIGRATIONS_DIR)
    app.extensions[EXTENSION_KEY] = Database.from_settings(settings)


@functools.cache
def _revisions() -> tuple[str | None, frozenset[str]]:
    """This code's head revision and every revision it knows (from migrations/versions)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(MIGRATIONS_DIR)
    return script.get_current_head(), frozenset(r.revision for r in script.walk_revisions())


def schema_state(database: Database) -> str:
    """ "current" (at this code's head), "behind" (an older revision, or none: migrations are
    pending) or "ahead" (a revision this code does not know: a newer release migrated it,
    and it is still served, as during a rolling update). Raises psycopg.Error when the
    database can't be asked."""
    head, known = _revisions()
    try:
        row = database.fetchone("schema_version")
    except psycopg.errors.UndefinedTable:
        return "behind"
    if row is None or row.version_num in known - {head}:
        return "behind"
    return "current" if row.version_num == head else "ahead"


def upgrade_schema(app: Flask) -> None:
    """Apply pending migrations; safe when many instances start at once (see migrations/env.py)."""
    from flask_migrate import upgrade

    with app.app_context():
        upgrade(directory=MIGRATIONS_DIR)
