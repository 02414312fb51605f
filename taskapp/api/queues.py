"""Queues: list and read them, set their limits and their keys' limits, pause and resume."""

from __future__ import annotations

from flask import Blueprint, request
from flask.typing import ResponseReturnValue

from .. import flow
from ..database import get_database
from ..schemas import KeyListQuery, KeyUpdate, QueueUpdate
from .common import json_object, json_text, no_content

bp = Blueprint("queues", __name__, url_prefix="/queues")

_QUEUE_UPDATE, _KEY_UPDATE, _KEY_LIST = QueueUpdate(), KeyUpdate(), KeyListQuery()


@bp.get("/")
def list_queues() -> ResponseReturnValue:
    return json_text(flow.list_queues(database=get_database()))


@bp.get("/<queue:name>")
def get_queue(name: str) -> ResponseReturnValue:
    return json_text(flow.get_queue(database=get_database(), name=name))


@bp.put("/<queue:name>")
def configure_queue(name: str) -> ResponseReturnValue:
    data = _QUEUE_UPDATE.load(json_object())
    return json_text(flow.configure_queue(database=get_database(), name=name, data=data))


@bp.post("/<queue:name>/pause")
def pause_queue(name: str) -> ResponseReturnValue:
    return json_text(flow.set_paused(database=get_database(), name=name, paused=True))


@bp.post("/<queue:name>/resume")
def resume_queue(name: str) -> ResponseReturnValue:
    return json_text(flow.set_paused(database=get_database(), name=name, paused=False))


@bp.get("/<queue:name>/keys/")
def list_keys(name: str) -> ResponseReturnValue:
    query = _KEY_LIST.load(request.args.to_dict())
    return json_text(flow.list_keys(database=get_database(), queue=name, **query))


@bp.get("/<queue:name>/keys/<concurrency_key:key>")
def get_key(name: str, key: str) -> ResponseReturnValue:
    return json_text(flow.get_key(database=get_database(), queue=name, key=key))


@bp.put("/<queue:name>/keys/<concurrency_key:key>")
def configure_key(name: str, key: str) -> ResponseReturnValue:
    data = _KEY_UPDATE.load(json_object())
    return json_text(flow.configure_key(database=get_database(), queue=name, key=key, data=data))


@bp.delete("/<queue:name>/keys/<concurrency_key:key>")
def delete_key(name: str, key: str) -> ResponseReturnValue:
    flow.delete_key(database=get_database(), queue=name, key=key)
    return no_content()
