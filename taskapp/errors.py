"""Every failure as one shape: application/problem+json (RFC 9457), never HTML or a traceback.

Each problem's `type` names its kind (PROBLEM_TYPES), so a client tells a bad field from a
reused Idempotency-Key or a stale If-Match without reading prose. A type is a relative URI
with the full path, `/problems/<name>`, which RFC 9457 (section 3.1.1) allows: it means the
same on every host and behind any proxy, where an absolute URI would name one host. The
service serves a page per type there (init_app), and the OpenAPI spec lists them all.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from itertools import islice
from typing import Any

import psycopg
from flask import Flask, Response, current_app, request
from gunicorn.http.errors import ParseException
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from .schemas import MAX_CONVERSATIONS_PER_TASK

log = logging.getLogger(__name__)

PROBLEM_MIMETYPE = "application/problem+json"
# How long a client should wait before retrying a 503 (the database is usually back quickly).
RETRY_AFTER_SECONDS = "1"
PROBLEMS_PATH = "/problems/"


@dataclass(frozen=True)
class ProblemType:
    """A kind of error: its `type` URI, its status, and what it means for a client."""

    name: str
    status: int
    summary: str
    description: str

    @property
    def uri(self) -> str:
        return f"{PROBLEMS_PATH}{self.name}"


MALFORMED_REQUEST = ProblemType(
    "malformed-request",
    400,
    "The request could not be read",
    "The body is not JSON or not a JSON object, a chunked body is malformed, a header that "
    "takes one value was sent twice (or with a comma), or a WebSocket handshake is invalid. "
    "Fix the request; repeating it as it is fails the same way.",
)
UNAUTHORIZED = ProblemType(
    "unauthorized",
    401,
    "A valid API key is required",
    "The service runs with API_KEYS and the request carried none of them: send "
    "`Authorization: Bearer KEY` or `X-API-Key: KEY`.",
)
NOT_FOUND = ProblemType(
    "not-found",
    404,
    "No such resource",
    "No task, conversation, queue key or path by that name; ids are integers from 1 to "
    "2^63-1. A deleted task and its conversations are gone for good.",
)
METHOD_NOT_ALLOWED = ProblemType(
    "method-not-allowed",
    405,
    "Method not allowed here",
    "The path exists but does not take this method; the `Allow` header lists those it takes.",
)
INVALID_STATE = ProblemType(
    "invalid-state",
    409,
    "The task's state forbids this change",
    "Retry takes a failed, cancelled or completed task; cancel a pending or processing one; "
    "a processing task keeps its queue and concurrency_key. Read the task and decide again.",
)
CONVERSATION_LIMIT = ProblemType(
    "conversation-limit",
    409,
    "The task has the most conversations a task may have",
    f"A task holds at most {MAX_CONVERSATIONS_PER_TASK:,} conversations; put more work in "
    "another task.",
)
PRECONDITION_FAILED = ProblemType(
    "precondition-failed",
    412,
    "The task changed since it was read",
    "The `If-Match` header named none of the task's current entity tags: someone (an "
    "editor, or the worker processing it) changed it after you read it. GET it again "
    "(its `ETag` is the new tag), reapply your change and send it with that tag.",
)
CONTENT_TOO_LARGE = ProblemType(
    "content-too-large",
    413,
    "The body is over the size limit",
    "Bodies are at most MAX_CONTENT_LENGTH bytes (1 MiB by default), sent with a length or "
    "chunked. Send less per request (e.g. add conversations in several requests).",
)
UNSUPPORTED_MEDIA_TYPE = ProblemType(
    "unsupported-media-type",
    415,
    "The body must be JSON",
    "A write's body must be sent as `Content-Type: application/json`; an action without a "
    "body may send no Content-Type at all.",
)
VALIDATION = ProblemType(
    "validation",
    422,
    "Invalid input",
    "A field is missing, of the wrong type, out of range or unknown (in the body, the query "
    "or a header); `errors` maps each bad field's path (`conversations.0.content`) to its "
    "messages.",
)
IDEMPOTENCY_KEY_REUSED = ProblemType(
    "idempotency-key-reused",
    422,
    "The Idempotency-Key was used with another body",
    "A repeat with an Idempotency-Key must carry the same body as its first request; this "
    "one differs, so it was not replayed and nothing was created. Use a new key for a new "
    "request.",
)
INTERNAL_ERROR = ProblemType(
    "internal-error",
    500,
    "Unexpected error",
    "The service hit a bug; it is logged with its traceback, and none of it is returned.",
)
UNAVAILABLE = ProblemType(
    "unavailable",
    503,
    "Service unavailable",
    "The database cannot be reached (or no pooled connection came free in time), or, for "
    "the event streams, every stream slot is taken. Retry after `Retry-After` seconds.",
)

PROBLEM_TYPES: dict[str, ProblemType] = {
    kind.name: kind
    for kind in (
        MALFORMED_REQUEST,
        UNAUTHORIZED,
        NOT_FOUND,
        METHOD_NOT_ALLOWED,
        INVALID_STATE,
        CONVERSATION_LIMIT,
        PRECONDITION_FAILED,
        CONTENT_TOO_LARGE,
        UNSUPPORTED_MEDIA_TYPE,
        VALIDATION,
        IDEMPOTENCY_KEY_REUSED,
        INTERNAL_ERROR,
        UNAVAILABLE,
    )
}
# The kind of a problem that names none, by its status (werkzeug's own errors: 404 for an
# unknown path, 405, 413, a stream's 503). A status not here keeps RFC 9457's about:blank.
_TYPE_BY_STATUS = {
    400: MALFORMED_REQUEST,
    401: UNAUTHORIZED,
    404: NOT_FOUND,
    405: METHOD_NOT_ALLOWED,
    409: INVALID_STATE,
    412: PRECONDITION_FAILED,
    413: CONTENT_TOO_LARGE,
    415: UNSUPPORTED_MEDIA_TYPE,
    422: VALIDATION,
    500: INTERNAL_ERROR,
    503: UNAVAILABLE,
}


class ApiError(Exception):
    """An error the service layer raises on purpose; its status and detail go to the client."""

    status = 500
    problem_type: ProblemType | None = None  # None: the status's kind

    def __init__(
        self,
        detail: str,
        *,
        errors: Mapping[str, list[str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = dict(errors) if errors else None
        self.headers = dict(headers or {})


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class UnsupportedMediaType(ApiError):
    status = 415


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    """The task's state forbids the change."""

    status = 409


