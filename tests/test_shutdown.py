"""SIGTERM on a real gunicorn instance: finish or hand back the running task, exit 0, fast.

gunicorn's graceful_timeout is SHUTDOWN_GRACE_SECONDS + 10 (gunicorn.conf.py): a worker still
alive then is SIGKILLed, and the master exits 0 all the same, so every test here also bounds
how long the stop took.
"""

from __future__ import annotations

import os
import signal
import time

import psycopg
import requests
import websocket

from tests.support import create_task, status_counts, task_row, wait_for
from tools.gunicorn_process import children


def wait_processing(db_conn: psycopg.Connection, task_id: int) -> dict:
    return wait_for(
        lambda: (r := task_row(db_conn, task_id))["status"] == "processing" and r,
        timeout=5,
        what=f"task {task_id} claimed",
    )


def insert_task(db_conn: psycopg.Connection, title: str) -> int:
    """A task written straight to the database (the stopping instance serves no requests)."""
    (task_id,) = db_conn.execute(
        "INSERT INTO tasks (title, max_attempts) VALUES (%s, 3) RETURNING id", (title,)
    ).fetchone()
    db_conn.execute("SELECT pg_notify('taskapp_wakeup', '')")
    return task_id


def test_sigterm_lets_a_task_within_the_grace_period_finish(instances, db_conn, tmp_path):
    started_file = tmp_path / "started"
    instance = instances(
        TASK_PROCESSOR="tests.processors:slow",
        TEST_PROCESSOR_SECONDS=2,
        TEST_PROCESSOR_RECORD=started_file,
        SHUTDOWN_GRACE_SECONDS=5,
    )
    task = create_task(instance.url, "finishes in time")
    wait_processing(db_conn, task["id"])
    # Running, not only claimed: a claim no work thread has started yet is handed back.
    wait_for(lambda: started_file.exists() and started_file.read_text(), what="the processor")

    started = time.monotonic()
    instance.signal_master(signal.SIGTERM)
    # Claiming stops at once: a task that arrives during the stop is left for others.
    later = insert_task(db_conn, "arrives during the stop")
    assert instance.wait_exit(timeout=5 + 10) == 0
    took = time.monotonic() - started
    print(f"\nSIGTERM, 2 s task, grace 5 s: exited in {took:.2f}s")

    done = task_row(db_conn, task["id"])
    assert done["status"] == "completed"
    assert done["attempts"] == 1
    assert took < 5, "it should exit when the task is done, not when the grace runs out"
    untouched = task_row(db_conn, later)
    assert (untouched["status"], untouched["attempts"]) == ("pending", 0)
    assert "worker stopped, 0 task(s) handed back" in instance.log()


def test_sigterm_hands_a_task_longer_than_the_grace_back_uncounted(instances, db_conn):
    grace = 1
    instance = instances(
        TASK_PROCESSOR="tests.processors:slow",
        TEST_PROCESSOR_SECONDS=60,
        SHUTDOWN_GRACE_SECONDS=grace,
    )
    task = create_task(instance.url, "too long", conversations=2)
    wait_processing(db_conn, task["id"])

    started = time.monotonic()
    instance.signal_master(signal.SIGTERM)
    assert instance.wait_exit(timeout=grace + 10) == 0
    took = time.monotonic() - started
    print(f"\nSIGTERM, 60 s task, grace {grace} s: handed back and exited in {took:.2f}s")

    back = task_row(db_conn, task["id"])
    assert back["status"] == "pending"
    assert back["attempts"] == 0, "a run cut short by a clean stop is not counted"
    assert back["processing_instance_id"] is None
    assert back["lease_token"] is None
    assert status_counts(db_conn).get("processing", 0) == 0
    assert took < grace + 3
    assert f"task {task['id']} handed back to the queue" in instance.log()

    # The next instance takes it as a first attempt.
    successor = instances()
    done = wait_for(
        lambda: (r := task_row(db_conn, task["id"]))["status"] == "completed" and r,
        timeout=5,
        what="the handed-back task completed elsewhere",
    )
    assert done["attempts"] == 1
    assert done["processing_instance_id"] == successor.status()["instance_id"]


def test_a_clean_stop_is_fast_even_with_open_connections(instances):
    # The default grace: gunicorn would wait up to 20 s (graceful_timeout) for stragglers.
    instance = instances(SHUTDOWN_GRACE_SECONDS=10)
    ws_url = instance.url.replace("http://", "ws://") + "/ws"
    kept_alive = requests.Session()
    assert kept_alive.get(f"{instance.url}/health", timeout=5).status_code == 200
    stream = requests.get(f"{instance.url}/events", stream=True, timeout=30)
    assert stream.status_code == 200
    # A WebSocket client that never reads again, so never answers the server's close frame
    # (a laptop gone to sleep, a dropped network).
    silent = websocket.create_connection(ws_url, timeout=5)
    try:
        started = time.monotonic()
        instance.signal_master(signal.SIGTERM)
        assert instance.wait_exit(timeout=25) == 0
        took = time.monotonic() - started
    finally:
        silent.sock.close()
        stream.close()
        kept_alive.close()
    print(f"\nSIGTERM with a kept-alive client, an SSE stream and a silent WebSocket: {took:.2f}s")
    # gunicorn itself spends up to 2 s on kept-alive connections (room for a last request) and
    # up to 2 s on each closed stream whose client does not close its end; a lingering
    # WebSocket thread used to hold the process until gunicorn SIGKILLed it at 20 s.
    assert took < 8


def test_a_sigterm_while_a_worker_boots_stops_that_worker(instances):
    """A stop signal that reaches a worker during post_fork (loading the app, starting the
    instance) is not lost: it is handled once gunicorn's own handlers are in place."""
    # The worker logs its pinning first thing in post_fork: the mark that it is in there.
    instance = instances(CPU_AFFINITY=str(min(os.sched_getaffinity(0))))
    assert instance.pid is not None
    (first,) = children(instance.pid)
    os.kill(first, signal.SIGKILL)
    wait_for(
        lambda: instance.log().count("worker process pinned to CPU") == 2,
        interval=0.005,
        what="the replacement in post_fork",
    )
    (booting,) = [pid for pid in children(instance.pid) if pid != first]
    os.kill(booting, signal.SIGTERM)
    wait_for(
        lambda: booting not in children(instance.pid),
        timeout=15,
        what=f"worker {booting} gone after its SIGTERM",
    )
    log = instance.log()
    assert f"Worker exiting (pid: {booting})" in log, log[-3000:]
    assert f"(pid:{booting}) was sent SIGKILL" not in log, log[-3000:]
