"""Tasks: create (idempotently with a key), list, read, update, delete, retry, cancel."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from flask import Blueprint, Response, request, url_for
from flask.typing import ResponseReturnValue

from .. import services
from ..errors import Unprocessable
from ..extensions import db
from ..schemas import (
    IDEMPOTENCY_KEY_MAX_LENGTH,
    IDEMPOTENCY_KEY_PATTERN,
    TaskCreate,
    TaskListQuery,
    TaskUpdate,
)
from .common import json_object, no_content, settings

bp = Blueprint("tasks", __name__, url_prefix="/tasks")

# Built once: a schema instance is reusable across requests and costs ~50 us to build.
_TASK_CREATE, _TASK_UPDATE, _LIST_QUERY = TaskCreate(), TaskUpdate(), TaskListQuery()


def _json(text: str, status: int = 200) -> Response:
    # The JSON text PostgreSQL rendered (taskapp.representation), sent as it is.
    return Response(text, status, mimetype="application/json")


def _writer() -> dict[str, Any]:
    return {"session": db.session(), "instance_id": settings().instance_id}


def _idempotency_key() -> str | None:
    key = request.headers.get(services.IDEMPOTENCY_HEADER)
    if key is not None and not (
        len(key) <= IDEMPOTENCY_KEY_MAX_LENGTH and re.fullmatch(IDEMPOTENCY_KEY_PATTERN, key)
    ):
        message = (
            f"Must be 1 to {IDEMPOTENCY_KEY_MAX_LENGTH} visible ASCII characters "
            "(inner spaces allowed)."
        )
        raise Unprocessable(
            f"Invalid {services.IDEMPOTENCY_HEADER} header: {message}",
            errors={services.IDEMPOTENCY_HEADER: [message]},
        )
    return key


def _fingerprint(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@bp.post("/")
def create_task() -> ResponseReturnValue:
    body = json_object()
    data, key = _TASK_CREATE.load(body), _idempotency_key()
    config = settings()
    creation = {
        "engine": db.engine,
        "data": data,
        "instance_id": config.instance_id,
        "default_max_attempts": config.max_attempts,
    }
    if key is None:
        task = services.create_task(**creation)
    else:
        task = services.create_task_idempotently(
            **creation, key=key, fingerprint=_fingerprint(body)
        )
    response = _json(task.json, 201)
    response.headers["Location"] = url_for(".get_task", task_id=task.id)
    return response


@bp.get("/")
def list_tasks() -> ResponseReturnValue:
    query = _LIST_QUERY.load(request.args.to_dict())
    page = services.list_tasks(engine=db.engine, **query)
    response = _json(page.json)
    response.headers["X-Total-Count"] = str(page.total)
    return response


@bp.get("/<id:task_id>")
def get_task(task_id: int) -> ResponseReturnValue:
    return _json(services.get_task(engine=db.engine, task_id=task_id).json)


@bp.put("/<id:task_id>")
def update_task(task_id: int) -> ResponseReturnValue:
    data = _TASK_UPDATE.load(json_object())
    task = services.update_task(
        engine=db.engine, task_id=task_id, data=data, instance_id=settings().instance_id
    )
    return _json(task.json)


@bp.delete("/<id:task_id>")
def delete_task(task_id: int) -> ResponseReturnValue:
    services.delete_task(**_writer(), task_id=task_id)
    return no_content()


@bp.post("/<id:task_id>/retry")
def retry_task(task_id: int) -> ResponseReturnValue:
    return _json(services.retry_task(**_writer(), task_id=task_id).json)


@bp.post("/<id:task_id>/cancel")
def cancel_task(task_id: int) -> ResponseReturnValue:
    return _json(services.cancel_task(**_writer(), task_id=task_id).json)
