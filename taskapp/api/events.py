"""Live events: Server-Sent Events at /events and a WebSocket at /ws.

A stream holds one request thread for as long as it is open, so it never waits on its client
without bound: a write waits at most EVENT_SEND_TIMEOUT_SECONDS for room in the socket's
buffer (a client that doesn't read is then disconnected), and every second (or keep-alive,
if sooner) the stream looks, without blocking, whether its client has gone or, on a
WebSocket, sent a frame (close, ping). One thread per stream and nothing beside it: no reader
thread, and a refused WebSocket is a plain HTTP answer before any upgrade.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, request
from marshmallow import ValidationError
from werkzeug.exceptions import ServiceUnavailable
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import ProtocolError

from .. import runtime
from ..errors import BadRequest
from ..events import Subscription, TooManyStreams
from .common import settings

bp = Blueprint("events", __name__)

# The longest a stream waits for its next event before it looks at its client's socket.
TICK_SECONDS = 1.0
# What one look reads at most from a WebSocket client, so a flood can't keep the thread.
READS_PER_LOOK = 16
# The kernel's send buffer for a stream's socket. Left to autotuning it grows to 4 MB
# (tcp_wmem), so a client that stops reading took 4 MB of kernel memory and a thousand
# events of 4 KB before its writes had to wait, and EVENT_SEND_TIMEOUT_SECONDS could start
# counting. Twice this (the kernel doubles it) is still over 1 MB/s to a reader 100 ms away.
STREAM_SEND_BUFFER_BYTES = 64 * 1024
# A write waiting for room looks this often whether its stream was closed (a SIGTERM).
WRITE_WAIT_SLICE_SECONDS = 0.25


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


def _ready(sock: socket.socket, events: int, timeout: float) -> bool:
    """Whether the socket is readable (POLLIN) or writable (POLLOUT) within timeout seconds;
    an error or hang-up counts as ready, so the next call on the socket finds it out."""
    poller = select.poll()  # not select(): descriptors may be above FD_SETSIZE
    poller.register(sock, events)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def _writable(sock: socket.socket, timeout: float, subscription: Subscription) -> bool:
    """Whether the socket has room for a write within timeout seconds; False at once when the
    stream is closed meanwhile (a SIGTERM), so a stalled client doesn't hold up the stop."""
    deadline = time.monotonic() + timeout
    while not subscription.closed:
        remaining = deadline - time.monotonic()
        if _ready(sock, select.POLLOUT, min(remaining, WRITE_WAIT_SLICE_SECONDS)):
            return True
        if remaining <= WRITE_WAIT_SLICE_SECONDS:
            return False
    return False


def _client_gone(sock: socket.socket) -> bool:
    """Whether an SSE client closed its end (it sends nothing once its request is in)."""
    if not _ready(sock, select.POLLIN, 0):
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _stream_socket(sock: socket.socket, send_timeout: float) -> None:
    """Ready a stream's socket: writes wait at most send_timeout, in a buffer of bounded size."""
    sock.settimeout(send_timeout)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER_BYTES)


