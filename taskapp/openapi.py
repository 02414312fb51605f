"""The OpenAPI 3.0.3 document: components from the marshmallow schemas, operations from the
table below, served by flasgger at /apispec_1.json with Swagger UI at /apidocs/.

The table is the single description of every endpoint (including the system ones in
taskapp.api.system); flasgger is told not to parse any view, so nothing is documented twice.

Swagger UI is the current 5.x that the flask-swagger-ui package ships (pinned in
requirements.txt; only its files are used, not its blueprint): flasgger serves those files
instead of its own 3.28 ones and renders the page below instead of its template, which
loaded Google Fonts and jQuery. The page loads nothing from another host, and its
configuration is fixed here: query parameters (`?url=`, `?configUrl=`) are ignored, so a link
can't make the page show another spec (with its "Try it out" aimed elsewhere).
"""

from __future__ import annotations

import importlib.util
from http import HTTPStatus
from pathlib import Path
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flasgger import Swagger
from flask import Flask
from jinja2 import DictLoader

from . import schemas
from .errors import PROBLEM_MIMETYPE, PROBLEM_TYPES, ProblemType
from .events import EVENT_TYPES, LINGER_SECONDS, REPLAY_EVENTS, RESET_TYPE

SPEC_ROUTE = "/apispec_1.json"
DOCS_ROUTE = "/apidocs/"

DESCRIPTION = (
    """\
Tasks with conversations, kept in PostgreSQL and processed in the background by every
running instance. Every error is `application/problem+json` (RFC 9457).

When the service runs with `API_KEYS`, send one of them as `Authorization: Bearer KEY` or
`X-API-Key: KEY` (the **Authorize** button); `/health`, `/livez`, `/readyz` and these docs need
no key.

**Examples.** Every request example succeeds as shown on a fresh database when run in the
order of a walkthrough: create a task (it is task 1, with conversations 1 and 2), read, list
and update it, add and change a conversation, cancel it (while it is still pending) and retry
it, configure the queues, and delete it last.

**Tasks and ETags.** Every response carrying a task has its `ETag`, which changes whenever
anything its `GET` shows changes. Send it back as `If-Match` on `PUT`, `DELETE`, `cancel` or
`retry` to write only if nobody changed the task meanwhile (else 412); `If-Match` is optional.

**Problem types.** An error's `type` says its kind; each is a page on this service:
"""
    + "\n".join(
        f"- `{kind.uri}` ({kind.status}): {kind.summary}." for kind in PROBLEM_TYPES.values()
    )
    + "\n"
)

# Nested schemas first: registering a schema registers what it nests under the same names.
COMPONENT_SCHEMAS = {
    "ConversationCreate": schemas.ConversationCreate,
    "ConversationUpdate": schemas.ConversationUpdate,
    "ConversationOut": schemas.ConversationOut,
    "TaskErrorOut": schemas.TaskErrorOut,
    "Progress": schemas.ProgressOut,
    "TaskCreate": schemas.TaskCreate,
    "TaskUpdate": schemas.TaskUpdate,
    "TaskOut": schemas.TaskOut,
    "TaskListItem": schemas.TaskListItem,
    "RateLimit": schemas.RateLimit,
    "RateLimitOut": schemas.RateLimitOut,
    "QueueUpdate": schemas.QueueUpdate,
    "QueueOut": schemas.QueueOut,
    "KeyUpdate": schemas.KeyUpdate,
    "KeyOut": schemas.KeyOut,
    "Problem": schemas.Problem,
    "ValidationProblem": schemas.ValidationProblem,
}


def _counts(*names: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {name: {"type": "integer", "minimum": 0} for name in names},
    }


# Shared error responses, referred to by status code from every operation below.
ERROR_RESPONSES: dict[str, tuple[str, str]] = {
    "400": ("Problem", "The body is not JSON, or not a JSON object."),
    "401": ("Problem", "API keys are configured and none (or a wrong one) was sent."),
    "404": ("Problem", "No such resource (ids are integers from 1 to 2^63-1)."),
    "409": (
        "Problem",
        "The task's current state forbids this change (`/problems/invalid-state`), or it has "
        "the most conversations a task may have (`/problems/conversation-limit`).",
    ),
    "405": ("Problem", "The path does not take this method; `Allow` lists those it takes."),
    "412": (
        "Problem",
        "`If-Match` named none of the task's current entity tags: it changed since it was read.",
    ),
    "413": ("Problem", "The body is over the size limit (1 MiB by default)."),
    "415": ("Problem", "A body sent as something other than JSON (`Content-Type`)."),
    "422": (
        "ValidationProblem",
        "Invalid input; `errors` names each bad field (`/problems/validation`), or an "
        "Idempotency-Key reused with another body (`/problems/idempotency-key-reused`).",
    ),
    "500": ("Problem", "An unexpected error (logged; no details are returned)."),
    "503": ("Problem", "The database cannot be reached (or, for streams, too many are open)."),
}
_ERROR_HEADERS = {
    "401": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    "405": {"Allow": {"description": "The methods the path takes.", "schema": {"type": "string"}}},
    "503": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}}},
}

