"""What every resource module shares: positive ids in URLs, the JSON body, the request context."""

from __future__ import annotations

import json
from typing import Any

from flask import Response, current_app, request
from werkzeug.exceptions import NotFound, RequestEntityTooLarge
from werkzeug.routing import BaseConverter

from ..config import QUEUE_NAME, Settings
from ..errors import BadRequest, UnsupportedMediaType
from ..models import CONCURRENCY_KEY_MAX_LENGTH
from ..schemas import BIGINT_MAX


class PositiveIdConverter(BaseConverter):
    """`<id:task_id>`: 1..2^63-1 in plain digits; anything else (0, -1, abc, 2^64) is a 404."""

    regex = r"[1-9][0-9]{0,18}"

    def to_python(self, value: str) -> int:
        number = int(value)
        if number > BIGINT_MAX:
            # Not ValidationError: the matcher would then fall through to a sibling rule of
            # the same path with another method and answer 405 instead of 404.
            raise NotFound()
        return number

    def to_url(self, value: Any) -> str:
        return str(int(value))


class QueueNameConverter(BaseConverter):
    """`<queue:name>`: a queue's name; anything else is a 404."""

    regex = QUEUE_NAME.pattern


class ConcurrencyKeyConverter(BaseConverter):
    """`<concurrency_key:key>`: visible ASCII, `/` included ("openai/gpt-4o")."""

    regex = rf"[!-~]{{1,{CONCURRENCY_KEY_MAX_LENGTH}}}"
    part_isolating = False


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def refuse_foreign_bodies() -> None:
    """before_request: a write that carries a body type other than JSON is a 415, whether or
    not its route reads a body (a cross-site form can POST /tasks/1/cancel as text/plain)."""
    if request.method in _WRITES and request.mimetype and not request.is_json:
        raise UnsupportedMediaType(
            "Send the body as JSON, with Content-Type: application/json.",
            errors={"Content-Type": [f"Not JSON: {request.mimetype}."]},
        )


def json_object() -> dict[str, Any]:
    """The request body as a JSON object; a 415 unless it is sent as JSON, else a 400.

    Requiring the JSON media type keeps other web pages out: a cross-site form or fetch can
    only send text/plain, form or multipart bodies without asking the browser (CORS
    preflight), and this service answers no preflight."""
    if not request.is_json:
        raise UnsupportedMediaType(
            "Send the body as JSON, with Content-Type: application/json.",
            errors={"Content-Type": [f"Not JSON: {request.mimetype or 'none given'}."]},
        )
    raw = _body()
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def _body() -> bytes:
    """The request's bytes; a 413 beyond MAX_CONTENT_LENGTH, whether it says its length
    (Content-Length) or not (chunked)."""
    limit = request.max_content_length
    if request.content_length is None and limit is not None:
        # werkzeug cuts a streamed body at the limit without saying whether there was more:
        # read one byte past it from the server's stream to find out.
        if "wsgi.input_terminated" not in request.environ:
            return b""  # a server that doesn't end the stream for us: don't read it unbounded
        raw: bytes = request.environ["wsgi.input"].read(limit + 1)
        if len(raw) > limit:
            raise RequestEntityTooLarge()
        return raw
    return request.get_data(cache=True)  # a Content-Length over the limit raises the 413 here


# Each header with its WSGI environ key (PEP 3333): werkzeug's `request.headers.get` raises and
# catches a KeyError for a header not sent, which is nearly every request.
_SINGLE_HEADERS = {name: "HTTP_" + name.upper().replace("-", "_") for name in ("Idempotency-Key",)}


def refuse_repeated_headers() -> None:
    """before_request: a header that carries one value, sent more than once, is a 400.

    The server joins repeated fields with a comma (RFC 9110, section 5.3), so a comma in one
    of these is a repeat, whatever the client meant: a key must not be read as another."""
    environ = request.environ
    for name, key in _SINGLE_HEADERS.items():
        value = environ.get(key)
        if value is not None and "," in value:
            raise BadRequest(
                f"Send the {name} header once, with one value.",
                errors={name: ["Sent more than once (or with a comma in it)."]},
            )


def settings() -> Settings:
    """This instance's settings."""
    return current_app.config["TASKAPP"]


def json_text(text: str, status: int = 200) -> Response:
    """A response of JSON that PostgreSQL rendered (taskapp.representation), sent as it is."""
    return current_app.response_class(text, status, mimetype="application/json")


def no_content() -> Response:
    """An empty 204, without the Content-Type an empty body would otherwise claim."""
    response = current_app.response_class(status=204)
    del response.headers["Content-Type"]
    return response
