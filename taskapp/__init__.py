"""taskapp: tasks with conversations in PostgreSQL, processed in the background."""

from __future__ import annotations

from flask import Flask
from flask.json.provider import DefaultJSONProvider

from .config import Settings


def create_app(settings: Settings | None = None) -> Flask:
    """Build the Flask app: settings, database, blueprints, error handlers, API docs.

    It never starts a background worker: gunicorn's post_fork hook does that (see
    taskapp.runtime), so `flask` commands and tests get a plain app.
    """
    from . import api, auth, errors, headers, logs, metrics, openapi
    from .database import init_database

    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["TASKAPP"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_content_length
    if isinstance(app.json, DefaultJSONProvider):
        app.json.sort_keys = False  # fields in the schemas' order
    app.url_map.strict_slashes = False

    logs.init_app(app)
    init_database(app)
    errors.init_app(app)
    auth.init_app(app)
    headers.init_app(app)
    metrics.init_app(app)
    api.init_app(app)
    openapi.init_app(app)
    if settings.auto_migrate:
        from .database import upgrade_schema

        upgrade_schema(app)
    return app