_ID_SCHEMA = {"type": "integer", "format": "int64", "minimum": 1, "maximum": schemas.BIGINT_MAX}
# The examples' ids are those a fresh database gives the walkthrough's first task and its
# first conversation (tests/test_spec_examples.py runs every example in that order).
TASK_ID = {"name": "task_id", "in": "path", "required": True, "schema": _ID_SCHEMA, "example": 1}
CONVERSATION_ID = {
    "name": "conversation_id",
    "in": "path",
    "required": True,
    "schema": _ID_SCHEMA,
    "example": 1,
}
_ETAG_HEADERS = {
    "ETag": {
        "description": "The task's entity tag (strong): send it as `If-Match` to write only "
        "if the task is still as this response shows it.",
        "schema": {"type": "string"},
    },
}
_TASK_HEADERS = {
    **_ETAG_HEADERS,
    "Content-Location": {
        "description": "The task's URL: the body is its representation, which `ETag` validates.",
        "schema": {"type": "string"},
    },
}
IF_MATCH = {
    "name": "If-Match",
    "in": "header",
    "required": False,
    "description": "Write only if the task's entity tag is one of these (`*`: any version). "
    "Without it the write is unconditional; a tag that no longer matches is a 412.",
    "schema": {"type": "string"},
}
IF_NONE_MATCH = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "description": "A 304 without a body if the task's entity tag is one of these (compared "
    "weakly).",
    "schema": {"type": "string"},
}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": (
        "Makes the create safe to repeat: a repeat with the same key and body returns the first "
        "response (same status and body) instead of creating another task; the same key with "
        "another body is a 422. One key: a comma in it reads as the header sent twice, a 400. "
        "E.g. `order-1234`."
    ),
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": schemas.IDEMPOTENCY_KEY_MAX_LENGTH,
        "pattern": schemas.IDEMPOTENCY_KEY_PATTERN,
    },
}
EVENTS_TASK_ID = {
    "name": "task_id",
    "in": "query",
    "required": False,
    "description": "Only the events of this task.",
    "schema": _ID_SCHEMA,
}
_EVENT_ID_SCHEMA = {"type": "integer", "format": "int64", "minimum": 0}
_RESUME = (
    f"The stream first sends what came after that event: any instance keeps the last "
    f"{REPLAY_EVENTS:,} events (at most 8 MiB of them) while a stream is open anywhere in the "
    f"cluster and {LINGER_SECONDS:.0f} s after. Too late (or an id it never heard), the "
    f"stream starts with one `{RESET_TYPE}` event instead: fetch the state anew."
)
EVENTS_LAST_EVENT_ID = {
    "name": "last_event_id",
    "in": "query",
    "required": False,
    "description": "The `id` of the last event received, to resume from (a `Last-Event-ID` "
    "header wins). " + _RESUME,
    "schema": _EVENT_ID_SCHEMA,
}
LAST_EVENT_ID_HEADER = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "description": "What an EventSource sends when it reconnects: the `id` of the last "
    "event it got. " + _RESUME,
    "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"},
}
EVENTS_NAMED = {
    "name": "named",
    "in": "query",
    "required": False,
    "description": "`true`: each event also carries its type as the SSE event name "
    "(`event: task.created`), for `addEventListener(type)`; then `onmessage` gets none. "
    "By default events are unnamed, so `onmessage` gets every one.",
    "schema": {"type": "boolean", "default": False},
}
# What a stream sends: every change, and its own stream.reset.
_STREAM_MESSAGE = {
    "oneOf": [{"$ref": "#/components/schemas/Event"}, {"$ref": "#/components/schemas/StreamReset"}]
}
QUEUE_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "A queue's name (a queue nobody configured exists, without limits).",
    "schema": {"type": "string", "pattern": schemas.QUEUE_NAME_PATTERN},
    "example": "default",
}
CONCURRENCY_KEY = {
    "name": "key",
    "in": "path",
    "required": True,
    "description": "A concurrency key (its `/` may be sent as is).",
    "schema": {"type": "string", "pattern": schemas.CONCURRENCY_KEY_PATTERN},
    "example": "tenant-42",
}
PROBLEM_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "A problem type's name: the last part of its `type`.",
    "schema": {"type": "string", "enum": list(PROBLEM_TYPES)},
    "example": "validation",
}
PUBLIC: list[dict[str, list[str]]] = []  # `security: []`: no API key needed
API_KEY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"apiKeyHeader": []}]
STREAM_KEY = [*API_KEY, {"apiKeyQuery": []}]  # EventSource and WebSocket can't send headers


def _json(schema: Any) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _body(schema: Any, description: str, examples: dict[str, Any]) -> dict[str, Any]:
    """A required JSON body with its named examples; Swagger UI pre-fills the first."""
    named = {
        name: {"summary": summary, "value": value} for name, (summary, value) in examples.items()
    }
    return {
        "required": True,
        "description": description,
        "content": {"application/json": {"schema": schema, "examples": named}},
    }


def _responses(success: dict[str, Any], *errors: str) -> dict[str, Any]:
    """The success responses plus shared error responses; 401, 414, 500, 503 apply everywhere."""
    codes = sorted({*errors, "401", "414", "500", "503"})
    return {**success, **{code: {"$ref": f"#/components/responses/{code}"} for code in codes}}


def _ok(schema: Any, description: str, **extra: Any) -> dict[str, Any]:
    if "headers" in extra:  # shared header tables: each response gets its own (X-Request-ID)
        extra["headers"] = dict(extra["headers"])
    return {"description": description, "content": _json(schema), **extra}


_TASK_LINKS = {
    "GetTask": {"operationId": "get_task", "parameters": {"task_id": "$response.body#/id"}},
    "UpdateTask": {"operationId": "update_task", "parameters": {"task_id": "$response.body#/id"}},
    "DeleteTask": {"operationId": "delete_task", "parameters": {"task_id": "$response.body#/id"}},
    "AddConversation": {
        "operationId": "create_conversation",
        "parameters": {"task_id": "$response.body#/id"},
    },
}
_CONVERSATION_LINKS = {
    "GetConversation": {
        "operationId": "get_conversation",
        "parameters": {"conversation_id": "$response.body#/id"},
    },
    "UpdateConversation": {
        "operationId": "update_conversation",
        "parameters": {"conversation_id": "$response.body#/id"},
    },
}

