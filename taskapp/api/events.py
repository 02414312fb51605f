"""Live events: Server-Sent Events at /events and a WebSocket at /ws."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, request
from flask_sock import Sock
from marshmallow import ValidationError
from werkzeug.exceptions import ServiceUnavailable

from .. import runtime
from ..events import Subscription, TooManyStreams

bp = Blueprint("events", __name__)
sock = Sock()


def _subscribe() -> Subscription:
    instance = runtime.current(current_app)
    raw = request.args.get("task_id")
    task_id = None
    if raw is not None:
        if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) < 2**63:
            raise ValidationError({"task_id": ["Not a valid task id."]})
        task_id = int(raw)
    if instance is None:
        raise ServiceUnavailable("This process runs no event listener.")
    try:
        return instance.subscribe(task_id)
    except TooManyStreams:
        raise ServiceUnavailable(
            f"Too many event streams: this instance serves at most {instance.broker.max_streams}."
        ) from None


@bp.get("/events")
def server_sent_events():
    subscription = _subscribe()
    # Keep-alives also find clients that went away: a write to a closed socket fails.
    keepalive = current_app.config["TASKAPP"].event_keepalive_seconds

    def stream() -> Iterator[str]:
        with subscription:
            yield ": connected\n\n"
            while not subscription.closed:
                event = subscription.get(timeout=keepalive)
                if event is None:
                    yield ": keep-alive\n\n"
                    continue
                yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(stream(), mimetype="text/event-stream", headers=headers)


@sock.route("/ws", bp=bp)
def websocket(ws: Any) -> None:
    keepalive = current_app.config["TASKAPP"].event_keepalive_seconds
    with _subscribe() as subscription:
        while not subscription.closed and ws.connected:
            event = subscription.get(timeout=keepalive)
            if event is not None:
                ws.send(json.dumps(event))
