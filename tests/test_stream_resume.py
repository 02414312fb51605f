"""Event streams as the clients people reach for see them, on real gunicorn instances.

httpx-sse reads /events the way a browser's EventSource does (every event it dispatches is
`message`, what an `onmessage` handler gets; a reconnect sends `Last-Event-ID`); the PyPI
`websockets` client opens /ws. tests.support.EventLog hears every event straight from
PostgreSQL, in the order every instance hears them: the reference for "nothing lost".
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from typing import Any

import httpx
import pytest
import requests
from httpx_sse import ServerSentEvent, connect_sse
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from taskapp.events import REPLAY_EVENTS
from tests.support import EventLog, create_task, get_task, healthy, wait_for

EOF = None


class Stream:
    """One /events connection, read by httpx-sse on a thread; kill() cuts it at the socket."""

    def __init__(self, url: str, last_event_id: str | None = None, read: bool = True) -> None:
        headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
        self._client = httpx.Client(timeout=httpx.Timeout(10, read=60))
        self._context = connect_sse(self._client, "GET", url, headers=headers)
        self.source = self._context.__enter__()
        response = self.source.response
        assert response.status_code == 200, response.read()
        self.retry: int | None = None
        self.messages: queue.Queue[ServerSentEvent | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        if read:
            self._thread.start()

    def start_reading(self) -> None:
        self._thread.start()

    def _read(self) -> None:
        try:
            for sse in self.source.iter_sse():
                if sse.retry is not None:
                    self.retry = sse.retry
                if sse.data:  # an EventSource dispatches nothing for a block without data
                    self.messages.put(sse)
        except (httpx.HTTPError, OSError):
            pass  # killed: the stream ends here
        finally:
            self.messages.put(EOF)

    def next(self, timeout: float = 15) -> ServerSentEvent | None:
        return self.messages.get(timeout=timeout)

    def read_until(self, done: Any, timeout: float = 30) -> list[ServerSentEvent]:
        got: list[ServerSentEvent] = []
        deadline = time.monotonic() + timeout
        while not got or not done(json.loads(got[-1].data)):
            message = self.next(max(0.1, deadline - time.monotonic()))
            assert message is not None, "the stream ended early"
            got.append(message)
        return got

    def kill(self) -> list[ServerSentEvent]:
        """Cut the connection as a network would (no goodbye), and return what had arrived."""
        stream = self.source.response.extensions["network_stream"]
        sock: socket.socket = stream.get_extra_info("socket")
        sock.shutdown(socket.SHUT_RDWR)
        return self.rest()

    def rest(self) -> list[ServerSentEvent]:
        """What arrives until the stream ends."""
        got = []
        while (message := self.next()) is not EOF:
            got.append(message)
        self.close()
        return got

    def close(self) -> None:
        self._context.__exit__(None, None, None)
        self._client.close()


def _data(messages: list[ServerSentEvent]) -> list[dict[str, Any]]:
    return [json.loads(m.data) for m in messages]


def _completed(task_id: int) -> Any:
    return lambda e: e["type"] == "task.completed" and e["task_id"] == task_id


def _streams_open(instance: Any, count: int) -> None:
    wait_for(lambda: instance.status()["event_streams"]["open"] == count, what=f"{count} streams")


def test_every_event_has_an_id_a_retry_and_reaches_onmessage(instances):
    a = instances()
    stream = Stream(f"{a.url}/events")
    try:
        _streams_open(a, 1)
        task = create_task(a.url, "seen by onmessage")
        got = stream.read_until(_completed(task["id"]))
    finally:
        stream.close()
    assert stream.retry == 1000
    assert {m.event for m in got} == {"message"}  # unnamed: what `onmessage` gets
    for message, event in zip(got, _data(got), strict=True):
        assert message.id == str(event["id"])
    ids = [e["id"] for e in _data(got)]
    assert len(set(ids)) == len(ids)
    types = [e["type"] for e in _data(got) if e["task_id"] == task["id"]]
    assert types[0] == "task.created" and "task.claimed" in types


def test_named_events_are_there_for_those_who_ask(instances):
    a = instances()
    stream = Stream(f"{a.url}/events?named=true")
    try:
        _streams_open(a, 1)
        task = create_task(a.url, "named")
        got = stream.read_until(_completed(task["id"]))
    finally:
        stream.close()
    assert [m.event for m in got] == [e["type"] for e in _data(got)]


def test_an_sse_client_resumes_after_forced_disconnects_on_either_instance(instances, database_url):
    """Cut twice while work goes on: back on the same instance, then on the other one (as
    a load balancer may send it); every event comes exactly once, in the database's order."""
    a, b = healthy(instances(wait=False, WORKER_ENABLED=0), instances(wait=False))
    with EventLog(database_url) as log:
        first = Stream(f"{a.url}/events")
        _streams_open(a, 1)
        before = create_task(b.url, "before the cut")
        received = first.read_until(_completed(before["id"]))
        received += first.kill()

        away = [create_task(b.url, f"while away {n}") for n in range(3)]
        wait_for(lambda: all(get_task(b.url, t["id"])["status"] == "completed" for t in away))
        again = Stream(f"{a.url}/events", last_event_id=received[-1].id)
        received += again.read_until(_completed(away[-1]["id"]))
        received += again.kill()

        elsewhere = [create_task(b.url, f"while away again {n}") for n in range(3)]
        wait_for(lambda: all(get_task(b.url, t["id"])["status"] == "completed" for t in elsewhere))
        other = Stream(f"{b.url}/events", last_event_id=received[-1].id)
        received += other.read_until(_completed(elsewhere[-1]["id"]))
        other.close()
        wait_for(lambda: log.events("task.completed", elsewhere[-1]["id"]))
        reference = [e["id"] for e in log.events()]

    got = [e["id"] for e in _data(received)]
    assert "stream.reset" not in {e["type"] for e in _data(received)}
    start = reference.index(got[0])
    assert got == reference[start : start + len(got)]
    completed = {e["task_id"] for e in _data(received) if e["type"] == "task.completed"}
    assert completed == {t["id"] for t in [before, *away, *elsewhere]}


