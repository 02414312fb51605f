"""Prometheus metrics: counters kept per process (summed across gunicorn workers through
prometheus-client's multiprocess mode), queue gauges read from the database at scrape time."""

from __future__ import annotations

import bisect
import collections
import os
import time
from collections.abc import Iterator

from flask import Flask, Response, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .database import Database

TASKS_CLAIMED = Counter("taskapp_tasks_claimed", "Tasks claimed by a worker (attempts started)")
TASKS_COMPLETED = Counter("taskapp_tasks_completed", "Tasks completed")
TASKS_RETRIED = Counter("taskapp_tasks_retried", "Failed attempts sent back to pending")
TASKS_FAILED = Counter("taskapp_tasks_failed", "Tasks failed for good (out of attempts)")
TASKS_RESCUED = Counter("taskapp_tasks_rescued", "Tasks taken back after their lease ran out")
TASKS_PRUNED = Counter(
    "taskapp_tasks_pruned", "Finished tasks deleted past their retention", ["status"]
)
TASKS_DEFERRED = Counter("taskapp_tasks_deferred", "Attempts that deferred their task (Defer)")
TASKS_TIMED_OUT = Counter(
    "taskapp_tasks_timed_out", "Attempts failed at their timeout", ["abandoned"]
)
PROCESSING_SECONDS = Histogram(
    "taskapp_task_processing_seconds",
    "Time the processor spent on one attempt",
    ["outcome"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 7.5, 10, 30, 60, 300),
)
HTTP_REQUESTS = Counter(
    "taskapp_http_requests", "HTTP requests served", ["method", "endpoint", "status"]
)
HTTP_LATENCY = Histogram(
    "taskapp_http_request_duration_seconds",
    "Time to produce an HTTP response",
    ["method", "endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


def tasks_claimed(count: int) -> None:
    if count:
        TASKS_CLAIMED.inc(count)


def tasks_completed(durations: list[float]) -> None:
    TASKS_COMPLETED.inc(len(durations))
    observe_many(PROCESSING_SECONDS.labels("completed"), durations)


def observe_many(histogram: Histogram, amounts: list[float]) -> None:
    """histogram.observe() for each amount, with one write per bucket hit and one to the sum:
    a dispatcher round completes up to hundreds of tasks, and in multiprocess mode every
    write is a locked write to a file-backed map (~1.8 us). Relies on prometheus_client's
    Histogram keeping a value per bucket, non-cumulative, and one for the sum (pinned in
    requirements.txt; tests/test_metrics.py compares the result with observe(), so an upgrade
    that changes them fails there)."""
    counts = collections.Counter(
        bisect.bisect_left(histogram._upper_bounds, amount) for amount in amounts
    )
    histogram._sum.inc(sum(amounts))
    for index, count in counts.items():
        histogram._buckets[index].inc(count)


def task_failed(duration: float, *, final: bool) -> None:
    (TASKS_FAILED if final else TASKS_RETRIED).inc()
    PROCESSING_SECONDS.labels("failed").observe(duration)


def task_deferred() -> None:
    TASKS_DEFERRED.inc()


def task_timed_out(*, abandoned: bool) -> None:
    """abandoned: the processor did not stop within the grace, and its thread was given up."""
    TASKS_TIMED_OUT.labels("true" if abandoned else "false").inc()


def tasks_rescued(count: int) -> None:
    TASKS_RESCUED.inc(count)


def tasks_pruned(status: str, count: int) -> None:
    TASKS_PRUNED.labels(status=status).inc(count)


class QueueCollector(Collector):
    """Queue depth by status and the age of the oldest due task, read when scraped; and the
    scraped process's database connections and event streams.

    The queue gauges are the whole cluster's, the same from every instance: aggregate them
    over instances with max(), not sum(). The others are the scraped instance's own."""

    def __init__(self, database: Database, event_streams: tuple[int, int] | None = None) -> None:
        self.database = database
        # (open, most allowed): the scraped instance's event streams (None: it serves none).
        self.event_streams = event_streams

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from . import queue

        depth = GaugeMetricFamily(
            "taskapp_queue_tasks",
            "Tasks by status in the whole cluster (every instance says the same: use max())",
            labels=["status"],
        )
        for status, count in queue.queue_counts(self.database).items():
            depth.add_metric([status], count)
        yield depth
        yield from self._flow_gauges()
        yield GaugeMetricFamily(
            "taskapp_queue_oldest_pending_age_seconds",
            "Seconds the oldest due pending task of the cluster has waited (use max())",
            value=queue.oldest_pending_age(self.database),
        )
        pool = self.database.stats()
        connections = GaugeMetricFamily(
            "taskapp_db_pool_connections",
            "This instance's pooled database connections",
            labels=["state"],
        )
        connections.add_metric(["in_use"], pool["in_use"])
        connections.add_metric(["idle"], pool["idle"])
        yield connections
        yield GaugeMetricFamily(
            "taskapp_db_pool_waiting",
            "Statements of this instance waiting for a free pooled connection",
            value=pool["waiting"],
        )
        yield GaugeMetricFamily(
            "taskapp_db_connections_max",
            "The most connections this instance opens: DB_POOL_SIZE and the listener's one",
            value=self.database.max_connections,
        )
        open_streams, max_streams = self.event_streams or (0, 0)
        yield GaugeMetricFamily(
            "taskapp_event_streams_open",
            "This instance's open event streams (SSE and WebSocket)",
            value=open_streams,
        )
        yield GaugeMetricFamily(
            "taskapp_event_streams_max",
            "The most event streams this instance serves (MAX_EVENT_STREAMS)",
            value=max_streams,
        )

    def _flow_gauges(self) -> Iterator[GaugeMetricFamily]:
        """Per queue (the first FLOW_GAUGE_QUEUES by name: clients name queues, and no
        request may create a series without a bound): running tasks, throttled keys, and
        whether it is paused or throttled as a whole."""
        from . import flow

        families = {
            "running": GaugeMetricFamily(
                "taskapp_queue_running", "Tasks running, per queue", labels=["queue"]
            ),
            "throttled_keys": GaugeMetricFamily(
                "taskapp_queue_throttled_keys",
                "Concurrency keys that can start nothing now (out of rate or throttled)",
                labels=["queue"],
            ),
            "paused": GaugeMetricFamily(
                "taskapp_queue_paused", "1 while the queue is paused", labels=["queue"]
            ),
            "throttled": GaugeMetricFamily(
                "taskapp_queue_throttled",
                "1 while the queue as a whole can start nothing (out of rate or throttled)",
                labels=["queue"],
            ),
        }
        for row in flow.gauges(self.database, limit=FLOW_GAUGE_QUEUES):
            for name, family in families.items():
                family.add_metric([row.name], float(getattr(row, name)))
        yield from families.values()


def render(database: Database, event_streams: tuple[int, int] | None = None) -> Response:
    """The /metrics page: this cluster's queue, this instance's connections and streams, and
    every local process's counters."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        counters = generate_latest(registry)
    else:
        counters = generate_latest(REGISTRY)
    queue_registry = CollectorRegistry()
    queue_registry.register(QueueCollector(database, event_streams))
    return Response(generate_latest(queue_registry) + counters, content_type=CONTENT_TYPE_LATEST)


def init_app(app: Flask) -> None:
    app.before_request(_start_timer)
    app.after_request(_observe)


_STARTED = "taskapp.metrics.started"
# The labelled children, looked up once per (method, endpoint, status) rather than per request.
# The most queues the per-queue gauges report.
FLOW_GAUGE_QUEUES = 100

_request_counters: dict[tuple[str, str, int], Counter] = {}
_latency_histograms: dict[tuple[str, str], Histogram] = {}


def _start_timer() -> None:
    request.environ[_STARTED] = time.perf_counter()


# The label values a request can produce: anything else is "other", so no request, however
# odd its method or status, can add a series (each costs memory in every process and bytes in
# every scrape).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER = "other"


def _status_label(status: int) -> str:
    return str(status) if 100 <= status <= 599 else OTHER


def _observe(response: Response) -> Response:
    started: float | None = request.environ.get(_STARTED)
    # The URL rule, not the path, keeps the label set small (/tasks/<id>, not every id).
    rule = request.url_rule
    endpoint = rule.rule if rule is not None else "unmatched"
    method = request.method
    if method not in KNOWN_METHODS:
        method = OTHER
    status = response.status_code
    counter = _request_counters.get((method, endpoint, status))
    if counter is None:
        counter = HTTP_REQUESTS.labels(method, endpoint, _status_label(status))
        _request_counters[(method, endpoint, status)] = counter
    counter.inc()
    if started is not None:
        histogram = _latency_histograms.get((method, endpoint))
        if histogram is None:
            histogram = HTTP_LATENCY.labels(method, endpoint)
            _latency_histograms[(method, endpoint)] = histogram
        histogram.observe(time.perf_counter() - started)
    return response
