"""Conversations: added to and listed under their task, updated on their own."""

from __future__ import annotations

from flask import Blueprint
from flask.typing import ResponseReturnValue

from .. import services
from ..extensions import db
from ..schemas import ConversationCreate, ConversationOut, ConversationUpdate
from .common import json_object, settings

bp = Blueprint("conversations", __name__)

# Built once: a schema instance is reusable across requests and costs ~50 us to build.
_CREATE, _UPDATE = ConversationCreate(), ConversationUpdate()
_OUT, _OUT_MANY = ConversationOut(), ConversationOut(many=True)


@bp.post("/tasks/<id:task_id>/conversations/")
def create_conversation(task_id: int) -> ResponseReturnValue:
    data = _CREATE.load(json_object())
    conversation = services.create_conversation(
        session=db.session(), instance_id=settings().instance_id, task_id=task_id, data=data
    )
    return _OUT.dump(conversation), 201


@bp.get("/tasks/<id:task_id>/conversations/")
def list_conversations(task_id: int) -> ResponseReturnValue:
    conversations = services.list_conversations(session=db.session(), task_id=task_id)
    return _OUT_MANY.dump(conversations)


@bp.put("/conversations/<id:conversation_id>")
def update_conversation(conversation_id: int) -> ResponseReturnValue:
    data = _UPDATE.load(json_object())
    conversation = services.update_conversation(
        session=db.session(),
        instance_id=settings().instance_id,
        conversation_id=conversation_id,
        data=data,
    )
    return _OUT.dump(conversation)
