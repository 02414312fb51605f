"""The API's JSON for tasks, rendered by PostgreSQL in the statement that reads the rows.

Reading a task is the most frequent request. Turning rows into Python objects, dumping them
through marshmallow and encoding the result cost more CPU than the query itself
(bench/README.md); PostgreSQL builds the same document while it reads the rows, and the route
sends the text on unchanged.

The SQL is generated from the marshmallow output schemas, so the two list the same fields in
the same order; tests/test_representation.py checks that they agree value for value.
"""

from __future__ import annotations

from collections.abc import Mapping

from marshmallow import Schema, fields

from .schemas import ConversationOut, KeyOut, QueueOut, TaskErrorOut, TaskListItem, TaskOut
from .states import TaskStatus

# Fields whose column PostgreSQL turns into the same JSON value as marshmallow's dump.
_COLUMN_AS_IS = (fields.Integer, fields.Float, fields.String, fields.Boolean, fields.Raw)


def iso_time(expression: str) -> str:
    """SQL for a timestamptz as `datetime.isoformat()` writes it in UTC (the output schemas'
    format): microseconds only when there are some, offset `+00:00`; NULL stays NULL."""
    return (
        f"replace(to_char({expression} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US'),"
        " '.000000', '') || '+00:00'"
    )


def json_object(schema: Schema, alias: str, computed: Mapping[str, str] | None = None) -> str:
    """SQL building `schema`'s dump of the row `alias` as a json value: each field from the
    column of its name, or from the SQL expression `computed` gives for it."""
    computed = computed or {}
    members = []
    for name, field in schema.dump_fields.items():
        if name in computed:
            expression = computed[name]
        elif isinstance(field, fields.DateTime):
            expression = iso_time(f"{alias}.{name}")
        elif isinstance(field, _COLUMN_AS_IS):
            expression = f"{alias}.{name}"
        else:
            raise TypeError(f"{type(schema).__name__}.{name}: no SQL rendering for {field!r}")
        members.append(f"'{name}', {expression}")
    return f"json_build_object({', '.join(members)})"


def conversation_json(alias: str = "c") -> str:
    """SQL for a conversation as the API shows it."""
    return json_object(ConversationOut(), alias)


def json_array(element: str, source: str, order_by: str) -> str:
    """SQL for a json array of `element` over the rows of `source` (a FROM clause), [] if none."""
    return f"(SELECT coalesce(json_agg({element} ORDER BY {order_by}), '[]') FROM {source})"


def _stored_json(alias: str) -> dict[str, str]:
    """Fields kept as the JSON the API shows (a jsonb column, written in the schema's shape)."""
    return {"progress": f"{alias}.progress"}


def task_json(alias: str = "t", conversations: str | None = None) -> str:
    """SQL for a task as `GET /tasks/{id}` shows it, with its conversations and error history.

    `conversations` is the FROM clause of the task's conversations, aliased `c` (by default,
    the `conversations` table); a statement that has just inserted them passes its CTE."""
    conversations = conversations or f"conversations AS c WHERE c.task_id = {alias}.id"
    return json_object(
        TaskOut(),
        alias,
        {
            **_stored_json(alias),
            "conversations": json_array(conversation_json("c"), conversations, "c.id"),
            "errors": json_array(
                json_object(TaskErrorOut(), "e"),
                f"task_errors AS e WHERE e.task_id = {alias}.id",
                "e.id",
            ),
        },
    )


def task_list_item_json(alias: str = "t") -> str:
    """SQL for a task as `GET /tasks/` lists it, with its number of conversations."""
    count = f"(SELECT count(*) FROM conversations AS c WHERE c.task_id = {alias}.id)"
    return json_object(TaskListItem(), alias, {**_stored_json(alias), "conversation_count": count})


def rate_json(alias: str, prefix: str = "") -> str:
    """SQL for a rate limit kept in columns {prefix}rate_limit, _period_seconds, _burst."""
    column = f"{alias}.{prefix}rate"
    return (
        f"CASE WHEN {column}_limit IS NULL THEN NULL ELSE json_build_object("
        f"'limit', {column}_limit, 'period_seconds', {column}_period_seconds, "
        f"'burst', {column}_burst) END"
    )


def queue_json(alias: str, name: str) -> str:
    """SQL for a queue as `GET /queues/{name}` shows it: `alias` is its `queues` row (NULLs
    when it was never configured) and `name` the SQL for its name."""
    counts = ", ".join(
        f"'{status.value}', coalesce(sum(tc.n) FILTER (WHERE tc.status = '{status.value}'), 0)"
        for status in TaskStatus
    )
    return json_object(
        QueueOut(),
        alias,
        {
            "name": name,
            "paused": f"coalesce({alias}.paused, false)",
            "rate_limit": rate_json(alias),
            "key_rate_limit": rate_json(alias, "key_"),
            "counts": f"(SELECT json_build_object({counts}) FROM task_counts AS tc"
            f" WHERE tc.queue = {name})",
            "throttled_keys": "(SELECT count(*) FROM concurrency_keys AS k"
            f" WHERE k.queue = {name}"
            " AND (k.rate_ready_at > now() OR k.throttled_until > now()))",
        },
    )


def key_json(alias: str, queue: str, key: str, rule: str) -> str:
    """SQL for a concurrency key as `GET /queues/{name}/keys/{key}` shows it: `alias` is its
    `concurrency_keys` row (NULLs when it has none), `rule` its taskapp_key_rule() row."""
    return json_object(
        KeyOut(),
        alias,
        {
            "queue": queue,
            "key": key,
            "rate_limit": rate_json(alias),
            "effective_concurrency_limit": f"{rule}.max_running",
            "effective_rate_limit": f"CASE WHEN {rule}.rate IS NULL THEN NULL ELSE"
            f" json_build_object('limit', {rule}.rate, 'period_seconds', {rule}.period,"
            f" 'burst', {rule}.burst) END",
            "running": "(SELECT count(*) FROM tasks AS t WHERE t.status = 'processing'"
            f" AND t.queue = {queue} AND t.concurrency_key = {key})",
        },
    )
