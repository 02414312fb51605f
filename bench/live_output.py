"""Live output across instances: a processor's emit() on A → the chunk read from B's /events.

    python -m bench.live_output [--quick] [--chunks 200] [--interval-ms 10]

Two instances on one database: A runs bench/processors.py:emit_timestamps, which emits the
chunks of one conversation, each carrying time.time() at its emit; B (WORKER_ENABLED=0, so it
processes nothing) serves the event stream. A client in this process reads B's `GET /events`
(Server-Sent Events, `data:` lines) and notes time.time() as each conversation.output line
arrives: both clocks are this machine's. Two rounds: paced (`--interval-ms` between chunks, a
model's tokens) and a burst (no pause). The baseline, in the same rounds, is a LISTEN connection
of this process on `taskapp_events`: the same notifications straight from PostgreSQL, the floor
B's stream adds its fan-out to. Printed: chunks received of those sent, whether in order (seq
0, 1, … and the text's own counter), and p50/p95/max latency from emit to receipt.
No target: a figure to watch across changes.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

from bench.common import (
    ROOT,
    BenchError,
    Server,
    bench_database,
    connect,
    http_json,
    listen_to_events,
    log,
    machine_line,
    main,
    parser,
    percentile,
    print_table,
    taskapp_server,
)

PROCESSOR = "bench.processors:emit_timestamps"
OUTPUT = "conversation.output"
ROUND_TIMEOUT = 60.0


@dataclass
class Received:
    """What one receiver got: (receipt time.time(), event) in arrival order."""

    events: queue.Queue[tuple[float, dict[str, object]]] = field(default_factory=queue.Queue)

    def put(self, at: float, event: dict[str, object]) -> None:
        self.events.put((at, event))


class SseClient:
    """`GET /events` on one instance, read line by line in a thread (http.client)."""

    def __init__(self, server: Server) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        self.received = Received()
        self._thread = threading.Thread(target=self._run, name="bench-sse", daemon=True)
        self._stopping = False

    def __enter__(self) -> SseClient:
        self.conn.request("GET", "/events", headers={"Accept": "text/event-stream"})
        self.response = self.conn.getresponse()
        if self.response.status != 200:
            raise BenchError(f"GET /events answered {self.response.status}")
        # The stream says it is connected once the instance listens for events.
        if not self.response.readline().startswith(b": connected"):
            raise BenchError("GET /events did not start with ': connected'")
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while True:
                line = self.response.readline()
                at = time.time()
                if not line:
                    return
                if line.startswith(b"data:"):
                    self.received.put(at, json.loads(line[5:]))
        except Exception as exc:  # the stream cut under the reader: expected when stopping
            if not self._stopping:
                log(f"B's event stream broke: {exc!r}")

    def __exit__(self, *exc: object) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            if self.conn.sock is not None:
                self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        self._thread.join(5)


class ListenClient:
    """LISTEN taskapp_events on a connection of this process: the events as PostgreSQL sends
    them, before any instance fans them out."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.received = Received()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-listen", daemon=True)

    def _run(self) -> None:
        with connect(self.url) as conn:
            listen_to_events(conn)
            self._ready.set()
            while not self._stop.is_set():
                for notify in conn.notifies(timeout=0.2):
                    self.received.put(time.time(), json.loads(notify.payload))

    def __enter__(self) -> ListenClient:
        self._thread.start()
        if not self._ready.wait(10):
            raise BenchError("could not LISTEN on taskapp_events")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass(frozen=True)
class Outcome:
    received: int
    in_order: bool
    latencies_ms: list[float]


