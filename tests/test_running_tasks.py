"""Running tasks on real gunicorn instances: cancel across instances, timeouts, deferrals,
progress and live output, observed from inside the processor (tests/processors/running.py).

The processors record what they see (wall-clock times, attempts, the cancellation flag and
its reason) as JSON lines in a directory the test passes as TEST_RUNNING_DIR, and wait for the
test's go-ahead files where an event stream must be open first. The database, the API and the
event streams say what the service recorded; nothing is mocked.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from tests.processors.running import records
from tests.support import (
    EventLog,
    Instance,
    conversation_statuses,
    create_task,
    get_task,
    healthy,
    task_errors,
    task_row,
    wait_for,
)

StartInstance = Callable[..., Instance]

PROCESSOR = "tests.processors.running:by_title"


@pytest.fixture
def record_dir(tmp_path: Path) -> Path:
    return tmp_path


def start(instances: StartInstance, record_dir: Path, **env: object) -> Instance:
    """An instance running the test processors, recording into record_dir."""
    return instances(TASK_PROCESSOR=PROCESSOR, TEST_RUNNING_DIR=record_dir, **env)


def start_together(instances: StartInstance, *envs: dict[str, object]) -> list[Instance]:
    """Boot instances in parallel (each boot takes about a second)."""
    return list(healthy(*(instances(wait=False, **env) for env in envs)))


def wait_record(record_dir: Path, task_id: int, kind: str, timeout: float = 10.0) -> dict[str, Any]:
    """The first record of `kind` the processor wrote for the task (waits for it)."""
    return wait_for(
        lambda: records(record_dir, task_id, kind),
        timeout=timeout,
        what=f"task {task_id}'s processor to record {kind!r}",
    )[0]


def wait_status(db_conn: psycopg.Connection, task_id: int, status: str, timeout: float = 10.0):
    return wait_for(
        lambda: (r := task_row(db_conn, task_id)).get("status") == status and r,
        timeout=timeout,
        what=f"task {task_id} {status}",
    )


def go(record_dir: Path, task_id: int, name: str = "go") -> None:
    (record_dir / f"{name}-{task_id}").touch()


def params(**values: object) -> str:
    """A task description the test processors read their parameters from."""
    return json.dumps(values)


class EventStream:
    """GET /events on one instance, read on a background thread."""

    def __init__(self, url: str) -> None:
        self.response = requests.get(url, stream=True, timeout=30)
        assert self.response.status_code == 200, self.response.text
        assert self.response.headers["Content-Type"].startswith("text/event-stream")
        self.opened = threading.Event()
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, name="test-sse", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self.response.iter_lines(decode_unicode=True):
                if line.startswith(": connected"):
                    self.opened.set()
                elif line.startswith("data: "):
                    with self._lock:
                        self._events.append(json.loads(line[len("data: ") :]))
        except Exception:  # closed under the reader: that ends it
            return

    def events(self, event_type: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self._events if event_type is None or e["type"] == event_type]

    def wait_opened(self) -> None:
        wait_for(self.opened.is_set, timeout=10, what="the event stream to open")

    def close(self) -> None:
        self.response.close()


@pytest.fixture
def open_stream() -> Iterator[Callable[[str], EventStream]]:
    streams: list[EventStream] = []

    def open_(url: str) -> EventStream:
        stream = EventStream(url)
        streams.append(stream)
        stream.wait_opened()
        return stream

    yield open_
    for stream in streams:
        stream.close()


# -- intervals: how many tasks ran at once ------------------------------------------------------


def running_at_once(
    intervals: list[tuple[float, float]], since: float, until: float
) -> tuple[int, float]:
    """Within [since, until]: the most intervals open at one moment, and for how many seconds
    that many (at least 2) were open."""
    edges = []
    for begin, end in intervals:
        begin, end = max(begin, since), min(end, until)
        if begin < end:
            edges += [(begin, 1), (end, -1)]
    edges.sort(key=lambda edge: (edge[0], edge[1]))  # an end before a start at the same time
    most, open_, seconds_two, last = 0, 0, 0.0, since
    for at, change in edges:
        if open_ >= 2:
            seconds_two += at - last
        open_ += change
        most = max(most, open_)
        last = at
    return most, seconds_two


# -- 1. cancel across instances ---------------------------------------------------------------


def test_a_cancel_on_another_instance_stops_the_processor_at_once(
    instances, record_dir, db_conn, database_url
):
    a, b = start_together(
        instances,
        {"TASK_PROCESSOR": PROCESSOR, "TEST_RUNNING_DIR": record_dir},
        {"WORKER_ENABLED": 0},
    )
    a_id, b_id = a.status()["instance_id"], b.status()["instance_id"]
    with EventLog(database_url) as events:
        task = create_task(b.url, "wait_for_cancel", conversations=2)
        wait_record(record_dir, task["id"], "started")
        assert task_row(db_conn, task["id"])["processing_instance_id"] == a_id

        asked = time.time()
        response = requests.post(f"{b.url}/tasks/{task['id']}/cancel", timeout=5)
        answered = time.time()
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "cancelled"

        flag = wait_record(record_dir, task["id"], "flag", timeout=5)
        seen_after = flag["at"] - answered
        print(f"\ncancel on B: flag seen on A {seen_after * 1000:.0f} ms after the response")
        # Told through taskapp_cancel: the lease renewal (every 5 s here) would say "lease lost".
        assert flag["cancelled"] is True
        assert flag["reason"] == "cancelled"
        assert flag["at"] >= asked
        assert seen_after < 1.0, seen_after
        returning = wait_record(record_dir, task["id"], "returning", timeout=5)
        wait_for(
            lambda: f"task {task['id']} stopped (cancelled); nothing recorded" in a.log(),
            timeout=5,
            what="instance A dropping the cancelled attempt's return",
        )
        # The slot is free again: A runs the next task.
        after = create_task(b.url, "quick after the cancel", description=params(sleep=0))
        wait_status(db_conn, after["id"], "completed")
        completions = events.events("task.completed", task["id"])
        cancellations = events.events("task.cancelled", task["id"])

    # Every write after the cancel is fenced off.
    assert returning["writes"] == {
        "checkpoint": "LeaseLost",
        "progress": "LeaseLost",
        "emit": "LeaseLost",
    }
    row = task_row(db_conn, task["id"])
    assert row["status"] == "cancelled"
    assert row["result"] is None
    assert row["processed_at"] is None
    assert row["lease_token"] is None
    assert row["progress"] is None
    assert conversation_statuses(db_conn, task["id"]) == ["active", "active"]
    shown = get_task(a.url, task["id"])
    assert shown["status"] == "cancelled"
    assert shown["result"] is None
    assert [c["status"] for c in shown["conversations"]] == ["active", "active"]
    assert completions == []
    assert [e["instance_id"] for e in cancellations] == [b_id]
    assert a.status()["worker"]["current_tasks"] == []
    assert "Traceback" not in a.log()


# -- 2. timeouts --------------------------------------------------------------------------------


def test_a_processor_that_ignores_its_timeout_is_failed_and_its_slot_replaced(
    instances, record_dir, db_conn
):
    instance = start(instances, record_dir, WORKER_CONCURRENCY=2, TIMEOUT_GRACE_SECONDS=1)
    stuck_seconds = 8.0
    stuck = create_task(
        instance.url,
        "ignore_timeout",
        timeout_seconds=2,
        max_attempts=1,
        description=params(sleep=stuck_seconds),
    )
    assert stuck["timeout_seconds"] == 2
    began = wait_record(record_dir, stuck["id"], "started")["at"]

    # Keep a few quick tasks pending all along, so both slots always have work.
    quick_ids: list[int] = []
    stop_feeding = threading.Event()

    def feed() -> None:
        with requests.Session() as session:
            while not stop_feeding.is_set():
                pending = sum(
                    1 for task_id in list(quick_ids) if not records(record_dir, task_id, "started")
                )
                for _ in range(4 - pending):
                    response = session.post(
                        f"{instance.url}/tasks/",
                        json={"title": "quick", "description": params(sleep=0.5)},
                        timeout=10,
                    )
                    quick_ids.append(response.json()["id"])
                stop_feeding.wait(0.05)

    feeder = threading.Thread(target=feed, name="test-feeder", daemon=True)
    feeder.start()
    try:
        failed = wait_status(db_conn, stuck["id"], "failed", timeout=6)
        (entry,) = task_errors(db_conn, stuck["id"])
        returned = wait_record(record_dir, stuck["id"], "returned", timeout=stuck_seconds + 2)
        # Quick tasks go on running after the stuck processor has returned.
        wait_for(
            lambda: any(
                r["at"] > returned["at"] + 2.5
                for task_id in list(quick_ids)
                for r in records(record_dir, task_id, "ended")
            ),
            timeout=10,
            what="quick tasks ending 2.5 s after the stuck processor returned",
        )
    finally:
        stop_feeding.set()
        feeder.join(10)
    for task_id in quick_ids:
        wait_status(db_conn, task_id, "completed", timeout=10)

    failed_at = entry["at"].timestamp()
    print(
        f"\nstuck task failed {failed_at - began:.2f}s after its claim; "
        f"{len(quick_ids)} quick tasks ran"
    )
    assert 2.8 < failed_at - began < 4.0, failed_at - began
    assert entry["attempt"] == 1
    assert entry["error"] == (
        "TaskTimeout: attempt 1 ran past its timeout of 2s; its processor did not stop "
        "within 1s of being told, and its thread was abandoned"
    )
    assert failed["last_error"] == entry["error"]
    assert failed["attempts"] == 1
    # It was told (the flag was set, for the timeout) but went on sleeping.
    assert returned["cancelled"] is True
    assert returned["reason"] == "timeout"
    assert returned["at"] - began >= stuck_seconds - 0.1

    quick_runs = []
    for task_id in quick_ids:
        (started,) = records(record_dir, task_id, "started")
        (ended,) = records(record_dir, task_id, "ended")  # each ran once
        quick_runs.append((started["at"], ended["at"]))
    end = max(e for _, e in quick_runs)
    # While the stuck attempt held its slot, one quick task at a time; once it was failed, two
    # (a new thread took the slot), both while the abandoned processor still slept and after
    # it returned; never more than WORKER_CONCURRENCY slots at once.
    held_most, _ = running_at_once(quick_runs, began + 0.1, began + 2.9)
    during_most, during_two = running_at_once(quick_runs, failed_at, returned["at"])
    after_most, after_two = running_at_once(quick_runs, returned["at"], end)
    # The stuck attempt's slot is given up at its timeout plus the grace (the watchdog starts
    # the new thread first, then writes the failure): until then it counts as a slot in use.
    released = began + 2 + 1 - 0.05
    slots_most, _ = running_at_once([*quick_runs, (began, released)], began, end)
    print(
        f"two quick tasks at once: {during_two:.1f}s of {returned['at'] - failed_at:.1f}s "
        f"while abandoned, {after_two:.1f}s of {end - returned['at']:.1f}s after it returned"
    )
    assert held_most == 1
    assert during_most == 2
    assert during_two >= 2.0, during_two
    assert after_most == 2
    assert after_two >= 1.0, after_two
    assert slots_most == 2

    # The late return changed nothing: still failed, no result, conversations not processed.
    wait_for(
        lambda: f"task {stuck['id']}: its processor returned" in instance.log(),
        timeout=5,
        what="the late return logged",
    )
    row = task_row(db_conn, stuck["id"])
    assert (row["status"], row["result"], row["attempts"]) == ("failed", None, 1)
    assert len(task_errors(db_conn, stuck["id"])) == 1
    assert conversation_statuses(db_conn, stuck["id"]) == ["active"]
    assert "Traceback" not in instance.log()


def test_a_processor_that_stops_on_its_timeout_fails_the_attempt_promptly(
    instances, record_dir, db_conn
):
    # A long grace: a failure within it can only be the processor's own stop, not the watchdog.
    instance = start(instances, record_dir, WORKER_CONCURRENCY=2, TIMEOUT_GRACE_SECONDS=5)
    tasks = [
        create_task(instance.url, title, timeout_seconds=1, max_attempts=1)
        for title in ("stop_on_timeout", "raise_on_timeout")
    ]
    for task in tasks:
        began = wait_record(record_dir, task["id"], "started")["at"]
        flag = wait_record(record_dir, task["id"], "flag", timeout=5)
        failed = wait_status(db_conn, task["id"], "failed", timeout=3)
        (entry,) = task_errors(db_conn, task["id"])
        failed_at = entry["at"].timestamp()
        print(
            f"\n{task['title']}: flag {flag['at'] - began:.2f}s after the start, failed "
            f"{(failed_at - flag['at']) * 1000:.0f} ms after the flag"
        )
        assert flag["reason"] == "timeout"
        assert 0.9 <= flag["at"] - began < 1.5, flag["at"] - began
        assert failed_at - flag["at"] < 0.5, failed_at - flag["at"]
        assert entry["error"] == (
            "TaskTimeout: attempt 1 ran past its timeout of 1s; its processor stopped when told"
        )
        assert failed["last_error"] == entry["error"]
        assert failed["result"] is None
        assert conversation_statuses(db_conn, task["id"]) == ["active"]
    assert "abandoned" not in instance.log()
    assert "Traceback" not in instance.log()


# -- 3. deferrals -------------------------------------------------------------------------------


def test_a_deferred_task_runs_again_later_without_spending_an_attempt(
    instances, record_dir, db_conn, database_url
):
    instance = start(instances, record_dir)
    with EventLog(database_url) as events:
        task = create_task(
            instance.url, "defer_once", max_attempts=1, description=params(seconds=3)
        )
        deferred = wait_record(record_dir, task["id"], "defer")
        waiting = wait_for(
            lambda: (r := task_row(db_conn, task["id"]))["deferrals"] == 1 and r,
            timeout=5,
            what="the deferral recorded",
        )
        done = wait_status(db_conn, task["id"], "completed", timeout=10)
        deferrals = events.events("task.deferred", task["id"])
        retries = events.events("task.retrying", task["id"])

    first, second = records(record_dir, task["id"], "run")
    later = second["at"] - deferred["at"]
    print(f"\nrun again {later:.2f}s after deferring for 3 s")
    assert 2.5 <= later <= 3.5, later
    # The deferral did not count as an attempt: both runs are attempt 1.
    assert first["attempts"] == second["attempts"] == 1
    assert waiting["status"] == "pending"
    assert waiting["attempts"] == 0
    assert done["attempts"] == 1
    assert done["deferrals"] == 1
    assert done["result"] == {"runs": 2}
    (entry,) = task_errors(db_conn, task["id"])
    assert entry["error"].startswith("Deferred:")
    assert entry["error"] == "Deferred: rate limited (runs again in 3s)"
    assert entry["attempt"] == 1
    shown = get_task(instance.url, task["id"])
    assert shown["deferrals"] == 1
    assert [e["error"] for e in shown["errors"]] == [entry["error"]]
    assert len(deferrals) == 1
    assert deferrals[0]["status"] == "pending"
    assert retries == []


def test_deferrals_past_max_deferrals_fail_the_attempt(instances, record_dir, db_conn):
    instance = start(instances, record_dir, MAX_DEFERRALS=2)
    task = create_task(instance.url, "always_defer", max_attempts=1)
    failed = wait_status(db_conn, task["id"], "failed", timeout=10)

    runs = records(record_dir, task["id"], "run")
    assert [r["attempts"] for r in runs] == [1, 1, 1]
    assert failed["attempts"] == 1
    assert failed["deferrals"] == 2
    assert failed["result"] is None
    history = [e["error"] for e in task_errors(db_conn, task["id"])]
    exhausted = (
        "DeferralsExhausted: deferred 2 times already (MAX_DEFERRALS), so this deferral fails "
        "the attempt: always"
    )
    assert history == [
        "Deferred: always (runs again in 0s)",
        "Deferred: always (runs again in 0s)",
        exhausted,
    ]
    assert failed["last_error"] == exhausted
    assert get_task(instance.url, task["id"])["status"] == "failed"


# -- 4. progress --------------------------------------------------------------------------------


def test_progress_is_shown_on_the_task_and_sent_as_events(
    instances, record_dir, db_conn, open_stream
):
    instance = start(instances, record_dir)
    instance_id = instance.status()["instance_id"]
    task = create_task(instance.url, "report_progress", conversations=4)
    stream = open_stream(f"{instance.url}/events?task_id={task['id']}")
    go(record_dir, task["id"])
    wait_record(record_dir, task["id"], "reported")

    running = get_task(instance.url, task["id"])
    assert running["status"] == "processing"
    last = {"done": 4, "total": 4, "message": "conversation 4 of 4"}
    assert {k: running["progress"][k] for k in last} == last
    assert datetime.fromisoformat(running["progress"]["at"]).tzinfo is not None
    listed = requests.get(f"{instance.url}/tasks/", timeout=5).json()
    assert [t["progress"] for t in listed if t["id"] == task["id"]] == [running["progress"]]

    go(record_dir, task["id"], "release")
    wait_status(db_conn, task["id"], "completed")
    wait_for(lambda: stream.events("task.completed"), what="task.completed on the stream")
    done = get_task(instance.url, task["id"])
    assert done["progress"] == running["progress"]
    assert done["result"] == {"done": 4}

    reports = stream.events("task.progress")
    assert [
        (e["progress"]["done"], e["progress"]["total"], e["progress"]["message"]) for e in reports
    ] == [(n, 4, f"conversation {n} of 4") for n in range(1, 5)]
    assert {(e["task_id"], e["status"], e["instance_id"]) for e in reports} == {
        (task["id"], "processing", instance_id)
    }
    assert reports[-1]["progress"] == running["progress"]


# -- 5. live output across instances ------------------------------------------------------------


def test_live_output_reaches_a_stream_on_another_instance_in_order(
    instances, record_dir, db_conn, open_stream
):
    a, b = start_together(
        instances,
        {"TASK_PROCESSOR": PROCESSOR, "TEST_RUNNING_DIR": record_dir},
        {"WORKER_ENABLED": 0},
    )
    a_id = a.status()["instance_id"]
    task = create_task(a.url, "emit_chunks", conversations=2, description=params(chunks=200))
    first, second = (c["id"] for c in task["conversations"])
    stream = open_stream(f"{b.url}/events?task_id={task['id']}")
    go(record_dir, task["id"])
    wait_for(lambda: stream.events("task.completed"), timeout=20, what="task.completed on B")

    seen = stream.events()
    outputs = [e for e in seen if e["type"] == "conversation.output"]
    of_first = [e for e in outputs if e["conversation_id"] == first]
    assert [(e["output"]["seq"], e["output"]["text"]) for e in of_first] == [
        (i, f"{i} ") for i in range(200)
    ]
    # The long text: numbered on from 0 for its own conversation, split into 1,000 characters.
    of_second = [e for e in outputs if e["conversation_id"] == second]
    text = "".join(chr(ord("a") + n % 26) for n in range(2500))
    assert [e["output"]["seq"] for e in of_second] == [0, 1, 2]
    assert [len(e["output"]["text"]) for e in of_second] == [1000, 1000, 500]
    assert "".join(e["output"]["text"] for e in of_second) == text
    assert len(outputs) == 203
    assert {(e["task_id"], e["status"], e["instance_id"]) for e in outputs} == {
        (task["id"], "processing", a_id)
    }
    # All of it before the completion, which comes last.
    types = [e["type"] for e in seen]
    assert types.index("task.completed") > max(
        i for i, t in enumerate(types) if t == "conversation.output"
    )
    # Not stored: the task and its conversations carry none of it.
    shown = get_task(a.url, task["id"])
    assert "0 1 2" not in json.dumps(shown)
