"""Live events: a change made on one instance reaches stream clients of another."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator

import pytest
import requests
import websocket

from tests.support import create_task, healthy, wait_for


class SseClient:
    """Reads an SSE stream on a background thread into a queue of parsed events."""

    def __init__(self, url: str, **headers: str) -> None:
        self.events: queue.Queue[dict] = queue.Queue()
        self.comments: list[str] = []
        self.response = requests.get(url, stream=True, timeout=30, headers=headers)
        assert self.response.status_code == 200, self.response.text
        assert self.response.headers["Content-Type"].startswith("text/event-stream")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self.response.iter_lines(decode_unicode=True):
                if line.startswith("data: "):
                    self.events.put(json.loads(line[len("data: ") :]))
                elif line.startswith(":"):
                    self.comments.append(line)
        except Exception:  # the stream was closed under the reader: that ends it
            return

    def wait_for_event(self, timeout: float = 10, **match: object) -> dict:
        deadline = timeout
        while True:
            event = self.events.get(timeout=deadline)
            if all(event.get(k) == v for k, v in match.items()):
                return event

    def close(self) -> None:
        self.response.close()


@pytest.fixture
def two_instances(instances):
    """A serves streams only; B does the work, so every event about it crosses instances."""
    return healthy(instances(wait=False, WORKER_ENABLED=0), instances(wait=False))


@pytest.fixture
def sse(two_instances) -> Iterator[SseClient]:
    a, _ = two_instances
    client = SseClient(f"{a.url}/events")
    wait_for(lambda: client.comments, what="the stream to open")
    yield client
    client.close()


def test_sse_client_of_one_instance_sees_work_done_on_another(two_instances, sse):
    _, b = two_instances
    task = create_task(b.url, "crosses instances")
    created = sse.wait_for_event(type="task.created", task_id=task["id"])
    b_id = b.status()["instance_id"]
    assert created["status"] == "pending"
    assert created["at"]
    claimed = sse.wait_for_event(type="task.claimed", task_id=task["id"])
    assert claimed["instance_id"] == b_id
    completed = sse.wait_for_event(type="task.completed", task_id=task["id"])
    assert completed["instance_id"] == b_id
    assert completed["status"] == "completed"


def test_sse_can_follow_one_task(two_instances):
    a, b = two_instances
    followed = create_task(b.url, "followed")
    client = SseClient(f"{a.url}/events?task_id={followed['id']}")
    try:
        wait_for(lambda: client.comments, what="the stream to open")
        other = create_task(b.url, "other")
        requests.put(f"{b.url}/tasks/{followed['id']}", json={"priority": 3}, timeout=5)
        event = client.wait_for_event(type="task.updated")
        assert event["task_id"] == followed["id"]
        wait_for(
            lambda: (
                requests.get(f"{b.url}/tasks/{other['id']}", timeout=5).json()["status"]
                == "completed"
            )
        )
        seen = []
        while not client.events.empty():
            seen.append(client.events.get())
        assert all(e["task_id"] == followed["id"] for e in seen), seen
    finally:
        client.close()


def test_websocket_gets_the_same_events(two_instances):
    a, b = two_instances
    ws = websocket.create_connection(f"ws://127.0.0.1:{a.port}/ws", timeout=10)
    try:
        # The subscription starts when the handshake completes; prove it with an event.
        wait_for(lambda: a.status()["event_streams"]["open"] == 1, what="the socket to subscribe")
        task = create_task(b.url, "over a websocket")
        seen = []
        while not any(e["type"] == "task.completed" and e["task_id"] == task["id"] for e in seen):
            seen.append(json.loads(ws.recv()))
        types = [e["type"] for e in seen if e["task_id"] == task["id"]]
        assert types[0] == "task.created"
        assert "task.claimed" in types
    finally:
        ws.close()


def test_open_streams_are_bounded_and_reported(instances):
    a = instances(WORKER_ENABLED=0, MAX_EVENT_STREAMS=2)
    clients = [SseClient(f"{a.url}/events") for _ in range(2)]
    try:
        wait_for(lambda: a.status()["event_streams"] == {"open": 2, "max": 2})
        refused = requests.get(f"{a.url}/events", timeout=5)
        assert refused.status_code == 503
        assert refused.headers["Content-Type"].startswith("application/problem+json")
    finally:
        for client in clients:
            client.close()
    wait_for(lambda: a.status()["event_streams"]["open"] == 0, what="closed streams released")


def test_a_stalled_client_does_not_hold_up_the_others(instances, db_conn):
    a = instances(WORKER_ENABLED=0)
    stalled = requests.get(f"{a.url}/events", stream=True, timeout=30)  # never read
    live = SseClient(f"{a.url}/events")
    try:
        wait_for(lambda: a.status()["event_streams"]["open"] == 2)
        # 20 MB of events: more than the stalled client's socket buffers and its queue hold.
        # Sent in paced batches so that the live client, which keeps up, never lags far.
        batch, batches = 200, 25
        for n in range(batches):
            first = n * batch + 1
            db_conn.execute(
                "SELECT pg_notify('taskapp_events', json_build_object("
                "'type', 'task.updated', 'task_id', i, 'status', 'pending',"
                " 'instance_id', 'x', 'at', now(), 'pad', repeat('x', 4000))::text)"
                " FROM generate_series(%s::int, %s::int) AS i",
                (first, first + batch - 1),
            )
            live.wait_for_event(timeout=20, task_id=first + batch - 1)
        wait_for(
            lambda: a.status()["event_streams"]["open"] == 1,
            what="the stalled client to be cut off",
        )
        # The live client is still served.
        db_conn.execute(
            "SELECT pg_notify('taskapp_events', json_build_object('type', 'task.updated',"
            " 'task_id', 0, 'status', 'pending', 'instance_id', 'x', 'at', now())::text)"
        )
        assert live.wait_for_event(timeout=10, task_id=0)["type"] == "task.updated"
    finally:
        stalled.close()
        live.close()
