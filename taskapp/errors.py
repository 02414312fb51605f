"""Every failure as one shape: application/problem+json (RFC 9457), never HTML or a traceback."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from itertools import islice
from typing import Any

import psycopg
from flask import Flask, Response, current_app, request
from gunicorn.http.errors import ParseException
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

PROBLEM_MIMETYPE = "application/problem+json"
# How long a client should wait before retrying a 503 (the database is usually back quickly).
RETRY_AFTER_SECONDS = "1"


class ApiError(Exception):
    """An error the service layer raises on purpose; its status and detail go to the client."""

    status = 500

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
    status = 409


class Unprocessable(ApiError):
    """Invalid input outside a marshmallow schema (e.g. a header); `errors` names it."""

    status = 422


def problem(
    status: int,
    detail: str,
    *,
    errors: Mapping[str, list[str]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """Build an application/problem+json response."""
    body: dict[str, Any] = {
        "type": "about:blank",
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
    return problem(error.status, error.detail, errors=error.errors, headers=error.headers)


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


def init_app(app: Flask) -> None:
    """Register the problem+json handlers."""
    app.register_error_handler(HTTPException, _handle_http)
    app.register_error_handler(ApiError, _handle_api_error)
    app.register_error_handler(ParseException, _handle_malformed_body)
    app.register_error_handler(ValidationError, _handle_validation)
    app.register_error_handler(psycopg.Error, _handle_database_error)
    app.register_error_handler(Exception, _handle_unexpected)