def collect(received: Received, task_id: int, chunks: int, deadline: float) -> Outcome:
    """Read one task's output chunks until all arrived (or the task completed and a second
    passed, or the deadline); check their order; latency = receipt - the time in the text."""
    seqs: list[int] = []
    counters: list[int] = []
    latencies: list[float] = []
    completed_at: float | None = None
    while len(seqs) < chunks:
        now = time.monotonic()
        if now > deadline or (completed_at is not None and now > completed_at + 1.0):
            break
        try:
            at, event = received.events.get(timeout=0.1)
        except queue.Empty:
            continue
        if event.get("task_id") != task_id:
            continue
        if event.get("type") == "task.completed":
            completed_at = time.monotonic()
        if event.get("type") != OUTPUT:
            continue
        output = event["output"]
        assert isinstance(output, dict)
        counter, emitted = str(output["text"]).split()
        seqs.append(int(output["seq"]))
        counters.append(int(counter))
        latencies.append(max(0.0, at - float(emitted)) * 1000)
    in_order = seqs == list(range(len(seqs))) and counters == seqs
    return Outcome(len(seqs), in_order, latencies)


def wait_finished(a: Server, task_id: int, deadline: float) -> str:
    """The task's status once it is no longer pending or processing (or at the deadline)."""
    while True:
        status = str(http_json("GET", f"{a.url}/tasks/{task_id}")["status"])
        if status not in ("pending", "processing") or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def run_round(
    a: Server, sse: SseClient, listen: ListenClient, chunks: int, interval: float
) -> tuple[Outcome, Outcome]:
    body = {
        "title": "live output probe",
        "description": json.dumps({"chunks": chunks, "interval": interval}),
        "conversations": [{"content": "stream"}],
    }
    task = http_json("POST", f"{a.url}/tasks/", body)
    deadline = time.monotonic() + ROUND_TIMEOUT
    over_sse = collect(sse.received, task["id"], chunks, deadline)
    # The LISTEN connection got the same notifications meanwhile: all queued by now.
    over_listen = collect(listen.received, task["id"], chunks, time.monotonic() + 5)
    status = wait_finished(a, task["id"], deadline)
    if status != "completed":
        raise BenchError(f"the probe task ended {status}, not completed")
    return over_sse, over_listen


def row(name: str, sent: int, outcome: Outcome, baseline: Outcome | None) -> list[object]:
    p50 = percentile(outcome.latencies_ms, 50)
    ratio = (
        "" if baseline is None else f"{p50 / max(percentile(baseline.latencies_ms, 50), 1e-3):.1f}x"
    )
    return [
        name,
        f"{outcome.received}/{sent}",
        "yes" if outcome.in_order else "NO",
        p50,
        percentile(outcome.latencies_ms, 95),
        max(outcome.latencies_ms, default=float("nan")),
        ratio,
    ]


def run(args: argparse.Namespace) -> int:
    chunks = 50 if args.quick else args.chunks
    interval = args.interval_ms / 1000
    stamp = machine_line()
    rows: list[list[object]] = []
    failed = False
    with bench_database("live") as url:
        a = taskapp_server(url, "A", TASK_PROCESSOR=PROCESSOR, PYTHONPATH=str(ROOT))
        b = taskapp_server(url, "B", WORKER_ENABLED=0)
        with a, b:
            a.start()
            b.start()
            with ListenClient(url) as listen, SseClient(b) as sse:
                for name, pause in (
                    (f"paced, {args.interval_ms:g} ms apart", interval),
                    ("burst", 0.0),
                ):
                    over_sse, over_listen = run_round(a, sse, listen, chunks, pause)
                    log(
                        f"{name}: B's stream got {over_sse.received}/{chunks}, "
                        f"p50 {percentile(over_sse.latencies_ms, 50):.2f} ms"
                    )
                    rows.append(row(f"{name}: A emit -> B /events", chunks, over_sse, over_listen))
                    rows.append(
                        row(f"{name}: A emit -> LISTEN (baseline)", chunks, over_listen, None)
                    )
                    for outcome in (over_sse, over_listen):
                        failed |= outcome.received != chunks or not outcome.in_order
    print_table(
        f"Live output, {chunks} chunks of one conversation, A emits, B streams — {stamp}",
        ["run", "received", "in order", "p50 ms", "p95 ms", "max ms", "p50 vs. LISTEN"],
        rows,
    )
    if failed:
        log("FAILED: chunks were lost or out of order")
        return 1
    return 0


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0], default_timeout=300)
    p.add_argument("--chunks", type=int, default=200)
    p.add_argument("--interval-ms", type=float, default=10.0)
    main(run, p.parse_args())
