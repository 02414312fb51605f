"""Flow control through the API: queues, their concurrency keys and limits, pause and resume.

Keyword-only functions that take the Database and run the named statements of
taskapp/sql/flow.sql; like taskapp.services, they return the JSON text PostgreSQL rendered.
The limits themselves are obeyed by the claim (sql/queue.sql and taskapp_admit(), migration
0007); docs/flow-control.md says how they hold across instances.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .database import Database
from .errors import NotFound
from .services import update_params

QUEUE_LIMITS = ("rate_limit", "key_concurrency_limit", "key_rate_limit")
KEY_LIMITS = ("concurrency_limit", "rate_limit")


def list_queues(*, database: Database) -> str:
    """Every queue configured or holding tasks, as a JSON array."""
    return str(database.fetchone("list_queues").json)


def get_queue(*, database: Database, name: str) -> str:
    return str(database.fetchone("get_queue", {"name": name}).json)


def _rate_params(prefix: str, rate: Mapping[str, Any] | None) -> dict[str, Any]:
    rate = rate or {}
    return {
        f"{prefix}rate_limit": rate.get("limit"),
        f"{prefix}rate_period_seconds": rate.get("period_seconds"),
        f"{prefix}rate_burst": rate.get("burst"),
    }


def configure_queue(*, database: Database, name: str, data: Mapping[str, Any]) -> str:
    """Change the limits given (None removes one); the others stay."""
    params = {
        "name": name,
        **update_params(data, QUEUE_LIMITS),
        # A rate is three columns: its dict's place in the parameters goes to them.
        **_rate_params("", data.get("rate_limit")),
        **_rate_params("key_", data.get("key_rate_limit")),
    }
    return str(database.fetchone("configure_queue", params).json)


def set_paused(*, database: Database, name: str, paused: bool) -> str:
    """Pause or resume a queue across the cluster. A pause returns once no claim in flight can
    still start one of its tasks."""
    return str(database.fetchone("pause_queue", {"name": name, "paused": paused}).json)


def list_keys(*, database: Database, queue: str, limit: int) -> str:
    """A queue's keys with limits or state of their own, or tasks running, as a JSON array."""
    return str(database.fetchone("list_keys", {"queue": queue, "limit": limit}).json)


def _key_not_found(queue: str, key: str) -> NotFound:
    return NotFound(
        f"Key {key!r} of queue {queue!r} has no limits or state of its own and runs nothing."
    )


def get_key(*, database: Database, queue: str, key: str) -> str:
    """One key; NotFound when it has no row and nothing running (its queue's defaults hold)."""
    row = database.fetchone("get_key", {"queue": queue, "key": key})
    if row is None:
        raise _key_not_found(queue, key)
    return str(row.json)


def configure_key(*, database: Database, queue: str, key: str, data: Mapping[str, Any]) -> str:
    """Change a key's own limits given (None: its queue's default); return the key."""
    params = {
        "queue": queue,
        "key": key,
        **update_params(data, KEY_LIMITS),
        **_rate_params("", data.get("rate_limit")),
    }
    with database.transaction() as conn:
        database.fetch("configure_key", params, conn=conn)
        return str(database.fetchone("get_key", {"queue": queue, "key": key}, conn=conn).json)


def delete_key(*, database: Database, queue: str, key: str) -> None:
    """Forget a key's own limits, throttle and rate state; NotFound if it had none."""
    if not database.fetch("delete_key", {"queue": queue, "key": key}):
        raise _key_not_found(queue, key)


def gauges(database: Database, *, limit: int) -> list[Any]:
    """Per queue (the first `limit` by name): running, throttled_keys, paused, throttled."""
    return database.fetch("flow_gauges", {"limit": limit})
