"""Every blueprint, registered in one place."""

from __future__ import annotations

from importlib import import_module

from flask import Flask

from .common import (
    ConcurrencyKeyConverter,
    PositiveIdConverter,
    QueueNameConverter,
    refuse_foreign_bodies,
    refuse_repeated_headers,
)

# One module per resource, each exposing `bp`. Add new ones here.
BLUEPRINTS = [
    "taskapp.api.tasks",
    "taskapp.api.conversations",
    "taskapp.api.queues",
    "taskapp.api.system",
    "taskapp.api.events",
    "taskapp.dashboard",
]


def init_app(app: Flask) -> None:
    """Register the id converter and every blueprint."""
    app.url_map.converters["id"] = PositiveIdConverter
    app.url_map.converters["queue"] = QueueNameConverter
    app.url_map.converters["concurrency_key"] = ConcurrencyKeyConverter
    # `/tasks//1` must be a 404 like any other unknown path, not a redirect to `/tasks/1`.
    app.url_map.merge_slashes = False
    app.before_request(refuse_foreign_bodies)
    app.before_request(refuse_repeated_headers)
    for name in BLUEPRINTS:
        app.register_blueprint(import_module(name).bp)