def test_a_last_event_id_outside_the_window_gets_a_reset(instances, db_conn, database_url):
    a = instances(WORKER_ENABLED=0)
    watching = Stream(f"{a.url}/events")  # while someone watches, events are kept
    _streams_open(a, 1)
    with EventLog(database_url) as log:
        # One event more than the ring keeps, made by taskapp_publish() itself.
        db_conn.execute(
            "SELECT taskapp_publish('task.updated', i, 'pending', 'test')"
            " FROM generate_series(1, %s) AS i",
            (REPLAY_EVENTS + 1,),
        )
        wait_for(lambda: len(log.events()) == REPLAY_EVENTS + 1, timeout=30)
        ids = [e["id"] for e in log.events()]
    newest = str(ids[-1])
    # The ring keeps the last REPLAY_EVENTS: from the second on. A resume from there gets
    # the rest (what the instance has yet to hear follows live, in order).
    oldest_kept = Stream(f"{a.url}/events", last_event_id=str(ids[1]))
    try:
        replayed = [oldest_kept.next() for _ in ids[2:]]
    finally:
        oldest_kept.close()
    assert [int(m.id) for m in replayed if m is not None] == ids[2:]

    too_late = Stream(f"{a.url}/events", last_event_id=str(ids[0]))
    try:
        reset = too_late.next()
        assert reset is not None and reset.id == newest
        assert json.loads(reset.data)["type"] == "stream.reset"
        task = create_task(a.url, "after the reset")
        (created,) = [
            e
            for e in _data(too_late.read_until(lambda e: e.get("task_id") == task["id"]))
            if e.get("task_id") == task["id"]
        ]
        assert created["type"] == "task.created"
    finally:
        too_late.close()
        watching.close()


def test_an_unknown_future_id_gets_a_reset_after_a_short_wait(instances):
    a = instances(WORKER_ENABLED=0)
    create_task(a.url, "something heard")
    started = time.monotonic()
    stream = Stream(f"{a.url}/events", last_event_id=str(2**62))
    try:
        reset = stream.next()
    finally:
        stream.close()
    assert reset is not None and json.loads(reset.data)["type"] == "stream.reset"
    assert time.monotonic() - started < 5


def test_a_client_cut_off_as_too_slow_resumes_without_a_loss(instances, db_conn, database_url):
    a = instances(WORKER_ENABLED=0)
    stalled = Stream(f"{a.url}/events", read=False)  # reads nothing for now
    _streams_open(a, 1)
    with EventLog(database_url) as log:
        # 1,500 chunks of live output of 4 KB: far more than its socket buffers and its queue
        # (1,000) hold, and all within the ring (8 MiB).
        for first in range(0, 1500, 300):
            db_conn.execute(
                "SELECT taskapp_publish('conversation.output', 1, 'processing', 'test', 1, NULL,"
                " jsonb_build_object('output', jsonb_build_object('seq', i,"
                " 'text', repeat('x', 4000))))"
                " FROM generate_series(%s::int, %s::int) AS i",
                (first, first + 299),
            )
        wait_for(lambda: len(log.events()) == 1500, timeout=30)
        sent = [e["id"] for e in log.events()]
    _streams_open(a, 0)  # cut off (or timed out): its thread and slot are free
    stalled.start_reading()
    received = stalled.rest()
    assert received and len(received) < 1500
    resumed = Stream(f"{a.url}/events", last_event_id=received[-1].id)
    try:
        received += resumed.read_until(lambda e: e["id"] == sent[-1])
    finally:
        resumed.close()
    assert [int(m.id) for m in received] == sent


