"""The broker's ring of recent events: what a resuming stream is sent, and when it is reset."""

from __future__ import annotations

import json
import time

import pytest

from taskapp.events import RESUME_WAIT_SECONDS, Broker, Event, Subscription, TooManyStreams


def event(event_id: int, task_id: int = 1, pad: str = "") -> Event:
    text = (
        f'{{"id" : {event_id}, "type" : "task.updated", "task_id" : {task_id},'
        f' "status" : "pending", "instance_id" : "i", "at" : "now"{pad}}}'
    )
    parsed = Event.from_payload(text)
    assert parsed is not None and parsed.id == event_id
    return parsed


def drain(subscription: Subscription, timeout: float = 0.05) -> list[dict]:
    seen = []
    while (got := subscription.get(timeout)) is not None:
        seen.append(json.loads(got.text))
    return seen


def ids(events: list[dict]) -> list[int]:
    return [e["id"] for e in events]


def test_a_resume_gets_what_came_after_its_id_then_the_live_events():
    broker = Broker(max_streams=5)
    for n in range(1, 6):
        broker.publish(event(n))
    with broker.subscribe(last_event_id=3) as subscription:
        broker.publish(event(6))
        assert ids(drain(subscription)) == [4, 5, 6]


def test_ids_arriving_out_of_order_resume_by_arrival_not_by_number():
    # A transaction that took id 11 first may commit after the one that took 12: every
    # instance hears 10, 12, 11, 13, and a client that saw 12 has not seen 11.
    broker = Broker(max_streams=5)
    for n in (10, 12, 11, 13):
        broker.publish(event(n))
    with broker.subscribe(last_event_id=12) as subscription:
        assert ids(drain(subscription)) == [11, 13]


def test_a_filtered_resume_gets_only_its_task():
    broker = Broker(max_streams=5)
    for n in range(1, 7):
        broker.publish(event(n, task_id=n % 2))
    with broker.subscribe(task_id=1, last_event_id=2) as subscription:
        assert ids(drain(subscription)) == [3, 5]


def test_an_id_older_than_the_ring_gets_a_reset_positioned_at_the_newest_event():
    broker = Broker(max_streams=5, replay_events=3)
    for n in range(1, 8):
        broker.publish(event(n))
    assert broker.replayable == 3
    with broker.subscribe(last_event_id=4) as subscription:  # evicted: 5, 6, 7 are kept
        (reset,) = drain(subscription)
        assert reset["type"] == "stream.reset" and reset["id"] == 7
        broker.publish(event(8))
        assert ids(drain(subscription)) == [8]
    with broker.subscribe(last_event_id=6) as subscription:  # the oldest kept: 6, 7, 8
        assert ids(drain(subscription)) == [7, 8]


def test_the_ring_is_bounded_in_bytes_too():
    broker = Broker(max_streams=5, replay_bytes=10_000)
    for n in range(1, 11):
        broker.publish(event(n, pad=f', "output" : "{"x" * 3000}"'))
    assert broker.replayable == 3
    with broker.subscribe(last_event_id=8) as subscription:  # 8, 9 and 10 are kept
        assert ids(drain(subscription)) == [9, 10]


def test_an_id_not_heard_yet_waits_for_it_and_skips_what_came_before():
    # The client comes from an instance whose listener was a little ahead of this one's.
    broker = Broker(max_streams=5)
    broker.publish(event(1))
    with broker.subscribe(last_event_id=3) as subscription:
        broker.publish(event(2))
        broker.publish(event(3))
        broker.publish(event(4))
        assert ids(drain(subscription)) == [4]


def test_an_id_that_never_comes_gets_a_reset_after_the_wait():
    broker = Broker(max_streams=5)
    broker.publish(event(1))
    with broker.subscribe(last_event_id=99) as subscription:
        broker.publish(event(2))
        started = time.monotonic()
        first = subscription.get(timeout=5)
        waited = time.monotonic() - started
        assert first is not None
        reset = json.loads(first.text)
        assert reset["type"] == "stream.reset" and reset["id"] == 2
        assert RESUME_WAIT_SECONDS - 0.2 < waited < RESUME_WAIT_SECONDS + 1
        broker.publish(event(3))
        assert ids(drain(subscription)) == [3]


def test_a_reconnected_listener_resets_open_streams_and_forgets_the_ring():
    broker = Broker(max_streams=5)
    broker.publish(event(1))
    broker.publish(event(2))
    with broker.subscribe() as subscription:
        broker.lost_events()
        (reset,) = drain(subscription)
        assert reset["type"] == "stream.reset" and "id" not in reset
    with broker.subscribe(last_event_id=2) as subscription:
        (reset,) = drain(subscription)
        assert reset["type"] == "stream.reset"


def test_a_client_that_falls_behind_is_cut_off_and_can_resume():
    broker = Broker(max_streams=5, queue_size=3)
    with broker.subscribe() as slow:
        for n in range(1, 6):
            broker.publish(event(n))
        assert slow.cut_off and slow.closed
        got = drain(slow)
    assert ids(got) == [1, 2, 3]
    with broker.subscribe(last_event_id=got[-1]["id"]) as resumed:
        assert ids(drain(resumed)) == [4, 5]


def test_streams_are_bounded():
    broker = Broker(max_streams=1)
    with broker.subscribe(), pytest.raises(TooManyStreams):
        broker.subscribe(last_event_id=1)
    broker.subscribe().release()


def test_events_not_made_by_the_function_are_parsed_and_rewritten_on_one_line():
    parsed = Event.from_payload('{\n "type": "task.updated",\n "task_id": 4}')
    assert parsed is not None and parsed.id is None and "\n" not in parsed.text
    assert parsed.type == "task.updated" and parsed.task_id == 4
    assert Event.from_payload("not json") is None
    assert Event.from_payload("[1]") is None
