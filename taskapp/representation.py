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

from .schemas import ConversationOut, TaskErrorOut, TaskListItem, TaskOut

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
