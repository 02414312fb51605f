"""An instance never holds more database connections than the README's formula of its
settings, DB_POOL_SIZE + 1 (the pool and the listener), however busy it is; /metrics shows
how much of the pool and of the event streams it uses."""

from __future__ import annotations

import contextlib
import threading
import time

import psycopg
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Load, wait_for

POOL_SIZE = 4
WORK_THREADS = 8
REQUEST_THREADS = 16
SAMPLE_SECONDS = 6.0


def instance_connections(db_conn: psycopg.Connection, pool_name: str) -> int:
    """Connections of this test database opened by the instance: its pool, named after its
    instance id, and the listener (no other instance runs during this test)."""
    return db_conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name IN (%s, 'taskapp-listener')",
        (pool_name,),
    ).fetchone()[0]


def gauges(url: str) -> dict[tuple[str, str], float]:
    """The instance's gauges from /metrics: {(name, state label or ""): value}."""
    text = requests.get(url + "/metrics", timeout=5).text
    return {
        (sample.name, sample.labels.get("state", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_busy_instance_stays_within_its_connection_budget(instances, db_conn) -> None:
    instance = instances(
        DB_POOL_SIZE=POOL_SIZE,
        WORKER_CONCURRENCY=WORK_THREADS,
        GUNICORN_THREADS=REQUEST_THREADS,
        MAX_EVENT_STREAMS=4,
    )
    budget = POOL_SIZE + 1
    status = instance.status()
    assert status["database_connections"]["max"] == POOL_SIZE
    pool_name = f"taskapp:{status['instance_id'][:8]}"
    metrics = requests.get(instance.url + "/metrics", timeout=5).text
    assert f"taskapp_db_connections_max {float(budget)}" in metrics

    # A stream makes the listener LISTEN for events too; it is one connection all the same.
    stream = requests.get(instance.url + "/events", stream=True, timeout=10)
    assert stream.status_code == 200

    # A client that reads: one that doesn't is cut off as stalled (EVENT_SEND_TIMEOUT_SECONDS)
    # once the load's events fill its socket, and the stream would not stay open.
    def read() -> None:
        with contextlib.suppress(requests.RequestException, AttributeError, ValueError):
            for _ in stream.iter_content(chunk_size=None):
                pass  # until stream.close() below ends it

    threading.Thread(target=read, daemon=True).start()
    samples: list[int] = []
    scraped: list[dict[tuple[str, str], float]] = []
    stop = threading.Event()

    def sample() -> None:
        with psycopg.connect(db_conn.info.dsn, autocommit=True) as conn:
            while not stop.is_set():
                samples.append(instance_connections(conn, pool_name))
                time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        # More clients than request threads, every work thread busy with the tasks they make.
        with Load([instance.url], threads=REQUEST_THREADS * 2) as load:
            sampler.start()
            load.wait_more(300, timeout=60)
            deadline = time.monotonic() + SAMPLE_SECONDS
            while time.monotonic() < deadline:
                scraped.append(gauges(instance.url))
        assert not load.bad, load.bad[:3]
    finally:
        stop.set()
        sampler.join(5)
        stream.close()
    assert samples, "no samples"
    assert max(samples) <= budget, f"peak {max(samples)} > budget {budget}"
    # The load really pressed the pool: otherwise the bound above would prove nothing.
    assert max(samples) >= POOL_SIZE

    # What the pool and the streams looked like, as /metrics showed them under that load.
    in_use = [g[("taskapp_db_pool_connections", "in_use")] for g in scraped]
    in_pool = [
        in_use[n] + g[("taskapp_db_pool_connections", "idle")] for n, g in enumerate(scraped)
    ]
    print(
        f"\npeak {max(samples)} connections; /metrics: in use up to {max(in_use):g}, "
        f"waiting up to {max(g[('taskapp_db_pool_waiting', '')] for g in scraped):g}"
    )
    assert max(in_use) >= 1 and max(in_pool) <= POOL_SIZE
    assert {g[("taskapp_event_streams_open", "")] for g in scraped} == {1.0}
    assert {g[("taskapp_event_streams_max", "")] for g in scraped} == {4.0}
    wait_for(
        lambda: gauges(instance.url)[("taskapp_event_streams_open", "")] == 0,
        what="the closed stream gone from the gauge",
    )
