"""Pickup latency: POST /tasks/ returning → the task `processing`, on an idle queue.

    python -m bench.pickup [--quick] [--tasks 200]

One instance with POLL_INTERVAL_SECONDS=5 (so a poll can't hide a missed wake-up) and the
instant processor. Tasks are sent one at a time: POST, wait for its `task.claimed` event on
channel `taskapp_events` (a dedicated LISTEN connection timestamps each notification as it
arrives), wait for `task.completed`, pause 50-150 ms so the worker is idle again, repeat.
The baseline is the same measurement against bench/raw_loop.py in LISTEN mode (1 process,
5 s poll, sending taskapp's events) with tasks inserted by SQL + NOTIFY: the floor set by
PostgreSQL's NOTIFY round trip on this machine. Targets: p50 < 50 ms, p99 < 250 ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import queue
import random
import threading
import time
from collections.abc import Callable

from bench import raw_loop
from bench.common import (
    BenchError,
    Server,
    bench_database,
    connect,
    insert_tasks,
    listen_to_events,
    log,
    machine_line,
    main,
    parser,
    percentile,
    print_table,
    taskapp_server,
    verdict,
)

POLL_SECONDS = 5
TARGET_P50_MS, TARGET_P99_MS = 50.0, 250.0
EVENT_TIMEOUT = 2 * POLL_SECONDS + 5  # a missed wake-up still shows up, as a poll-sized latency


class EventListener:
    """LISTEN taskapp_events in a thread; every event is queued with its arrival time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.events: queue.Queue[tuple[float, dict[str, object]]] = queue.Queue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-listener", daemon=True)

    def _run(self) -> None:
        with connect(self.url) as conn:
            listen_to_events(conn)
            self._ready.set()
            while not self._stop.is_set():
                for notify in conn.notifies(timeout=0.2):
                    self.events.put((time.perf_counter(), json.loads(notify.payload)))

    def __enter__(self) -> EventListener:
        self._thread.start()
        if not self._ready.wait(10):
            raise BenchError("could not LISTEN on taskapp_events")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def wait(self, event_type: str, task_id: int) -> float:
        """Arrival time of the next `event_type` event for task_id (others are skipped)."""
        deadline = time.perf_counter() + EVENT_TIMEOUT
        while True:
            try:
                arrived, event = self.events.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                message = f"no {event_type} for task {task_id} in {EVENT_TIMEOUT}s"
                raise BenchError(message) from None
            if event.get("type") == event_type and event.get("task_id") == task_id:
                return arrived


def measure(
    listener: EventListener, create: Callable[[], tuple[int, float]], tasks: int
) -> list[float]:
    """Latencies in ms from create() returning to the task.claimed event, one task at a time."""
    latencies = []
    for _ in range(tasks):
        task_id, returned = create()
        claimed = listener.wait("task.claimed", task_id)
        latencies.append(max(0.0, claimed - returned) * 1000)
        listener.wait("task.completed", task_id)
        time.sleep(random.uniform(0.05, 0.15))
    return latencies


def post_creator(server: Server) -> Callable[[], tuple[int, float]]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    body = json.dumps(
        {"title": "pickup probe", "conversations": [{"content": "a"}, {"content": "b"}]}
    )

    def create() -> tuple[int, float]:
        conn.request("POST", "/tasks/", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        returned = time.perf_counter()
        if response.status != 201:
            raise BenchError(f"POST /tasks/ answered {response.status}: {payload[:300]!r}")
        return int(json.loads(payload)["id"]), returned

    return create


def sql_creator(url: str) -> Callable[[], tuple[int, float]]:
    def create() -> tuple[int, float]:
        ids = insert_tasks(url, 1, wake=True, analyze=False)
        return ids.first, ids.committed_at

    return create


def summary(name: str, latencies: list[float]) -> list[object]:
    return [
        name,
        len(latencies),
        percentile(latencies, 50),
        percentile(latencies, 99),
        max(latencies),
    ]


def run(args: argparse.Namespace) -> int:
    tasks = 30 if args.quick else args.tasks
    stamp = machine_line()
    with bench_database("pickup") as url, EventListener(url) as listener:
        with raw_loop.serving(url, 1, poll_seconds=POLL_SECONDS):
            baseline = measure(listener, sql_creator(url), tasks)
        log(f"raw LISTEN loop: p50 {percentile(baseline, 50):.1f} ms")
        with taskapp_server(url, POLL_INTERVAL_SECONDS=POLL_SECONDS) as app:
            app.start()
            measured = measure(listener, post_creator(app), tasks)
        log(f"taskapp: p50 {percentile(measured, 50):.1f} ms")
    p50, p99 = percentile(measured, 50), percentile(measured, 99)
    rows = [
        [*summary("raw LISTEN loop (INSERT + NOTIFY -> claimed)", baseline), "", ""],
        [
            *summary("taskapp (POST returned -> claimed)", measured),
            verdict(p50, TARGET_P50_MS, at_least=False, strict=True),
            verdict(p99, TARGET_P99_MS, at_least=False, strict=True),
        ],
    ]
    print_table(
        f"Pickup latency, poll interval {POLL_SECONDS} s, {tasks} tasks one at a time — {stamp}",
        ["run", "tasks", "p50 ms", "p99 ms", "max ms", "p50 target (ms)", "p99 target (ms)"],
        rows,
    )
    print(
        f"taskapp vs. raw: p50 {p50 / max(percentile(baseline, 50), 1e-3):.1f}x, "
        f"p99 {p99 / max(percentile(baseline, 99), 1e-3):.1f}x\n"
    )
    return 0


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0], default_timeout=600)
    p.add_argument("--tasks", type=int, default=200)
    main(run, p.parse_args())
