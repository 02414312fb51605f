"""taskapp: tasks with conversations in PostgreSQL, processed in the background."""

from __future__ import annotations

import re

import click
from flask import Flask
from flask.json.provider import DefaultJSONProvider

from .config import Settings


class DatabaseUnreachable(click.ClickException):
    """The database can't be reached at start; the message is one line for the log. A
    ClickException, so a `flask` command (`flask db upgrade`) prints it as one line too,
    exit status 1, instead of a traceback."""


def describe_connection_failure(database_url: str, exc: BaseException) -> str:
    """`cannot reach the database at host:port: reason`, in one line and without credentials."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(_libpq_url(database_url))
    except Exception:
        parts = {}
    address = f"{parts.get('host') or 'localhost'}:{parts.get('port') or 5432}"
    # psycopg: 'connection failed: connection to server at "127.0.0.1", port 1 failed:
    # Connection refused' and hints on the next lines: keep the reason.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc).__name__
    reason = re.sub(r"^\(psycopg\.\w+\) ", "", reason)
    reason = re.sub(r"^connection failed: ", "", reason)
    reason = re.sub(
        r'^connection to server (at|on) "[^"]*"( \([^)]*\))?, port \d+ failed: ', "", reason
    )
    reason = re.sub(r"^FATAL: +", "", reason)
    reason = reason[:1].lower() + reason[1:]
    return f"cannot reach the database at {address}: {reason}"


def _libpq_url(database_url: str) -> str:
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


def probe_database(settings: Settings) -> None:
    """Connect once, as the instance will (and give up as soon: 5 s); raise
    DatabaseUnreachable if that fails. Only psycopg: gunicorn's master calls it, and has
    no use for the rest of the app."""
    import psycopg

    try:
        psycopg.connect(
            _libpq_url(settings.database_url), connect_timeout=5, application_name="taskapp-start"
        ).close()
    except psycopg.Error as exc:
        raise DatabaseUnreachable(describe_connection_failure(settings.database_url, exc)) from None


def create_app(settings: Settings | None = None) -> Flask:
    """Build the Flask app: settings, database, blueprints, error handlers, API docs.

    It never starts a background worker: gunicorn's post_fork hook does that (see
    taskapp.runtime), so `flask` commands and tests get a plain app.
    """
    from . import api, auth, errors, headers, logs, metrics, openapi, tracing
    from .database import init_database

    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["TASKAPP"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_content_length
    if isinstance(app.json, DefaultJSONProvider):
        app.json.sort_keys = False  # fields in the schemas' order
    app.url_map.strict_slashes = False

    logs.init_app(app)
    tracing.init_app(app)  # before any other before_request hook: they may answer at once
    init_database(app)
    errors.init_app(app)
    auth.init_app(app)
    headers.init_app(app)
    metrics.init_app(app)
    api.init_app(app)
    openapi.init_app(app)
    if settings.auto_migrate:
        import psycopg
        import sqlalchemy.exc

        from .database import upgrade_schema

        try:
            upgrade_schema(app)
        except (psycopg.OperationalError, sqlalchemy.exc.OperationalError) as exc:
            # SQLAlchemy wraps the connection's error: the reason is its first line.
            failure = getattr(exc, "orig", None) or exc
            message = describe_connection_failure(settings.database_url, failure)
            raise DatabaseUnreachable(message) from None
    return app
