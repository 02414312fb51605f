"""Live events: Server-Sent Events at /events and a WebSocket at /ws.

Every refusal (a bad parameter, no stream slot free) is decided before the stream starts or
the WebSocket is accepted, and is an ordinary problem+json answer. A client that says where
it stopped (SSE `Last-Event-ID`, or `?last_event_id=`) first gets what it missed, from this
instance's ring of recent events (taskapp.events.Broker), or a `stream.reset`.

A stream holds one request thread for as long as it is open, so it never waits on its client
without bound: a write waits at most EVENT_SEND_TIMEOUT_SECONDS for room in the socket's
buffer (a client that doesn't read is then disconnected), and every second (or keep-alive,
if sooner) the stream looks, without blocking, whether its client has gone or, on a
WebSocket, sent a frame (close, ping, pong). A peer that vanished without a word (its machine
or network gone) is found by TCP itself: keepalive probes and TCP_USER_TIMEOUT end the
connection after EVENT_SEND_TIMEOUT_SECONDS unanswered. One thread per stream and nothing
beside it: no reader thread.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, request
from marshmallow import RAISE, Schema, ValidationError, fields
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

from .. import logs, runtime
from ..auth import QUERY_KEY_PARAM
from ..errors import BadRequest
from ..events import EVENT_TYPES, RESET_TYPE, Event, Subscription, TooManyStreams
from ..schemas import BIGINT_MAX, QueryInteger
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
# TCP keepalive probes start after this long without traffic, one a second: the kernel's,
# costing the instance nothing; EVENT_SEND_TIMEOUT_SECONDS unanswered ends the connection.
KEEPALIVE_IDLE_SECONDS = 2


# What an EventSource waits before it reconnects (SSE `retry:`), in milliseconds: soon, so a
# client cut off or moved to another instance resumes well inside the replay window.
RETRY_MILLISECONDS = 1000
# What a client refused for want of a free stream slot is told to wait (Retry-After).
STREAMS_FULL_RETRY_AFTER_SECONDS = 5
# Named SSE events (`event: task.created`): only the types the service sends, so a foreign
# NOTIFY can't write an SSE field of its own.
_NAMED_TYPES = frozenset((*EVENT_TYPES, RESET_TYPE))


class StreamQuery(Schema):
    """The query of /events and /ws: unknown parameters are a 422 like everywhere else."""

    class Meta:
        unknown = RAISE

    task_id = QueryInteger(1, BIGINT_MAX)
    last_event_id = QueryInteger(0, BIGINT_MAX)
    named = fields.Boolean()
    # Read by auth.py before the route runs (browsers can't send headers on streams).
    api_key = fields.String(data_key=QUERY_KEY_PARAM)


_QUERY = StreamQuery()
_EVENT_ID = QueryInteger(0, BIGINT_MAX)


def _stream_request() -> tuple[dict[str, Any], int | None]:
    """The stream's parameters, and the id of the last event the client got, if it says:
    `Last-Event-ID` (what an EventSource sends when it reconnects) over `?last_event_id=`
    (which stays in the URL it first opened)."""
    query = _QUERY.load(request.args.to_dict())
    header = request.headers.get("Last-Event-ID", "").strip()
    if header:
        try:
            return query, _EVENT_ID.deserialize(header)
        except ValidationError as exc:
            raise ValidationError({"Last-Event-ID": exc.messages}) from None
    return query, query.get("last_event_id")


def _subscribe() -> tuple[Subscription, bool]:
    """This request's stream, and whether its events are named; every refusal is raised
    here, before anything of the stream is sent."""
    query, last_event_id = _stream_request()
    instance = runtime.current(current_app)
    if instance is None:
        raise ServiceUnavailable("This process runs no event listener.")
    try:
        subscription = instance.broker.subscribe(query.get("task_id"), last_event_id)
    except TooManyStreams:
        raise ServiceUnavailable(
            f"Too many event streams: this instance serves at most {instance.broker.max_streams}.",
            retry_after=STREAMS_FULL_RETRY_AFTER_SECONDS,
        ) from None
    # The listener is normally listening already; at start or while it reconnects the
    # stream goes on, and gets a stream.reset once events flow again.
    if not instance.listener.events_wanted():
        current_app.logger.warning("event stream opened while the event listener reconnects")
    return subscription, bool(query.get("named"))


def sse_frame(event: Event, named: bool) -> str:
    """One event as Server-Sent Events: its id, its type when named, its JSON as the data.
    Unnamed by default, so an EventSource's `onmessage` gets every event."""
    lines = f"id: {event.id}\n" if event.id is not None else ""
    if named and event.type in _NAMED_TYPES:
        lines += f"event: {event.type}\n"
    return f"{lines}data: {event.text}\n\n"


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
    """Ready a stream's socket: writes wait at most send_timeout, in a buffer of bounded size,
    and a peer that stops answering (gone without a FIN or RST) is dropped by TCP within
    about send_timeout, idle or not (TCP_USER_TIMEOUT bounds unacknowledged data and, with
    keepalive on, unanswered probes; Linux). Without that a dead client's keep-alives
    queue unacknowledged until TCP gives up, ~15 minutes, and hold a thread all that time."""
    sock.settimeout(send_timeout)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER_BYTES)
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_SECONDS)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(send_timeout * 1000))


