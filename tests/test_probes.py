"""Probes: /livez fails when this instance's own threads are dead or stalled, never because
of the database; /readyz fails when the database is unreachable, the schema is behind this
code, or the instance is draining. In-process first, then on real gunicorn instances."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from taskapp import database as database_module
from taskapp import runtime
from tests.support import Instance, create_task, task_row, wait_for


@pytest.fixture
def started(app: Flask):
    """The app with its background parts running, as in a gunicorn worker."""
    instance = runtime.start(app)
    wait_for(instance.listener.connected.is_set, what="the listener connected")
    yield instance
    instance.shutdown(grace=0)


def test_a_running_instance_is_alive_and_ready(client: FlaskClient, started) -> None:
    live = client.get("/livez")
    assert (live.status_code, live.json) == (
        200,
        {"status": "alive", "threads": {"listener": "ok", "housekeeper": "ok", "worker": "ok"}},
    )
    ready = client.get("/readyz")
    assert (ready.status_code, ready.json) == (
        200,
        {"status": "ready", "database": "ok", "schema": "current", "draining": False},
    )


def test_a_dead_work_thread_fails_liveness(client: FlaskClient, started) -> None:
    started.worker._claims["default"].put(None)  # one work thread ends, as if it had crashed
    response = wait_for(
        lambda: (r := client.get("/livez")).status_code == 503 and r,
        what="liveness failing",
    )
    assert response.json["threads"]["worker"] == "dead: taskapp-worker-0"
    assert client.get("/readyz").status_code == 200  # it can still serve requests


def test_a_dead_housekeeper_fails_liveness_within_a_heartbeat(client: FlaskClient, started):
    started.housekeeper._done.set()  # its loop ends, as if the thread had crashed
    began = time.monotonic()
    response = wait_for(
        lambda: (r := client.get("/livez")).status_code == 503 and r,
        timeout=2 * started.settings.heartbeat_seconds + 1,
        what="liveness failing",
    )
    assert response.json["threads"]["housekeeper"] == "dead"
    print(f"\nliveness failed {time.monotonic() - began:.2f}s after the housekeeper died")


def test_a_stalled_housekeeper_fails_liveness(app: Flask, client: FlaskClient) -> None:
    app.config["TASKAPP"] = app.config["TASKAPP"].with_changes(liveness_stall_seconds=1)
    instance = runtime.start(app)
    release = threading.Event()
    try:
        instance.housekeeper.run_once = lambda: release.wait()  # type: ignore[method-assign]
        response = wait_for(
            lambda: (r := client.get("/livez")).status_code == 503 and r,
            timeout=instance.settings.heartbeat_seconds + 3,
            what="liveness failing",
        )
        assert response.json["threads"] == {
            "listener": "ok",
            "housekeeper": "stalled",
            "worker": "ok",
        }
    finally:
        release.set()
        instance.shutdown(grace=0)


def test_draining_is_not_ready_and_still_alive(client: FlaskClient, started) -> None:
    started.begin_shutdown(grace=0)
    ready = client.get("/readyz")
    assert (ready.status_code, ready.json["draining"], ready.json["database"]) == (503, True, "ok")
    # Its threads stop on purpose now: that is no reason to restart it.
    started.shutdown(grace=0)
    assert client.get("/livez").status_code == 200


@pytest.mark.parametrize(
    ("code_head", "known", "state", "code"),
    [
        ("9999_newer", {"9999_newer"}, "behind", 503),  # this code has a migration to apply
        ("0001", {"0001"}, "ahead", 200),  # a newer release migrated: still served
    ],
)
def test_readiness_compares_the_schema_with_this_codes_head(
    client: FlaskClient, monkeypatch, code_head, known, state, code
) -> None:
    _, real_known = database_module._revisions()
    if state == "behind":
        known = known | real_known
    monkeypatch.setattr(database_module, "_revisions", lambda: (code_head, frozenset(known)))
    response = client.get("/readyz")
    assert (response.status_code, response.json["schema"]) == (code, state)


def test_without_the_version_table_the_schema_is_behind(client: FlaskClient, db_conn) -> None:
    (version,) = db_conn.execute("SELECT version_num FROM alembic_version").fetchone()
    db_conn.execute("ALTER TABLE alembic_version RENAME TO alembic_version_aside")
    try:
        response = client.get("/readyz")
        assert (response.status_code, response.json["schema"]) == (503, "behind")
    finally:
        db_conn.execute("ALTER TABLE alembic_version_aside RENAME TO alembic_version")
    assert client.get("/readyz").json["schema"] == "current", version


# -- on real gunicorn instances --------------------------------------------------------------


def probe(instance: Instance, path: str) -> tuple[int, dict]:
    response = requests.get(instance.url + path, timeout=5)
    return response.status_code, response.json()


def test_a_database_outage_fails_readiness_and_not_liveness(private_postgres) -> None:
    private_postgres.create_database("taskapp")
    # A heartbeat a second and a stall limit shorter than the outage: a liveness that asked
    # the database, or loops that stopped coming round while it is away, would fail.
    instance = Instance(private_postgres.url("taskapp"), LEASE_SECONDS=3, LIVENESS_STALL_SECONDS=3)
    try:
        instance.start()
        assert probe(instance, "/readyz")[0] == 200
        private_postgres.stop()
        down_at = time.monotonic()
        code, body = probe(instance, "/readyz")
        assert (code, body["database"], body["schema"]) == (503, "unreachable", "unknown")
        while time.monotonic() - down_at < 6:  # twice the stall limit
            code, body = probe(instance, "/livez")
            assert code == 200, body
            time.sleep(0.2)
        assert "housekeeping failed" in instance.log()
        private_postgres.start()
        wait_for(lambda: probe(instance, "/readyz")[0] == 200, timeout=20, what="ready again")
        assert probe(instance, "/livez")[0] == 200
    finally:
        instance.stop()


def test_a_killed_housekeeper_fails_liveness_in_gunicorn(instances) -> None:
    instance = instances(TASK_PROCESSOR="tests.processors:break_housekeeper", LEASE_SECONDS=3)
    assert probe(instance, "/livez")[0] == 200
    create_task(instance.url, "kill")
    _, body = wait_for(
        lambda: (p := probe(instance, "/livez"))[0] == 503 and p,
        timeout=2 * 1.0 + 1,  # heartbeat: LEASE_SECONDS / 3
        what="liveness failing",
    )
    assert body["threads"]["housekeeper"] == "dead"
    assert probe(instance, "/readyz")[0] == 200


def test_sigterm_fails_readiness_while_the_instance_still_serves(instances, db_conn) -> None:
    """With DRAIN_SECONDS the instance answers for that long after SIGTERM, not ready and
    still alive, then stops accepting; the running task finishes meanwhile."""
    instance = instances(
        TASK_PROCESSOR="tests.processors:slow",
        TEST_PROCESSOR_SECONDS=3,
        SHUTDOWN_GRACE_SECONDS=10,
        DRAIN_SECONDS=2,
    )
    task = create_task(instance.url, "long")
    wait_for(lambda: instance.status()["worker"]["current_tasks"], what="the task running")
    instance.signal_master(signal.SIGTERM)
    signalled = time.monotonic()
    # The master passes the signal on to its worker: not ready as soon as that has it.
    _, body = wait_for(
        lambda: (p := probe(instance, "/readyz"))[0] == 503 and p, timeout=1, what="not ready"
    )
    assert (body["draining"], body["database"]) == (True, "ok")
    assert probe(instance, "/livez")[0] == 200
    assert probe(instance, "/health")[0] == 200  # /health stays as it was
    assert instance.status()["worker"]["running"] is False  # it claims nothing more
    while time.monotonic() - signalled < 1.5:  # still answering through the drain
        assert probe(instance, "/readyz")[0] == 503
        time.sleep(0.1)
    assert instance.wait_exit(timeout=20) == 0
    assert task_row(db_conn, task["id"])["status"] == "completed"
    with pytest.raises(requests.ConnectionError):
        probe(instance, "/readyz")
