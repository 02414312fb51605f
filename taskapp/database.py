"""The database engine, and the schema brought up to date under an advisory lock."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from flask import Flask
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


def engine_options(settings: Settings) -> dict[str, object]:
    """A pool big enough that a burst of requests reuses connections instead of opening new
    ones (the pool only grows as far as the load asks)."""
    return {
        "pool_size": settings.db_pool_size or settings.worker_concurrency + 20,
        "max_overflow": 10,
        "pool_timeout": 5,
        "pool_recycle": 1800,
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


@contextmanager
def autocommit_connection(engine: Engine) -> Iterator[psycopg.Connection[Any]]:
    """A pooled psycopg connection in autocommit mode, for statements that need no transaction.

    The hottest reads and single-statement writes use it directly: no BEGIN/COMMIT round trips
    and none of SQLAlchemy's per-statement bookkeeping.
    """
    pooled = engine.raw_connection()
    connection: psycopg.Connection[Any] = pooled.driver_connection
    try:
        connection.autocommit = True
        yield connection
    except BaseException as exc:
        if connection.broken or connection.closed:
            # As SQLAlchemy does on a disconnect: the connections opened before this one are
            # presumed gone too (a restart, a failover, every backend terminated), so each is
            # replaced at its next checkout instead of failing a request first.
            engine.pool._invalidate(pooled, exc)
        raise
    finally:
        if pooled.is_valid and not connection.closed:
            connection.autocommit = False
        pooled.close()


def init_database(app: Flask) -> None:
    settings: Settings = app.config["TASKAPP"]
    app.config["SQLALCHEMY_DATABASE_URI"] = settings.database_url
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options(settings)
    db.init_app(app)
    migrate.init_app(app, db, directory=MIGRATIONS_DIR)
    with app.app_context():
        ping_idle_connections(db.engine)


def upgrade_schema(app: Flask) -> None:
    """Apply pending migrations; safe when many instances start at once (see migrations/env.py)."""
    from flask_migrate import upgrade

    with app.app_context():
        upgrade(directory=MIGRATIONS_DIR)