def test_a_websocket_resumes_with_last_event_id_in_the_query(instances, database_url):
    a, b = healthy(instances(wait=False), instances(wait=False, WORKER_ENABLED=0))
    watching = Stream(f"{a.url}/events")  # on one instance: both keep events
    _streams_open(a, 1)
    with EventLog(database_url) as log:
        task = create_task(a.url, "for the websocket")
        wait_for(lambda: log.events("task.completed", task["id"]))
        ids = [e["id"] for e in log.events(task_id=task["id"])]
    watching.close()
    url = f"ws://127.0.0.1:{b.port}/ws?last_event_id={ids[0]}"
    with ws_connect(url, additional_headers={"X-Request-ID": "ws-resume-1"}) as ws:
        got = [json.loads(ws.recv(timeout=10)) for _ in ids[1:]]
        # Its 101 carries the request id like every other response.
        assert ws.response.headers["X-Request-ID"] == "ws-resume-1"
    assert [e["id"] for e in got if e["task_id"] == task["id"]] == ids[1:]


def _refused(url: str, **kwargs: Any) -> Any:
    with pytest.raises(InvalidStatus) as refused, ws_connect(url, open_timeout=10, **kwargs):
        pass
    return refused.value.response


def test_websockets_gets_http_errors_not_protocol_errors(instances):
    a = instances(WORKER_ENABLED=0, MAX_EVENT_STREAMS=1)
    base = f"ws://127.0.0.1:{a.port}/ws"
    for query, field in [
        ("task_id=abc", "task_id"),
        ("task_id=0", "task_id"),
        ("last_event_id=-1", "last_event_id"),
        ("colour=red", "colour"),
    ]:
        response = _refused(f"{base}?{query}")
        assert response.status_code == 422, (query, response.body)
        assert response.headers["Content-Type"] == "application/problem+json"
        assert field in json.loads(response.body)["errors"], response.body
    with ws_connect(base) as held:
        _streams_open(a, 1)
        response = _refused(base)
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
        assert json.loads(response.body)["status"] == 503
        # The refusals held nothing: the one stream is still served.
        create_task(a.url, "still served")
        assert json.loads(held.recv(timeout=10))["type"] == "task.created"
    _streams_open(a, 0)
    assert "Bad file descriptor" not in a.log()


def test_sse_refusals_are_problems_before_the_stream(instances):
    a = instances(WORKER_ENABLED=0, MAX_EVENT_STREAMS=1)
    bad = requests.get(f"{a.url}/events", headers={"Last-Event-ID": "abc"}, timeout=5)
    assert bad.status_code == 422 and "Last-Event-ID" in bad.json()["errors"]
    bad = requests.get(f"{a.url}/events?task_id=x", timeout=5)
    assert bad.status_code == 422 and "task_id" in bad.json()["errors"]
    held = Stream(f"{a.url}/events")
    try:
        _streams_open(a, 1)
        full = requests.get(f"{a.url}/events", timeout=5)
        assert full.status_code == 503 and full.headers["Retry-After"] == "5"
        assert full.headers["Content-Type"] == "application/problem+json"
    finally:
        held.close()


def test_a_websocket_client_that_answers_no_ping_is_let_go(instances):
    """A client frozen (its machine asleep, a debugger) keeps its TCP connection up, so only
    its silence tells: no pong for EVENT_SEND_TIMEOUT_SECONDS after a ping ends the stream."""
    a = instances(WORKER_ENABLED=0, EVENT_KEEPALIVE_SECONDS=0.5, EVENT_SEND_TIMEOUT_SECONDS=1)
    with ws_connect(f"ws://127.0.0.1:{a.port}/ws", ping_interval=None) as alive:
        frozen = socket.create_connection(("127.0.0.1", a.port))
        frozen.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        try:
            _streams_open(a, 2)
            started = time.monotonic()
            _streams_open(a, 1)  # the frozen one, which never answers
            assert time.monotonic() - started < 4
            # websockets answers pings by itself: still served.
            create_task(a.url, "to the live one")
            assert json.loads(alive.recv(timeout=10))["type"] == "task.created"
        finally:
            frozen.close()
    with pytest.raises(ConnectionClosed):
        alive.recv(timeout=1)
