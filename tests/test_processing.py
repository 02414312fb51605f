"""End to end: real gunicorn instances share one database and process every task once."""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pytest
from psycopg import sql

from tests.support import Instance, create_task, get_task, healthy, wait_for


def test_two_instances_process_forty_tasks_exactly_once(instances, db_conn):
    first, second = healthy(instances(wait=False), instances(wait=False))
    ids = [
        create_task((first, second)[n % 2].url, f"task {n}", conversations=2)["id"]
        for n in range(40)
    ]

    def all_completed() -> bool:
        (done,) = db_conn.execute(
            "SELECT count(*) FROM tasks WHERE status = 'completed'"
        ).fetchone()
        return done == 40

    wait_for(all_completed, timeout=30, what="40 completed tasks")
    rows = db_conn.execute(
        "SELECT id, attempts, processing_instance_id, processed_at FROM tasks ORDER BY id"
    ).fetchall()
    assert [r[0] for r in rows] == ids
    assert all(attempts == 1 for _, attempts, _, _ in rows), rows
    assert all(processed_at is not None for *_, processed_at in rows)
    workers = {instance for _, _, instance, _ in rows}
    assert workers == {first.status()["instance_id"], second.status()["instance_id"]}
    (active,) = db_conn.execute(
        "SELECT count(*) FROM conversations WHERE status <> 'processed'"
    ).fetchone()
    assert active == 0
    (conversations,) = db_conn.execute("SELECT count(*) FROM conversations").fetchone()
    assert conversations == 80


def test_status_shows_the_worker_and_the_cluster(instances):
    first, second = healthy(
        instances(wait=False), instances(wait=False, WORKER_ENABLED=0, DB_POOL_SIZE=3)
    )
    task = create_task(first.url, "counted")
    wait_for(lambda: get_task(first.url, task["id"])["status"] == "completed", timeout=10)
    status = wait_for(lambda: (s := first.status())["worker"]["processed"] == 1 and s)
    assert status["worker"]["running"] is True
    assert status["queue"]["completed"] == 1
    assert status["worker"]["started_at"]
    other = second.status()
    assert other["worker"]["running"] is False
    assert other["instance_id"] != status["instance_id"]
    connections = other["database_connections"]
    assert connections["max"] == 3  # DB_POOL_SIZE: never more
    assert 1 <= connections["idle"] <= 3  # /status itself just used one

    def both_listed() -> bool:
        listed = {i["instance_id"] for i in first.status()["instances"]}
        return {status["instance_id"], other["instance_id"]} <= listed

    wait_for(both_listed, timeout=10, what="both instances in /status")


def test_a_new_task_is_picked_up_at_once_not_at_the_next_poll(instances, db_conn):
    instance = instances(POLL_INTERVAL_SECONDS=30)
    time.sleep(0.5)  # let the worker go idle, so only a NOTIFY can wake it in time
    started = time.monotonic()
    task = create_task(instance.url, "instant")
    wait_for(
        lambda: get_task(instance.url, task["id"])["status"] == "completed",
        timeout=5,
        interval=0.01,
    )
    assert time.monotonic() - started < 1.0


def test_higher_priority_runs_first(instances):
    instance = instances(WORKER_ENABLED=0)
    low = [create_task(instance.url, f"low {n}", priority=0)["id"] for n in range(3)]
    high = create_task(instance.url, "high", priority=10)["id"]
    worker = instances()
    wait_for(
        lambda: all(get_task(worker.url, i)["status"] == "completed" for i in [*low, high]),
        timeout=10,
    )
    finished = sorted([*low, high], key=lambda i: get_task(worker.url, i)["processed_at"])
    assert finished[0] == high


def test_a_scheduled_task_waits_for_its_time(instances):
    instance = instances(POLL_INTERVAL_SECONDS=5)
    due = time.time() + 3
    scheduled_for = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(due)) + "+00:00"
    task = create_task(instance.url, "later", scheduled_for=scheduled_for)
    time.sleep(max(0.0, due - 1.5 - time.time()))
    assert get_task(instance.url, task["id"])["status"] == "pending"
    wait_for(
        lambda: get_task(instance.url, task["id"])["status"] == "completed",
        timeout=6,
        interval=0.05,
    )
    assert time.time() - due < 1.5


def test_instances_starting_together_on_an_empty_database_all_come_up(server_url):
    name = f"taskapp_start_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = f"{server_url.rpartition('/')[0]}/{name}"
    group = [Instance(url) for _ in range(4)]
    try:
        barrier = threading.Barrier(4)

        def start(instance: Instance) -> None:
            barrier.wait()
            instance.start(wait=False)

        threads = [threading.Thread(target=start, args=(i,)) for i in group]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for instance in group:
            instance.wait_healthy(timeout=60)
        ids = {create_task(i.url, "after start", conversations=0)["id"] for i in group}
        assert len(ids) == 4
    finally:
        for instance in group:
            instance.stop()
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.mark.parametrize("workers", [2])
def test_several_gunicorn_workers_are_several_instances(instances, workers):
    instance = instances(WEB_CONCURRENCY=workers)

    def distinct_ids() -> set[str]:
        return {instance.status()["instance_id"] for _ in range(30)}

    wait_for(lambda: len(distinct_ids()) == workers, timeout=15, what="both workers answering")


def test_an_app_preloaded_before_fork_serves_and_processes(instances):
    # With --preload the master builds the app (its Database and pool) and the worker inherits
    # it: post_fork gives the worker a fresh pool of its own.
    instance = instances(GUNICORN_CMD_ARGS="--preload")
    task = create_task(instance.url, "preloaded", conversations=2)
    done = wait_for(
        lambda: (t := get_task(instance.url, task["id"]))["status"] == "completed" and t,
        timeout=15,
    )
    assert [c["status"] for c in done["conversations"]] == ["processed", "processed"]
