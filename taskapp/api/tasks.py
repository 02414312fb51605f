"""Tasks: create (idempotently with a key), list, read, update, delete, retry, cancel, prune.

Every response that carries a task carries its `ETag`: a strong validator, the hash of the
very JSON sent, so it changes with anything the task's GET shows (its conversations, errors
and progress included) and only then. PUT, DELETE, retry and cancel take `If-Match`
(optional: without it they write unconditionally) and answer 412 when it names none of the
current tags; GET takes `If-None-Match` (compared weakly, RFC 9110 section 13.1.2) and answers 304.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from flask import Blueprint, Response, current_app, request, url_for
from flask.typing import ResponseReturnValue
from werkzeug.http import quote_etag

from .. import services
from ..database import get_database
from ..errors import IdempotencyKeyReused, Unprocessable
from ..schemas import (
    IDEMPOTENCY_KEY_MAX_LENGTH,
    IDEMPOTENCY_KEY_PATTERN,
    TaskCreate,
    TaskListQuery,
    TaskPrune,
    TaskUpdate,
)
from .common import json_object, json_text, no_content, settings

bp = Blueprint("tasks", __name__, url_prefix="/tasks")

# Built once: a schema instance is reusable across requests and costs ~50 us to build.
_TASK_CREATE, _TASK_UPDATE, _LIST_QUERY = TaskCreate(), TaskUpdate(), TaskListQuery()
_PRUNE = TaskPrune()

IDEMPOTENCY_HEADER = "Idempotency-Key"


def _writer() -> dict[str, Any]:
    return {"database": get_database(), "instance_id": settings().instance_id}


def _idempotency_key() -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not (
        len(key) <= IDEMPOTENCY_KEY_MAX_LENGTH and re.fullmatch(IDEMPOTENCY_KEY_PATTERN, key)
    ):
        message = (
            f"Must be 1 to {IDEMPOTENCY_KEY_MAX_LENGTH} visible ASCII characters "
            "(inner spaces allowed)."
        )
        raise Unprocessable(
            f"Invalid {IDEMPOTENCY_HEADER} header: {message}",
            errors={IDEMPOTENCY_HEADER: [message]},
        )
    return key


def entity_tag(task: services.Rendered) -> str:
    """The task's entity tag, unquoted: a hash of its JSON as the API sends it."""
    return hashlib.blake2b(task.json.encode(), digest_size=16).hexdigest()


def _task_response(
    task: services.Rendered, status: int = 200, *, tag: str | None = None
) -> Response:
    """A task's JSON with its ETag. Content-Location says the body is the task's own
    representation, which is what the tag validates, also when the request's URL is another
    (a create, a retry, a cancel; RFC 9110, section 8.7)."""
    response = json_text(task.json, status)
    response.headers["ETag"] = quote_etag(tag or entity_tag(task))
    if request.method != "GET":
        response.headers["Content-Location"] = url_for(".get_task", task_id=task.id)
    return response


def _if_match() -> services.Precondition | None:
    """The request's If-Match as a test of the task's current state; None when not sent.
    If-Match compares strongly (RFC 9110, section 13.1.1): a weak tag never matches."""
    if "If-Match" not in request.headers:
        return None
    wanted = request.if_match
    return lambda current: wanted.star_tag or wanted.contains(entity_tag(current))


def _fingerprint(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@bp.post("/")
def create_task() -> ResponseReturnValue:
    body = json_object()
    data, key = _TASK_CREATE.load(body), _idempotency_key()
    config = settings()
    creation = {**_writer(), "data": data, "default_max_attempts": config.max_attempts}
    if key is None:
        task = services.create_task(**creation)
    else:
        try:
            task = services.create_task_idempotently(
                **creation, key=key, fingerprint=_fingerprint(body)
            )
        except services.IdempotencyKeyReused:
            raise IdempotencyKeyReused(
                f"This {IDEMPOTENCY_HEADER} was already used with a different request body.",
                errors={IDEMPOTENCY_HEADER: ["Already used with a different request body."]},
            ) from None
    response = _task_response(task, 201)
    response.headers["Location"] = url_for(".get_task", task_id=task.id)
    return response


@bp.get("/")
def list_tasks() -> ResponseReturnValue:
    query = _LIST_QUERY.load(request.args.to_dict())
    page = services.list_tasks(database=get_database(), **query)
    response = json_text(page.json)
    response.headers["X-Total-Count"] = str(page.total)
    return response


@bp.get("/<id:task_id>")
def get_task(task_id: int) -> ResponseReturnValue:
    task = services.get_task(database=get_database(), task_id=task_id)
    tag = entity_tag(task)
    if request.if_none_match.contains_weak(tag):
        not_modified = current_app.response_class(status=304)
        del not_modified.headers["Content-Type"]
        not_modified.headers["ETag"] = quote_etag(tag)
        return not_modified
    return _task_response(task, tag=tag)


@bp.put("/<id:task_id>")
def update_task(task_id: int) -> ResponseReturnValue:
    data = _TASK_UPDATE.load(json_object())
    task = services.update_task(**_writer(), task_id=task_id, data=data, precondition=_if_match())
    return _task_response(task)


@bp.delete("/<id:task_id>")
def delete_task(task_id: int) -> ResponseReturnValue:
    services.delete_task(**_writer(), task_id=task_id, precondition=_if_match())
    return no_content()


@bp.post("/<id:task_id>/retry")
def retry_task(task_id: int) -> ResponseReturnValue:
    task = services.retry_task(**_writer(), task_id=task_id, precondition=_if_match())
    return _task_response(task)


@bp.post("/<id:task_id>/cancel")
def cancel_task(task_id: int) -> ResponseReturnValue:
    task = services.cancel_task(**_writer(), task_id=task_id, precondition=_if_match())
    return _task_response(task)


@bp.post("/prune")
def prune_tasks() -> ResponseReturnValue:
    pruned = services.prune_tasks(database=get_database(), **_PRUNE.load(json_object()))
    return {"deleted": pruned.deleted, "done": pruned.done}