BODY_ERRORS = ("400", "413", "415", "422")

# The request bodies' examples: (summary, value) by name, the first pre-filled by Swagger UI.
# Each succeeds in the walkthrough (see DESCRIPTION); tests/test_spec_examples.py runs them.
TASK_CREATE_EXAMPLES = {
    "with_conversations": (
        "A task with two conversations",
        {
            "title": "Process customer feedback",
            "description": "Analyze and respond to customer feedback",
            "conversations": [
                {"content": "Customer says the app is slow"},
                {"content": "Customer wants new features"},
            ],
        },
    ),
    "urgent": (
        "Runs before the others, with more attempts",
        {"title": "Urgent", "priority": 10, "max_attempts": 5},
    ),
    "scheduled": (
        "Not run before a time",
        {"title": "Tonight", "scheduled_for": "2030-01-01T22:00:00+00:00"},
    ),
    "queued": (
        "In a queue, sharing limits with its tenant's other tasks",
        {
            "title": "Summarise call 17",
            "queue": "default",
            "concurrency_key": "tenant-42",
            "timeout_seconds": 300,
        },
    ),
}
TASK_UPDATE_EXAMPLES = {
    "rename": (
        "New title and description",
        {"title": "Updated Title", "description": "Updated Description"},
    ),
    "reprioritise": ("Run it sooner, now", {"priority": 5, "scheduled_for": None}),
}
CONVERSATION_CREATE_EXAMPLES = {"content": ("A new conversation", {"content": "New conversation"})}
CONVERSATION_UPDATE_EXAMPLES = {
    "content": (
        "New content (the conversation is active again)",
        {"content": "Updated conversation"},
    ),
    "processed": ("Mark it processed", {"status": "processed"}),
}
QUEUE_UPDATE_EXAMPLES = {
    "limits": (
        "10 starts a second (5 at once), 2 running per key",
        {
            "rate_limit": {"limit": 10, "period_seconds": 1, "burst": 5},
            "key_concurrency_limit": 2,
        },
    ),
    "unlimited": (
        "Remove the limits",
        {"rate_limit": None, "key_concurrency_limit": None, "key_rate_limit": None},
    ),
}
KEY_UPDATE_EXAMPLES = {
    "limits": (
        "One at a time, 60 starts a minute",
        {"concurrency_limit": 1, "rate_limit": {"limit": 60, "period_seconds": 60}},
    ),
}
# Not `0` (Swagger UI's own sample): executed as shown, that would delete every finished task.
PRUNE_EXAMPLES = {
    "month": (
        "Completed tasks unchanged for 30 days",
        {"older_than_seconds": 30 * 24 * 3600, "statuses": ["completed"]},
    ),
}
# What the schemas show for a field, and what Swagger UI puts in a sample it builds from a
# schema: values the service accepts (its own samples broke rules such as `minimum`).
PROPERTY_EXAMPLES: dict[str, dict[str, Any]] = {
    "TaskCreate": {
        "title": "Process customer feedback",
        "description": "Analyze and respond to customer feedback",
        "priority": 0,
        "scheduled_for": "2030-01-01T22:00:00+00:00",
        "max_attempts": 3,
        "queue": "default",
        "concurrency_key": "tenant-42",
        "timeout_seconds": 300,
    },
    "ConversationCreate": {"content": "Customer says the app is slow"},
    "ConversationUpdate": {"content": "Updated conversation", "status": "processed"},
    "RateLimit": {"limit": 10, "period_seconds": 1, "burst": 5},
    "QueueUpdate": {"key_concurrency_limit": 2},
    "KeyUpdate": {"concurrency_limit": 1},
    "TaskPrune": {"older_than_seconds": 30 * 24 * 3600},
}
PROPERTY_EXAMPLES["TaskUpdate"] = {
    **PROPERTY_EXAMPLES["TaskCreate"],
    "title": "Updated Title",
    "description": "Updated Description",
}

