"""The database engine, and the schema brought up to date under an advisory lock."""

from __future__ import annotations

import logging
from pathlib import Path

from flask import Flask

from . import models  # noqa: F401  (registers the tables on db.metadata)
from .config import Settings
from .extensions import db, migrate

log = logging.getLogger(__name__)

MIGRATIONS_DIR = str(Path(__file__).resolve().parent.parent / "migrations")


def engine_options(settings: Settings) -> dict[str, object]:
    """Pool sized to the instance's threads; connections checked before use so a
    restarted database costs one failed request at most, not a broken pool."""
    return {
        "pool_pre_ping": True,
        "pool_size": settings.worker_concurrency + 8,
        "max_overflow": 8,
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


def init_database(app: Flask) -> None:
    settings: Settings = app.config["TASKAPP"]
    app.config["SQLALCHEMY_DATABASE_URI"] = settings.database_url
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options(settings)
    db.init_app(app)
    migrate.init_app(app, db, directory=MIGRATIONS_DIR)


def upgrade_schema(app: Flask) -> None:
    """Apply pending migrations; safe when many instances start at once (see migrations/env.py)."""
    from flask_migrate import upgrade

    with app.app_context():
        upgrade(directory=MIGRATIONS_DIR)
