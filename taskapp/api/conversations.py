"""Conversations: added to and listed under their task, read and updated on their own."""

from __future__ import annotations

from flask import Blueprint, url_for
from flask.typing import ResponseReturnValue

from .. import services
from ..database import get_database
from ..schemas import ConversationCreate, ConversationUpdate
from .common import json_object, json_text, settings

bp = Blueprint("conversations", __name__)

# Built once: a schema instance is reusable across requests and costs ~50 us to build.
_CREATE, _UPDATE = ConversationCreate(), ConversationUpdate()


@bp.post("/tasks/<id:task_id>/conversations/")
def create_conversation(task_id: int) -> ResponseReturnValue:
    data = _CREATE.load(json_object())
    conversation = services.create_conversation(
        database=get_database(), instance_id=settings().instance_id, task_id=task_id, data=data
    )
    response = json_text(conversation.json, 201)
    response.headers["Location"] = url_for(".get_conversation", conversation_id=conversation.id)
    return response


@bp.get("/tasks/<id:task_id>/conversations/")
def list_conversations(task_id: int) -> ResponseReturnValue:
    return json_text(services.list_conversations(database=get_database(), task_id=task_id))


@bp.get("/conversations/<id:conversation_id>")
def get_conversation(conversation_id: int) -> ResponseReturnValue:
    conversation = services.get_conversation(
        database=get_database(), conversation_id=conversation_id
    )
    return json_text(conversation.json)


@bp.put("/conversations/<id:conversation_id>")
def update_conversation(conversation_id: int) -> ResponseReturnValue:
    data = _UPDATE.load(json_object())
    conversation = services.update_conversation(
        database=get_database(),
        instance_id=settings().instance_id,
        conversation_id=conversation_id,
        data=data,
    )
    return json_text(conversation.json)