class ConversationLimit(Conflict):
    problem_type = CONVERSATION_LIMIT


class PreconditionFailed(ApiError):
    """An If-Match that names none of the resource's current entity tags."""

    status = 412


class Unprocessable(ApiError):
    """Invalid input outside a marshmallow schema (e.g. a header); `errors` names it."""

    status = 422


class IdempotencyKeyReused(Unprocessable):
    problem_type = IDEMPOTENCY_KEY_REUSED


def problem(
    status: int,
    detail: str,
    *,
    errors: Mapping[str, list[str]] | None = None,
    headers: Mapping[str, str] | None = None,
    kind: ProblemType | None = None,
) -> Response:
    """Build an application/problem+json response; its type is `kind`, else its status's.

    The title stays the status's phrase (a client shows "409 Conflict: …"); the type, not the
    title, tells the kinds of one status apart."""
    kind = kind or _TYPE_BY_STATUS.get(status)
    body: dict[str, Any] = {
        "type": kind.uri if kind else "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = dict(errors)
    response = current_app.response_class(
        f"{current_app.json.dumps(body)}\n", status=status, mimetype=PROBLEM_MIMETYPE
    )
    response.headers.update(headers or {})
    return response


def flatten_messages(messages: Any, prefix: str = "") -> dict[str, list[str]]:
    """Turn marshmallow's nested messages into {"conversations.0.content": [...]}."""
    if isinstance(messages, Mapping):
        flat: dict[str, list[str]] = {}
        for key, value in messages.items():
            # `_schema` holds errors about the object itself, so it names the object's path.
            path = prefix if key == "_schema" and prefix else _join(prefix, str(key))
            for name, texts in flatten_messages(value, path).items():
                flat.setdefault(name, []).extend(texts)
        return flat
    if isinstance(messages, list | tuple):
        if all(isinstance(m, str) for m in messages):
            return {prefix or "_schema": list(messages)}
        flat = {}
        for value in messages:
            for name, texts in flatten_messages(value, prefix).items():
                flat.setdefault(name, []).extend(texts)
        return flat
    return {prefix or "_schema": [str(messages)]}


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _handle_http(error: HTTPException) -> Response | HTTPException:
    if error.code is None or error.code < 400:
        return error  # a routing redirect is a response in its own right
    # Keep what the exception says about the protocol (Allow on 405, WWW-Authenticate on 401).
    headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
    return problem(error.code, error.description or HTTPStatus(error.code).phrase, headers=headers)


def _handle_malformed_body(error: ParseException) -> Response:
    # gunicorn parses a chunked body only as the application reads it, so a bad chunk size,
    # a missing CRLF or a bad extension reaches us as its parser's exception. gunicorn then
    # closes the connection: where the next request would start is unknown.
    return problem(400, f"The request body is malformed: {error}.")


def _handle_api_error(error: ApiError) -> Response:
    return problem(
        error.status,
        error.detail,
        errors=error.errors,
        headers=error.headers,
        kind=error.problem_type,
    )


# The most invalid fields one 422 names: a body of 1,000 conversations, each wrong three ways,
# is a 422 of 100 of its errors (and how many more there were), not of 140 KB.
MAX_REPORTED_ERRORS = 100


def _handle_validation(error: ValidationError) -> Response:
    errors = flatten_messages(error.messages)
    fields = ", ".join(islice(errors, MAX_REPORTED_ERRORS))
    if len(errors) > MAX_REPORTED_ERRORS:
        more = len(errors) - MAX_REPORTED_ERRORS
        errors = dict(islice(errors.items(), MAX_REPORTED_ERRORS))
        return problem(422, f"Invalid input: {fields} and {more} more fields.", errors=errors)
    return problem(422, f"Invalid input: {fields}.", errors=errors)


def _database_unavailable(error: Exception) -> Response:
    log.warning("database unavailable on %s %s: %s", request.method, request.path, error)
    return problem(
        503,
        "The database cannot be reached right now; try again shortly.",
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


# A lost or unreachable database (or no pooled connection free in time) is a 503; any other
# database error is a bug.
_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError)


def _handle_database_error(error: psycopg.Error) -> Response:
    if isinstance(error, _UNAVAILABLE):
        return _database_unavailable(error)
    return _handle_unexpected(error)


def _handle_unexpected(error: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=error)
    return problem(500, "The server hit an unexpected error; it has been logged.")


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{title}</title></head>
<body>
<h1>{title}</h1>
<p>HTTP {status}; type <code>{uri}</code>.</p>
<p>{description}</p>
<p>Every problem type: <a href="/apidocs/">the API docs</a> (the Problem schema).</p>
</body>
</html>
"""


def problem_type_page(name: str) -> Response:
    """GET /problems/<name>: what a problem type means, for a person following its URI."""
    kind = PROBLEM_TYPES.get(name)
    if kind is None:
        raise NotFound(f"There is no problem type {name!r}.")
    page = _PAGE.format(
        title=html.escape(kind.summary),
        status=kind.status,
        uri=html.escape(kind.uri),
        description=html.escape(kind.description),
    )
    return current_app.response_class(page, mimetype="text/html")


def init_app(app: Flask) -> None:
    """Register the problem+json handlers, and the problem types' pages."""
    app.add_url_rule(f"{PROBLEMS_PATH}<name>", "problem_type", problem_type_page)
    app.register_error_handler(HTTPException, _handle_http)
    app.register_error_handler(ApiError, _handle_api_error)
    app.register_error_handler(ParseException, _handle_malformed_body)
    app.register_error_handler(ValidationError, _handle_validation)
    app.register_error_handler(psycopg.Error, _handle_database_error)
    app.register_error_handler(Exception, _handle_unexpected)