PATHS: dict[str, dict[str, Any]] = {
    "/tasks/": {
        "post": {
            "operationId": "create_task",
            "tags": ["tasks"],
            "summary": "Create a task, with optional conversations",
            "parameters": [IDEMPOTENCY_KEY],
            "requestBody": _body(
                "TaskCreate", "The new task; only `title` is required.", TASK_CREATE_EXAMPLES
            ),
            "responses": _responses(
                {
                    "201": _ok(
                        "TaskOut",
                        "The task, now pending (or the first response to this Idempotency-Key).",
                        headers={
                            "Location": {
                                "description": "The task's URL.",
                                "schema": {"type": "string"},
                            },
                            **_TASK_HEADERS,
                        },
                        links=_TASK_LINKS,
                    )
                },
                *BODY_ERRORS,
            ),
        },
        "get": {
            "operationId": "list_tasks",
            "tags": ["tasks"],
            "summary": "List tasks by id, each with its conversation count",
            "parameters": [{"in": "query", "schema": schemas.TaskListQuery}],
            "responses": _responses(
                {
                    "200": _ok(
                        {"type": "array", "items": "TaskListItem"},
                        "One page of tasks, ordered by id.",
                        headers={
                            "X-Total-Count": {
                                "description": "Tasks matching the filter, in all pages.",
                                "schema": {"type": "integer", "minimum": 0},
                            }
                        },
                    )
                },
                "422",
            ),
        },
    },
    "/tasks/{task_id}": {
        "parameters": [TASK_ID],
        "get": {
            "operationId": "get_task",
            "tags": ["tasks"],
            "summary": "A task with its conversations and error history",
            "parameters": [IF_NONE_MATCH],
            "responses": _responses(
                {
                    "200": _ok("TaskOut", "The task.", headers=_ETAG_HEADERS),
                    "304": {
                        "description": "Not modified: `If-None-Match` named its current tag.",
                        "headers": dict(_ETAG_HEADERS),
                    },
                },
                "404",
            ),
        },
        "put": {
            "operationId": "update_task",
            "tags": ["tasks"],
            "summary": "Change some of a task's fields (not its status)",
            "parameters": [IF_MATCH],
            "requestBody": _body(
                "TaskUpdate", "Only the fields sent change.", TASK_UPDATE_EXAMPLES
            ),
            "responses": _responses(
                {"200": _ok("TaskOut", "The updated task.", headers=_TASK_HEADERS)},
                "404",
                "409",
                "412",
                *BODY_ERRORS,
            ),
        },
        "delete": {
            "operationId": "delete_task",
            "tags": ["tasks"],
            "summary": "Delete a task and its conversations",
            "description": "A processor running the task is told to stop (its cancellation "
            "flag is set) and nothing its attempt writes afterwards is recorded. (The example "
            "deletes the walkthrough's task: run it last.)",
            "parameters": [IF_MATCH],
            "responses": _responses({"204": {"description": "Deleted."}}, "404", "412", "415"),
        },
    },
    "/tasks/{task_id}/cancel": {
        "parameters": [TASK_ID],
        "post": {
            "operationId": "cancel_task",
            "tags": ["tasks"],
            "summary": "Cancel a pending or processing task",
            "description": "A processing task is cancelled at once: its lease is revoked, so a "
            "late result is dropped, and the processor, on whichever instance runs it, sees "
            "its cancellation flag set within a second. Checkpoints it made stay.",
            "parameters": [IF_MATCH],
            "responses": _responses(
                {"200": _ok("TaskOut", "The task, now cancelled.", headers=_TASK_HEADERS)},
                "404",
                "409",
                "412",
                "415",
            ),
        },
    },
    "/tasks/{task_id}/retry": {
        "parameters": [TASK_ID],
        "post": {
            "operationId": "retry_task",
            "tags": ["tasks"],
            "summary": "Send a failed, cancelled or completed task back to pending",
            "description": "Attempts start again from 0; `last_error` and the error history stay.",
            "parameters": [IF_MATCH],
            "responses": _responses(
                {"200": _ok("TaskOut", "The task, now pending.", headers=_TASK_HEADERS)},
                "404",
                "409",
                "412",
                "415",
            ),
        },
    },
    "/tasks/prune": {
        "post": {
            "operationId": "prune_tasks",
            "tags": ["tasks"],
            "summary": "Delete finished tasks not changed for a while, with their conversations",
            "description": "Deletes in batches of 1,000 (never waiting on a task being changed) "
            "for about two seconds at most, then answers: while `done` is false there is more "
            "to delete, so ask again. Like retention (`RETENTION_*_SECONDS`), it sends no events.",
            "requestBody": _body(
                schemas.TaskPrune,
                "Which tasks: of these statuses, unchanged for this long.",
                PRUNE_EXAMPLES,
            ),
            "responses": _responses(
                {
                    "200": _ok(
                        {
                            "type": "object",
                            "required": ["deleted", "done"],
                            "properties": {
                                "deleted": {
                                    **_counts(*schemas.FINISHED_STATUSES),
                                    "description": "Tasks deleted by this request, by status.",
                                },
                                "done": {
                                    "type": "boolean",
                                    "description": "false: more are due; send it again.",
                                },
                            },
                        },
                        "What this request deleted.",
                    )
                },
                *BODY_ERRORS,
            ),
        },
    },
    "/tasks/{task_id}/conversations/": {
        "parameters": [TASK_ID],
        "post": {
            "operationId": "create_conversation",
            "tags": ["conversations"],
            "summary": "Add a conversation to a task",
            "description": (
                f"A task has at most {schemas.MAX_CONVERSATIONS_PER_TASK} conversations: "
                "one more is a 409."
            ),
            "requestBody": _body(
                "ConversationCreate", "The new conversation.", CONVERSATION_CREATE_EXAMPLES
            ),
            "responses": _responses(
                {
                    "201": _ok(
                        "ConversationOut",
                        "The conversation.",
                        headers={
                            "Location": {
                                "description": "The conversation's URL.",
                                "schema": {"type": "string"},
                            }
                        },
                        links=_CONVERSATION_LINKS,
                    )
                },
                "404",
                "409",
                *BODY_ERRORS,
            ),
        },
        "get": {
            "operationId": "list_conversations",
            "tags": ["conversations"],
            "summary": "A task's conversations, ordered by id",
            "responses": _responses(
                {"200": _ok({"type": "array", "items": "ConversationOut"}, "The conversations.")},
                "404",
            ),
        },
    },
    "/conversations/{conversation_id}": {
        "parameters": [CONVERSATION_ID],
        "get": {
            "operationId": "get_conversation",
            "tags": ["conversations"],
            "summary": "A conversation",
            "responses": _responses({"200": _ok("ConversationOut", "The conversation.")}, "404"),
        },
        "put": {
            "operationId": "update_conversation",
            "tags": ["conversations"],
            "summary": "Change a conversation's content and/or status",
            "requestBody": _body(
                "ConversationUpdate", "Only the fields sent change.", CONVERSATION_UPDATE_EXAMPLES
            ),
            "responses": _responses(
                {"200": _ok("ConversationOut", "The updated conversation.")}, "404", *BODY_ERRORS
            ),
        },
    },
    "/queues/": {
        "get": {
            "operationId": "list_queues",
            "tags": ["queues"],
            "summary": "Every queue configured or holding tasks, with counts and limits",
            "responses": _responses(
                {"200": _ok({"type": "array", "items": "QueueOut"}, "The queues, by name.")}
            ),
        },
    },
    "/queues/{name}": {
        "parameters": [QUEUE_NAME],
        "get": {
            "operationId": "get_queue",
            "tags": ["queues"],
            "summary": "A queue: its counts by status, its limits, whether it is paused",
            "responses": _responses({"200": _ok("QueueOut", "The queue.")}, "404"),
        },
        "put": {
            "operationId": "configure_queue",
            "tags": ["queues"],
            "summary": "Set a queue's rate of starts and its keys' default limits",
            "description": "Limits hold across every instance: a claim never admits a task "
            "past them. A new or changed rate starts with a full burst.",
            "requestBody": _body(
                "QueueUpdate",
                "Only the fields sent change; null removes one.",
                QUEUE_UPDATE_EXAMPLES,
            ),
            "responses": _responses({"200": _ok("QueueOut", "The queue.")}, "404", *BODY_ERRORS),
        },
    },
    "/queues/{name}/pause": {
        "parameters": [QUEUE_NAME],
        "post": {
            "operationId": "pause_queue",
            "tags": ["queues"],
            "summary": "Pause a queue on every instance",
            "description": "Returns once no instance can start another task of the queue; "
            "running tasks finish.",
            "responses": _responses({"200": _ok("QueueOut", "The queue, paused.")}, "404", "415"),
        },
    },
    "/queues/{name}/resume": {
        "parameters": [QUEUE_NAME],
        "post": {
            "operationId": "resume_queue",
            "tags": ["queues"],
            "summary": "Resume a paused queue; idle workers wake at once",
            "responses": _responses({"200": _ok("QueueOut", "The queue.")}, "404", "415"),
        },
    },
    "/queues/{name}/keys/": {
        "parameters": [QUEUE_NAME],
        "get": {
            "operationId": "list_keys",
            "tags": ["queues"],
            "summary": "A queue's keys with limits or state of their own, or tasks running",
            "parameters": [{"in": "query", "schema": schemas.KeyListQuery}],
            "responses": _responses(
                {"200": _ok({"type": "array", "items": "KeyOut"}, "The keys, in order.")},
                "404",
                "422",
            ),
        },
    },
    "/queues/{name}/keys/{key}": {
        "parameters": [QUEUE_NAME, CONCURRENCY_KEY],
        "get": {
            "operationId": "get_key",
            "tags": ["queues"],
            "summary": "A concurrency key: its limits, what holds, what runs",
            "description": "404 for a key with no limits or state of its own and nothing "
            "running: its queue's defaults hold for it.",
            "responses": _responses({"200": _ok("KeyOut", "The key.")}, "404"),
        },
        "put": {
            "operationId": "configure_key",
            "tags": ["queues"],
            "summary": "Set a key's own limits over its queue's defaults",
            "requestBody": _body(
                "KeyUpdate", "Only the fields sent change; null: the queue's.", KEY_UPDATE_EXAMPLES
            ),
            "responses": _responses({"200": _ok("KeyOut", "The key.")}, "404", *BODY_ERRORS),
        },
        "delete": {
            "operationId": "delete_key",
            "tags": ["queues"],
            "summary": "Forget a key's own limits, throttle and rate state",
            "description": "Its queue's defaults hold again, starting with a full burst.",
            "responses": _responses({"204": {"description": "Forgotten."}}, "404", "415"),
        },
    },
    "/problems/{name}": {
        "parameters": [PROBLEM_NAME],
        "get": {
            "operationId": "problem_type",
            "tags": ["system"],
            "summary": "What a problem type (an error's `type`) means, as a page for people"
            " (no API key needed)",
            "security": PUBLIC,
            "responses": _responses(
                {
                    "200": {
                        "description": "An HTML page: the type's status and meaning.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
                "404",
            ),
        },
    },
    "/health": {
        "get": {
            "operationId": "health",
            "tags": ["system"],
            "summary": "Whether this instance can reach the database (no API key needed)",
            "security": PUBLIC,
            "responses": {
                "200": _ok("Health", "Healthy."),
                "503": _ok("Health", "The database cannot be reached."),
                "414": {"$ref": "#/components/responses/414"},
                "500": {"$ref": "#/components/responses/500"},
            },
        },
    },
    "/livez": {
        "get": {
            "operationId": "livez",
            "tags": ["system"],
            "summary": "Liveness: whether this instance's own threads run (asks no database)",
            "description": (
                "503 when a background part (the listener, the housekeeper, the worker's "
                "threads: work threads, dispatcher, watchdog) has died, or its loop has not "
                "come round for `LIVENESS_STALL_SECONDS`. A database outage does not fail it; "
                "while draining after SIGTERM it stays 200."
            ),
            "security": PUBLIC,
            "responses": {
                "200": _ok("Liveness", "Every part runs."),
                "503": _ok("Liveness", "A part is dead or stalled: restart the instance."),
                "414": {"$ref": "#/components/responses/414"},
                "500": {"$ref": "#/components/responses/500"},
            },
        },
    },
    "/readyz": {
        "get": {
            "operationId": "readyz",
            "tags": ["system"],
            "summary": "Readiness: whether this instance should be sent requests",
            "description": (
                "503 when the database can't be reached, the schema is behind this code "
                "(migrations pending; a schema ahead of it, during a rolling update, is "
                "ready), or the instance is draining after SIGTERM."
            ),
            "security": PUBLIC,
            "responses": {
                "200": _ok("Readiness", "Ready."),
                "503": _ok("Readiness", "Not ready; the body says why."),
                "414": {"$ref": "#/components/responses/414"},
                "500": {"$ref": "#/components/responses/500"},
            },
        },
    },
    "/status": {
        "get": {
            "operationId": "status",
            "tags": ["system"],
            "summary": "This instance's worker, the queue, and every live instance",
            "responses": _responses({"200": _ok("Status", "The status.")}),
        },
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "tags": ["system"],
            "summary": "Prometheus metrics of the whole cluster's queue and this instance",
            "responses": _responses(
                {
                    "200": {
                        "description": "Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                }
            ),
        },
    },
    "/events": {
        "parameters": [EVENTS_TASK_ID, EVENTS_LAST_EVENT_ID, EVENTS_NAMED, LAST_EVENT_ID_HEADER],
        "get": {
            "operationId": "events",
            "tags": ["system"],
            "security": STREAM_KEY,
            "summary": "Server-Sent Events: one JSON event per change, made on any instance",
            "description": (
                "Opens with `retry: 1000` (reconnect after a second). Each event is "
                "`id: <id>` and `data: <Event as JSON>`, unnamed unless `named=true`. A "
                "refusal (a bad parameter, 422; no stream slot free, 503 with `Retry-After`) "
                "is an HTTP answer before the stream starts. A client that falls 1,000 "
                "events behind, or reads nothing for EVENT_SEND_TIMEOUT_SECONDS, is "
                "disconnected: it reconnects and resumes with `Last-Event-ID`."
            ),
            "responses": _responses(
                {
                    "200": {
                        "description": "An endless `text/event-stream`; each event's `data:` "
                        "is one of these, its `id:` the same as its `id`.",
                        "content": {"text/event-stream": {"schema": _STREAM_MESSAGE}},
                    }
                },
                "422",
            ),
        },
    },
    "/ws": {
        "parameters": [EVENTS_TASK_ID, EVENTS_LAST_EVENT_ID],
        "get": {
            "operationId": "websocket",
            "tags": ["system"],
            "security": STREAM_KEY,
            "summary": "WebSocket: the same events as /events, one JSON text message each",
            "description": (
                "A refusal (a bad parameter, 422; no stream slot free, 503 with "
                "`Retry-After`) is an HTTP answer before the upgrade. A client that reads "
                "nothing, or answers no ping, for EVENT_SEND_TIMEOUT_SECONDS is "
                "disconnected; one that falls 1,000 events behind gets close code 1013: "
                "either reconnects with `?last_event_id=` the `id` of the last message it got."
            ),
            "responses": _responses(
                {
                    "101": {
                        "description": "Switching Protocols; then one text message per event, "
                        "each one of these.",
                        "content": {"application/json": {"schema": _STREAM_MESSAGE}},
                    },
                    "400": {"$ref": "#/components/responses/400"},
                },
                "422",
            ),
        },
    },
}

_EVENT_AT = {
    "type": "string",
    "format": "date-time",
    "description": "When, in UTC with six fractional digits, always: "
    "`2026-12-02T19:30:00.000000+00:00`.",
    "example": "2026-12-02T19:30:00.000000+00:00",
}

# The system endpoints' bodies, written by hand: they are not marshmallow schemas.
EXTRA_SCHEMAS: dict[str, dict[str, Any]] = {
    "Health": {
        "type": "object",
        "required": ["status", "database"],
        "properties": {
            "status": {"type": "string", "enum": ["healthy", "unhealthy"]},
            "database": {"type": "string", "example": "ok"},
        },
    },
    "Liveness": {
        "type": "object",
        "required": ["status", "threads"],
        "properties": {
            "status": {"type": "string", "enum": ["alive", "dead"]},
            "threads": {
                "type": "object",
                "description": "Each part (`listener`, `housekeeper`, `worker`): `ok`, "
                "`dead`, `stalled`, or for the worker `dead: ` and the dead threads' names.",
                "additionalProperties": {"type": "string"},
                "example": {"listener": "ok", "housekeeper": "ok", "worker": "ok"},
            },
        },
    },
    "Readiness": {
        "type": "object",
        "required": ["status", "database", "schema", "draining"],
        "properties": {
            "status": {"type": "string", "enum": ["ready", "not ready"]},
            "database": {"type": "string", "enum": ["ok", "unreachable"]},
            "schema": {"type": "string", "enum": ["current", "behind", "ahead", "unknown"]},
            "draining": {"type": "boolean"},
        },
    },
    "Status": {
        "type": "object",
        "description": (
            "`instance_id`; `worker` (running, current task, processed and failed counts, "
            "started at, the `queues` it serves with their threads); `queue` (tasks per "
            "status); `instances` (every live instance with its last heartbeat); "
            "`event_streams` (open and most allowed); "
            "`database_connections` (this instance's statement pool: in use, idle, most "
            "allowed, statements waiting for one)."
        ),
        "properties": {
            "instance_id": {"type": "string"},
            # Free-form objects said so: generators otherwise warn and guess.
            "worker": {"type": "object", "additionalProperties": True},
            "queue": {
                "type": "object",
                "properties": {
                    status: {"type": "integer", "minimum": 0} for status in schemas.TASK_STATUSES
                },
            },
            "instances": {
                "type": "array",
                "items": {"type": "object", "additionalProperties": True},
            },
            "event_streams": _counts("open", "max"),
            "database_connections": _counts("in_use", "idle", "max", "waiting"),
        },
    },
    "Event": {
        "type": "object",
        "description": "One change of a task or conversation, sent to every stream.",
        "required": ["id", "type", "task_id", "status", "instance_id", "at"],
        "properties": {
            "id": {
                **_EVENT_ID_SCHEMA,
                "description": "The event's number, the same on every instance (SSE `id:`): "
                "resume from it. Increasing, though a change that took its number first may "
                "commit, and arrive, after a later one.",
            },
            "type": {
                "type": "string",
                "enum": list(EVENT_TYPES),
            },
            "task_id": {"type": "integer"},
            "conversation_id": {"type": "integer"},
            "status": {"type": "string", "nullable": True, "description": "The task's status."},
            "instance_id": {"type": "string", "nullable": True},
            "at": _EVENT_AT,
            "progress": {
                "allOf": [{"$ref": "#/components/schemas/Progress"}],
                "description": "task.progress only: the report, as the task now shows it.",
            },
            "output": {
                "type": "object",
                "description": "conversation.output only: a chunk of the processor's live "
                "output for `conversation_id`. Not stored: sent to the clients connected then.",
                "required": ["seq", "text"],
                "properties": {
                    "seq": {
                        "type": "integer",
                        "minimum": 0,
                        "description": "The chunk's number within the conversation's "
                        "output of this attempt, from 0, in order.",
                    },
                    "text": {"type": "string"},
                },
            },
        },
    },
    "StreamReset": {
        "type": "object",
        "description": "The stream can't send what the client missed (it resumed too late, "
        "from an id this instance never heard, or the instance lost its database connection "
        "for a while): fetch the state anew. Its `id`, when it has one, is where the stream "
        "now is: keep it as the last event id.",
        "required": ["type", "reason", "at"],
        "properties": {
            "id": _EVENT_ID_SCHEMA,
            "type": {"type": "string", "enum": [RESET_TYPE]},
            "reason": {"type": "string", "example": "event id too old"},
            "at": _EVENT_AT,
        },
    },
}


# Every response but gunicorn's own (414) and a WebSocket's upgrade carries it (taskapp.logs).
REQUEST_ID_HEADER = {
    "description": "This request's id, in the log lines it caused: the request's own "
    "`X-Request-ID` when it sent a sane one (1 to 128 letters, digits and `._~:/+=@-`), "
    "else a new one (32 hex digits).",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._~:/+=@-]{1,128}$"},
}


def _with_request_id(document: dict[str, Any]) -> None:
    """Add X-Request-ID to every response, in one place rather than in each operation."""
    reference = {"$ref": "#/components/headers/X-Request-ID"}
    components = document["components"]
    components.setdefault("headers", {})["X-Request-ID"] = REQUEST_ID_HEADER
    responses = [r for code, r in components["responses"].items() if code != "414"]
    for item in document["paths"].values():
        for method, operation in item.items():
            if method != "parameters":
                responses += operation["responses"].values()
    for response in responses:
        if "$ref" not in response:
            response.setdefault("headers", {})["X-Request-ID"] = reference


def build_spec() -> dict[str, Any]:
    """The whole OpenAPI document as a dict."""
    spec = APISpec(
        title="taskapp",
        version="1.0.0",
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": DESCRIPTION},
        security=API_KEY,
        tags=[
            {"name": "tasks", "description": "Tasks and their lifecycle."},
            {"name": "conversations", "description": "A task's conversations."},
            {
                "name": "queues",
                "description": "Flow control across the cluster: queues, concurrency keys, "
                "rate limits, pause and resume.",
            },
            {"name": "system", "description": "Health, status, metrics and live events."},
        ],
    )
    spec.components.security_scheme(
        "bearerAuth", {"type": "http", "scheme": "bearer", "description": "An API key."}
    )
    spec.components.security_scheme(
        "apiKeyHeader", {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    )
    spec.components.security_scheme(
        "apiKeyQuery",
        {
            "type": "apiKey",
            "in": "query",
            "name": "api_key",
            "description": "Only for the streams, which browsers open without headers.",
        },
    )
    for name, schema in COMPONENT_SCHEMAS.items():
        spec.components.schema(name, schema=schema)
    for name, definition in EXTRA_SCHEMAS.items():
        spec.components.schema(name, definition)
    for code, (problem_schema, description) in ERROR_RESPONSES.items():
        response: dict[str, Any] = {
            "description": description,
            "content": {PROBLEM_MIMETYPE: {"schema": problem_schema}},
        }
        if code in _ERROR_HEADERS:
            response["headers"] = _ERROR_HEADERS[code]
        spec.components.response(code, response)
    # gunicorn refuses an over-long request line itself, before the service sees it.
    spec.components.response(
        "414",
        {
            "description": "The URL is longer than gunicorn's limit (4094 bytes of request "
            "line); gunicorn answers this itself, as a small HTML page.",
            "content": {"text/html": {"schema": {"type": "string"}}},
        },
    )
    for path, item in PATHS.items():
        operations = {k: v for k, v in item.items() if k != "parameters"}
        spec.path(path=path, operations=operations, parameters=item.get("parameters"))
    document = spec.to_dict()
    _with_request_id(document)
    components = document["components"]
    for schema in components["schemas"].values():
        for name, prop in schema.get("properties", {}).items():
            schema["properties"][name] = _nullable_reference(prop)
    for schema_name, examples in PROPERTY_EXAMPLES.items():
        properties = components["schemas"][schema_name]["properties"]
        for name, example in examples.items():
            properties[name]["example"] = example
    for problem_schema in ("Problem", "ValidationProblem"):
        components["schemas"][problem_schema]["properties"]["type"] = PROBLEM_TYPE_PROPERTY
    for code, response in components["responses"].items():
        kinds = [kind for kind in PROBLEM_TYPES.values() if str(kind.status) == code]
        if kinds and PROBLEM_MIMETYPE in response["content"]:
            response["content"][PROBLEM_MIMETYPE]["examples"] = {
                kind.name.replace("-", "_"): {"summary": kind.summary, "value": _problem(kind)}
                for kind in kinds
            }
    return document


PROBLEM_TYPE_PROPERTY = {
    "type": "string",
    "description": "The kind of problem: a URI reference, `/problems/<name>` on this service, "
    "whose page says what it means (see the API's description for the list). "
    "`about:blank` for none of them.",
    "example": "/problems/validation",
}


def _problem(kind: ProblemType) -> dict[str, Any]:
    """An example problem of a kind, as the service sends it."""
    body: dict[str, Any] = {
        "type": kind.uri,
        "title": HTTPStatus(kind.status).phrase,
        "status": kind.status,
        "detail": kind.summary + ".",
    }
    if kind.status == 422:
        field = "Idempotency-Key" if kind.name == "idempotency-key-reused" else "title"
        body["errors"] = {field: ["An explanation of what is wrong with it."]}
    return body


def _nullable_reference(prop: dict[str, Any]) -> dict[str, Any]:
    """apispec writes a nullable nested schema as `anyOf: [ref, {type: object, nullable}]`,
    which admits any object at all; say "this schema, or null" instead."""
    null = {"type": "object", "nullable": True}
    any_of = prop.get("anyOf") or []
    if len(any_of) != 2 or null not in any_of:
        return prop
    (reference,) = (choice for choice in any_of if choice != null)
    rest = {k: v for k, v in prop.items() if k != "anyOf"}
    return {**rest, "allOf": [reference], "nullable": True}


def _swagger_ui_dist() -> Path:
    """The folder of Swagger UI's files in the flask-swagger-ui package (found, not imported:
    its blueprint is not used)."""
    spec = importlib.util.find_spec("flask_swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("flask-swagger-ui is not installed: pip install -r requirements.txt")
    return Path(next(iter(spec.submodule_search_locations))) / "dist"


SWAGGER_UI_DIST = _swagger_ui_dist()
SWAGGER_UI_CONFIG = {
    "url": SPEC_ROUTE,
    "dom_id": "#swagger-ui",
    # Swagger UI 4.1.3 made this the default; said here so that no upgrade can undo it.
    "queryConfigEnabled": False,
    # Its default sends the spec's URL to validator.swagger.io and shows the badge it returns.
    "validatorUrl": None,
    "deepLinking": True,
    "persistAuthorization": True,
    "displayRequestDuration": True,
    "showExtensions": False,
}
# The page: the bundle (its default preset and layout), and its start-up as the one inline
# script, marked with the response's CSP nonce (taskapp.headers gives the page the
# dashboard's policy: scripts, styles, images and connections from this origin only).
_DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{{ title }}</title>
  <link rel="stylesheet" href="{{ url_for('flasgger.static', filename='index.css') }}">
  <link rel="stylesheet" href="{{ swagger_ui_css }}">
  <link rel="icon" type="image/png" href="{{ favicon }}">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{{ swagger_ui_bundle_js }}"></script>
  <script nonce="{{ csp_nonce() }}">
    window.ui = SwaggerUIBundle({{ flasgger_config.swagger_ui_config | tojson }});
  </script>
</body>
</html>
"""
# Swagger UI's OAuth2 redirect page (flasgger serves it at /oauth2-redirect.html); the API
# has no OAuth2 flow, but the route is flasgger's, so it serves the 5.x page, not the old one.
_OAUTH2_REDIRECT_PAGE = """<!DOCTYPE html>
<html lang="en">
<body>
  <script src="{{ url_for('flasgger.static', filename='oauth2-redirect.js') }}"></script>
</body>
</html>
"""


def init_app(app: Flask) -> None:
    """Serve the spec at /apispec_1.json and Swagger UI at /apidocs/."""
    config = {
        "headers": [],
        "specs": [
            {
                "endpoint": "apispec_1",
                "route": SPEC_ROUTE,
                # The template is the whole spec: flasgger must not add paths of its own.
                "rule_filter": lambda rule: False,
                "model_filter": lambda tag: False,
            }
        ],
        "static_url_path": "/flasgger_static",
        "static_folder": str(SWAGGER_UI_DIST),
        "swagger_ui": True,
        "specs_route": DOCS_ROUTE,
        "openapi": "3.0.3",
        "title": "taskapp API",
        "uiversion": 3,
        "swagger_ui_config": SWAGGER_UI_CONFIG,
    }
    Swagger(app, template=build_spec(), config=config, merge=False)
    # flasgger renders flasgger/index.html with the asset URLs of its config (by default its
    # static files, now Swagger UI 5's): the templates are ours, flasgger's own never load.
    # (Flask caches a blueprint's loader in this attribute; set, it replaces the folder's.)
    app.blueprints["flasgger"].jinja_loader = DictLoader(
        {"flasgger/index.html": _DOCS_PAGE, "flasgger/oauth2-redirect.html": _OAUTH2_REDIRECT_PAGE}
    )