def _hang_up(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(how)


@bp.get("/events")
def server_sent_events() -> Response:
    subscription, named = _subscribe()
    config = settings()
    keepalive, send_timeout = config.event_keepalive_seconds, config.event_send_timeout_seconds
    sock: socket.socket | None = request.environ.get("gunicorn.socket")

    def stream() -> Iterator[str]:
        with subscription:
            if sock is not None:
                # gunicorn writes what we yield; this bounds each of its sendall() calls.
                _stream_socket(sock, send_timeout)
            yield f": connected\nretry: {RETRY_MILLISECONDS}\n\n"
            written = time.monotonic()
            healthy = True
            while not subscription.closed:
                event = subscription.get(timeout=min(TICK_SECONDS, keepalive))
                if sock is not None and _client_gone(sock):
                    healthy = False
                    break
                if event is not None:
                    chunk = sse_frame(event, named)
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
    subscription, _ = _subscribe()
    with subscription:
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
    # The 101 is written here, not by Flask: it carries the request id itself.
    request_id = logs.request_id().encode("latin-1")
    sock.sendall(connection.send(AcceptConnection(extra_headers=[(b"X-Request-ID", request_id)])))
    written = time.monotonic()
    # When the ping not yet answered went out: a client that answers nothing (pong or any
    # frame) for EVENT_SEND_TIMEOUT_SECONDS after it is hung, and is hung up on.
    pinged_at: float | None = None
    while not subscription.closed:
        event = subscription.get(timeout=min(TICK_SECONDS, keepalive))
        heard = _answer_client(sock, connection)
        if heard is None:
            return
        if heard:
            pinged_at = None
        elif pinged_at is not None and time.monotonic() - pinged_at > send_timeout:
            return  # no answer to a ping: a frozen or vanished client
        if event is not None:
            data = connection.send(TextMessage(data=event.text))
        elif time.monotonic() - written >= keepalive:
            data = connection.send(Ping())
            if pinged_at is None:
                pinged_at = time.monotonic()
        else:
            continue
        if not _writable(sock, send_timeout, subscription):
            return  # stalled: hang up without a close frame it would not read
        sock.sendall(data)
        written = time.monotonic()
    # Cut off (fell behind) or the instance is stopping: say so, if the client can hear it.
    if _ready(sock, select.POLLOUT, 0):
        if subscription.cut_off:
            close = CloseConnection(
                CloseReason.TRY_AGAIN_LATER, "too slow: reconnect with ?last_event_id="
            )
        else:
            close = CloseConnection(CloseReason.GOING_AWAY, "the instance is stopping")
        sock.sendall(connection.send(close))


def _answer_client(sock: socket.socket, connection: WSConnection) -> bool | None:
    """Read what the client sent, without blocking, and answer pings and a close: whether it
    sent anything, or None when the stream is over (closed or gone). Its messages mean
    nothing here and are dropped."""
    heard = False
    for _ in range(READS_PER_LOOK):
        if not _ready(sock, select.POLLIN, 0):
            return heard
        data = sock.recv(65536)
        if not data:
            return None
        heard = True
        connection.receive_data(data)
        for event in connection.events():
            if isinstance(event, CloseConnection):
                if _ready(sock, select.POLLOUT, 0):
                    sock.sendall(connection.send(event.response()))
                return None
            if isinstance(event, Ping):
                sock.sendall(connection.send(event.response()))
    return heard
