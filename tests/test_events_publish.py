"""taskapp_publish() (migration 0009): every event numbered, its id first, one time format."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest

from taskapp.events import Event, event_time
from tests.support import listen_to_events

# RFC 3339 in UTC with six fractional digits: the one format of an event's `at`.
AT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}\+00:00")


@pytest.fixture
def heard(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        listen_to_events(conn)
        yield conn


def _payloads(conn: psycopg.Connection, count: int) -> list[str]:
    payloads = []
    for notify in conn.notifies(timeout=5, stop_after=count):
        payloads.append(notify.payload)
    assert len(payloads) == count, payloads
    return payloads


def test_every_event_has_an_id_first_and_ids_increase(db_conn, heard):
    db_conn.execute("SELECT taskapp_publish('task.updated', 7, 'pending', 'i-1')")
    db_conn.execute(
        "SELECT taskapp_publish('conversation.updated', 7, 'pending', 'i-1', 3)"
        " FROM generate_series(1, 3)"
    )
    payloads = _payloads(heard, 4)
    ids = []
    for payload in payloads:
        assert payload.startswith('{"id" : '), payload
        data = json.loads(payload)
        assert next(iter(data)) == "id"
        ids.append(data["id"])
        # The listener reads the id without parsing, and gets the same number.
        event = Event.from_payload(payload)
        assert event is not None and event.id == data["id"] and event.text == payload
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert json.loads(payloads[1])["conversation_id"] == 3


def test_an_event_with_data_keeps_its_id_first_and_is_valid_json(db_conn, heard):
    db_conn.execute(
        "SELECT taskapp_publish('task.progress', 7, 'processing', 'i-1', NULL, NULL,"
        " jsonb_build_object('progress', jsonb_build_object('done', 1, 'total', 2)))"
    )
    (payload,) = _payloads(heard, 1)
    assert payload.startswith('{"id" : ')
    data = json.loads(payload)
    assert data["type"] == "task.progress" and data["progress"] == {"done": 1, "total": 2}
    assert Event.from_payload(payload).id == data["id"]  # type: ignore[union-attr]


def test_at_has_one_format_in_sql_and_in_python(db_conn, heard):
    db_conn.execute("SET TIME ZONE 'Pacific/Auckland'")  # the session's zone must not matter
    db_conn.execute("SELECT taskapp_publish('task.updated', 1, 'pending', 'i-1')")
    (payload,) = _payloads(heard, 1)
    assert AT.fullmatch(json.loads(payload)["at"]), payload
    # A whole second keeps its six zeros (the old format dropped them).
    whole = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert event_time(whole) == "2026-01-02T03:04:05.000000+00:00"
    assert AT.fullmatch(event_time())
    reset = json.loads(Event.reset("why", 5).text)
    assert AT.fullmatch(reset["at"]) and reset["id"] == 5 and reset["type"] == "stream.reset"