def _hang_up(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(how)


@bp.get("/events")
def server_sent_events() -> Response:
    subscription = _subscribe()
    config = settings()
    keepalive, send_timeout = config.event_keepalive_seconds, config.event_send_timeout_seconds
    sock: socket.socket | None = request.environ.get("gunicorn.socket")

    def stream() -> Iterator[str]:
        with subscription:
            if sock is not None:
                # gunicorn writes what we yield; this bounds each of its sendall() calls.
                _stream_socket(sock, send_timeout)
            yield ": connected\n\n"
            written = time.monotonic()
            healthy = True
            while not subscription.closed:
                event = subscription.get(timeout=min(TICK_SECONDS, keepalive))
                if sock is not None and _client_gone(sock):
                    healthy = False
                    break
                if event is not None:
                    chunk = f"event: {event.data['type']}\ndata: {event.text}\n\n"
                elif time.monotonic() - written >= keepalive:
                    chunk = ": keep-alive\n\n"
                else:
                    continue
                if sock is not None and not _writable(sock, send_timeout, subscription):
                    healthy = False  # stalled: nothing it was sent is being read
                    break
                yield chunk
                written = time.monotonic()
            if sock is not None:
                if healthy and not subscription.cut_off and _ready(sock, select.POLLOUT, 0):
                    # The response's end can still go out. Reading is done: gunicorn's
                    # graceful close then needn't wait (2 s) for the client to close first.
                    _hang_up(sock, socket.SHUT_RD)
                else:
                    # Gone, stalled or cut off: gunicorn's last write fails at once.
                    _hang_up(sock, socket.SHUT_RDWR)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(stream(), mimetype="text/event-stream", headers=headers)


class _HandedOver(Response):
    """The response of a WebSocket request: the connection was the WebSocket's, and gunicorn
    must write nothing more on it. StopIteration out of the application makes gunicorn close
    the connection without a response (its gthread worker's "Closing connection")."""

    def __call__(self, environ: Any, start_response: Any) -> Any:
        raise StopIteration


def _handshake() -> WSConnection:
    """The client's opening handshake, read from the request's headers; a 400 if it is not
    one (the route matches only requests that ask for an upgrade)."""
    connection = WSConnection(ConnectionType.SERVER)
    lines = [b"GET / HTTP/1.1"]
    for key, value in request.environ.items():
        if key.startswith("HTTP_"):
            lines.append(f"{key[5:].replace('_', '-')}: {value}".encode("latin-1"))
    try:
        connection.receive_data(b"\r\n".join(lines) + b"\r\n\r\n")
        asked = any(isinstance(event, Request) for event in connection.events())
    except ProtocolError as exc:
        raise BadRequest(f"Not a valid WebSocket handshake: {exc}.") from None
    if not asked:
        raise BadRequest("Not a valid WebSocket handshake.")
    return connection


@bp.route("/ws", websocket=True)
def websocket() -> Response:
    connection = _handshake()
    sock: socket.socket | None = request.environ.get("gunicorn.socket")
    if sock is None:
        raise BadRequest("WebSockets are served only under gunicorn.")
    # Refusals (too many streams, a bad task_id) are answered here, before the upgrade.
    with _subscribe() as subscription:
        config = settings()
        _stream_socket(sock, config.event_send_timeout_seconds)
        try:
            _serve_websocket(sock, connection, subscription)
        except (OSError, ProtocolError):
            pass  # the client went away or broke the protocol: nothing more to say to it
        finally:
            _hang_up(sock, socket.SHUT_RDWR)
    return _HandedOver()


def _serve_websocket(
    sock: socket.socket, connection: WSConnection, subscription: Subscription
) -> None:
    config = settings()
    keepalive, send_timeout = config.event_keepalive_seconds, config.event_send_timeout_seconds
    sock.sendall(connection.send(AcceptConnection()))
    written = time.monotonic()
    while not subscription.closed:
        event = subscription.get(timeout=min(TICK_SECONDS, keepalive))
        if not _answer_client(sock, connection):
            return
        if event is not None:
            data = connection.send(TextMessage(data=event.text))
        elif time.monotonic() - written >= keepalive:
            data = connection.send(Ping())  # also finds a peer that vanished without a FIN
        else:
            continue
        if not _writable(sock, send_timeout, subscription):
            return  # stalled: hang up without a close frame it would not read
        sock.sendall(data)
        written = time.monotonic()
    # Cut off (fell behind) or the instance is stopping: say so, if the client can hear it.
    if _ready(sock, select.POLLOUT, 0):
        if subscription.cut_off:
            close = CloseConnection(CloseReason.TRY_AGAIN_LATER, "too slow: reconnect")
        else:
            close = CloseConnection(CloseReason.GOING_AWAY, "the instance is stopping")
        sock.sendall(connection.send(close))


def _answer_client(sock: socket.socket, connection: WSConnection) -> bool:
    """Read what the client sent, without blocking, and answer pings and a close; False when
    the stream is over (closed or gone). Its messages mean nothing here and are dropped."""
    for _ in range(READS_PER_LOOK):
        if not _ready(sock, select.POLLIN, 0):
            return True
        data = sock.recv(65536)
        if not data:
            return False
        connection.receive_data(data)
        for event in connection.events():
            if isinstance(event, CloseConnection):
                if _ready(sock, select.POLLOUT, 0):
                    sock.sendall(connection.send(event.response()))
                return False
            if isinstance(event, Ping):
                sock.sendall(connection.send(event.response()))
    return True
