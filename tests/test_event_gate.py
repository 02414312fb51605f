"""Events only while someone watches (migration 0011): nothing is built or sent for nobody,
wake-ups always are, and an instance with a stream opens the gate for the whole cluster."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest

from taskapp import queue
from taskapp.events import EVENTS_CHANNEL, LINGER_SECONDS, WAKEUP_CHANNEL
from tests.support import wait_for
from tests.test_events import SseClient
from tests.test_worker import add_task

SENTINEL = "test-sentinel"


@pytest.fixture(autouse=True)
def nobody_watches(db_conn: psycopg.Connection) -> None:
    """The gate as a fresh database has it, whatever an earlier test's stream opened. (Only
    here: an instance of a module's own, still listening, would not know it was closed.)"""
    db_conn.execute("UPDATE event_watch SET watched_until = '-infinity'")


@pytest.fixture
def heard(database_url: str) -> Iterator[psycopg.Connection]:
    """Listens to events and wake-ups, without saying it watches."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"LISTEN {EVENTS_CHANNEL}")
        conn.execute(f"LISTEN {WAKEUP_CHANNEL}")
        yield conn


def _sent(heard: psycopg.Connection, db_conn: psycopg.Connection) -> list[tuple[str, str]]:
    """(channel, event type or '') of everything sent before a sentinel sent now."""
    db_conn.execute("SELECT pg_notify(%s, %s)", (EVENTS_CHANNEL, SENTINEL))
    sent = []
    for notify in heard.notifies(timeout=10):
        if notify.payload == SENTINEL:
            return sent
        kind = json.loads(notify.payload)["type"] if notify.channel == EVENTS_CHANNEL else ""
        sent.append((notify.channel, kind))
    raise AssertionError(f"the sentinel never came; heard {sent}")


def _claim_add_and_complete(gateway, db_conn) -> None:
    """Claim a task, add a conversation its attempt never saw, complete it: the task goes
    back to pending, which must wake the workers."""
    add_task(db_conn, conversations=1)
    (claimed,) = queue.claim(gateway, instance_id="i-1", limit=1, lease_seconds=30)
    db_conn.execute(
        "INSERT INTO conversations (task_id, content) VALUES (%s, 'late')", (claimed.task.id,)
    )
    outcome = queue.complete(gateway, claimed, instance_id="i-1")
    assert (outcome.applied, outcome.status) == (True, "pending")


def test_nobody_watching_gets_no_events_but_the_workers_are_still_woken(gateway, db_conn, heard):
    assert db_conn.execute("SELECT taskapp_events_watched()").fetchone() == (False,)
    _claim_add_and_complete(gateway, db_conn)
    db_conn.execute("SELECT taskapp_publish('task.updated', 1, 'pending', 'i-1')")
    assert _sent(heard, db_conn) == [(WAKEUP_CHANNEL, "")]


def test_once_someone_watches_every_change_is_an_event_again(gateway, db_conn, heard):
    until = db_conn.execute("SELECT taskapp_watch_events(60) - now()").fetchone()[0]
    assert 59 <= until.total_seconds() <= 60
    _claim_add_and_complete(gateway, db_conn)
    sent = _sent(heard, db_conn)
    assert (EVENTS_CHANNEL, "task.claimed") in sent
    assert (EVENTS_CHANNEL, "task.updated") in sent  # back to pending
    assert (WAKEUP_CHANNEL, "") in sent
    # Saying it again never shortens the time: the longest wins.
    db_conn.execute("SELECT taskapp_watch_events(1)")
    left = db_conn.execute("SELECT watched_until - now() FROM event_watch").fetchone()[0]
    assert left.total_seconds() > 50


def test_an_open_stream_opens_the_gate_for_the_cluster(instances, db_conn):
    streaming = instances(WORKER_ENABLED=0)
    assert db_conn.execute("SELECT taskapp_events_watched()").fetchone() == (False,)
    client = SseClient(f"{streaming.url}/events")
    try:
        # The stream's first bytes come only once its instance listens, and so after the gate
        # opened: it is open by then, for about LINGER_SECONDS.
        wait_for(lambda: client.comments, what="the stream to open")
        left = db_conn.execute("SELECT watched_until - now() FROM event_watch").fetchone()[0]
        assert LINGER_SECONDS - 15 <= left.total_seconds() <= LINGER_SECONDS
    finally:
        client.close()
