"""Logs and request ids.

LOG_FORMAT=json: every line a process writes is one JSON object (ours, gunicorn's error and
access logs, Alembic's migrations), with instance, task and request ids. Every response
carries an X-Request-ID: the client's when it is a sane one, else a new one.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import requests
from flask import Flask
from psycopg import sql

from taskapp import create_app, logs
from taskapp.config import Settings
from tests.support import Instance, create_task, free_port, get_task, wait_for

HEX_ID = re.compile(r"[0-9a-f]{32}")
HOSTILE_IDS = [
    "x" * 129,  # too long
    'a" injected="1',  # quotes and spaces in a log line
    "line\tbreak",
    "a,b",  # two headers, joined
    "é" * 10,
]


@pytest.fixture
def fresh_database(server_url: str) -> Iterator[str]:
    """An empty database, so that an instance's start runs every migration."""
    name = f"taskapp_logs_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield server_url.rpartition("/")[0] + "/" + name
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def json_lines(text: str) -> list[dict]:
    """Every line parsed as JSON (a line that is not JSON fails the test, naming it)."""
    entries = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


# -- in-process: the header ------------------------------------------------------------------


def test_a_sane_request_id_is_echoed(client) -> None:
    for sent in ["abc", "0f" * 16, "Root=1-67891233-abcdef012345678912345678", "a" * 128]:
        response = client.get("/livez", headers={"X-Request-ID": sent})
        assert response.headers["X-Request-ID"] == sent


def test_a_request_without_an_id_gets_a_new_one_each_time(client) -> None:
    first = client.get("/livez").headers["X-Request-ID"]
    second = client.get("/livez").headers["X-Request-ID"]
    assert HEX_ID.fullmatch(first) and HEX_ID.fullmatch(second) and first != second


@pytest.mark.parametrize("hostile", HOSTILE_IDS)
def test_a_hostile_request_id_is_replaced(client, hostile: str) -> None:
    response = client.get("/livez", headers={"X-Request-ID": hostile})
    assert HEX_ID.fullmatch(response.headers["X-Request-ID"])


def test_errors_carry_the_request_id_too(client, settings: Settings) -> None:
    sent = {"X-Request-ID": "err-1"}
    missing = client.get("/tasks/999999", headers=sent)
    assert missing.status_code == 404 and missing.mimetype == "application/problem+json"
    assert missing.headers["X-Request-ID"] == "err-1"
    invalid = client.post("/tasks/", json={"title": ""}, headers=sent)
    assert invalid.status_code == 422 and invalid.headers["X-Request-ID"] == "err-1"
    not_json = client.post("/tasks/", data="x", content_type="text/plain", headers=sent)
    assert not_json.status_code == 415 and not_json.headers["X-Request-ID"] == "err-1"
    unrouted = client.get("/nowhere", headers=sent)
    assert unrouted.status_code == 404 and unrouted.headers["X-Request-ID"] == "err-1"
    # A before_request hook that answers at once (the API key check) ends the chain early.
    keyed = create_app(settings.with_changes(api_keys=("k",)))
    refused = keyed.test_client().get("/tasks/", headers=sent)
    assert refused.status_code == 401 and refused.headers["X-Request-ID"] == "err-1"


def test_a_request_s_log_lines_carry_its_id(app: Flask, capsys) -> None:
    logs.configure(app.config["TASKAPP"].with_changes(log_format="json"))
    try:
        with app.test_request_context("/", headers={"X-Request-ID": "req-7"}):
            logging.getLogger("taskapp.test").warning("inside")
        logging.getLogger("taskapp.test").warning("outside")
    finally:
        logs.configure(app.config["TASKAPP"])
    inside, outside = json_lines(capsys.readouterr().err)
    assert (inside["message"], inside["request_id"]) == ("inside", "req-7")
    assert "request_id" not in outside
    assert inside["instance_id"] == app.config["TASKAPP"].instance_id


def test_text_lines_name_the_request_at_their_end(app: Flask, capsys) -> None:
    with app.test_request_context("/", headers={"X-Request-ID": "req-8"}):
        logging.getLogger("taskapp.test").warning("inside")
    logging.getLogger("taskapp.test").warning("outside")
    inside, outside = capsys.readouterr().err.splitlines()
    instance = app.config["TASKAPP"].instance_id[:8]
    assert inside.endswith(f"WARNING [{instance}] taskapp.test: inside (request req-8)"), inside
    assert outside.endswith(f"WARNING [{instance}] taskapp.test: outside"), outside


def test_json_lines_hold_exceptions_warnings_and_other_loggers(app: Flask, capsys) -> None:
    logs.configure(app.config["TASKAPP"].with_changes(log_format="json"))
    try:
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            logging.getLogger("taskapp.test").exception("failed")
        logging.getLogger("alembic.runtime.migration").info("Running upgrade")
        import warnings

        warnings.warn("deprecated thing", UserWarning, stacklevel=1)
        sys.excepthook(*_raised(KeyError("uncaught")))
    finally:
        logs.configure(app.config["TASKAPP"])
    failed, alembic, warning, uncaught = json_lines(capsys.readouterr().err)
    assert failed["level"] == "error" and "ValueError: bad\nthing" in failed["exception"]
    assert (alembic["logger"], alembic["level"]) == ("alembic.runtime.migration", "info")
    assert warning["logger"] == "py.warnings" and "deprecated thing" in warning["message"]
    assert uncaught["level"] == "critical" and "KeyError" in uncaught["exception"]
    assert sys.excepthook is sys.__excepthook__  # text again: Python's own


def _raised(exc: BaseException) -> tuple:
    try:
        raise exc
    except BaseException as caught:
        return type(caught), caught, caught.__traceback__


# -- real gunicorn ---------------------------------------------------------------------------


def test_with_json_every_line_gunicorn_alembic_and_taskapp_write_is_json(fresh_database) -> None:
    instance = Instance(fresh_database, LOG_FORMAT="json", ACCESS_LOG="-").start()
    try:
        echoed = requests.get(
            f"{instance.url}/tasks/", headers={"X-Request-ID": "json-test-1"}, timeout=5
        )
        hostile = requests.get(
            f"{instance.url}/tasks/999", headers={"X-Request-ID": "evil " + "x" * 5000}, timeout=5
        )
        task = create_task(instance.url, "logged")
        wait_for(lambda: get_task(instance.url, task["id"])["status"] == "completed")
        instance_id = instance.status()["instance_id"]
        wait_for(lambda: f"task {task['id']} completed" in instance.log(), what="completion")
    finally:
        assert instance.stop() == 0
    assert echoed.headers["X-Request-ID"] == "json-test-1"
    replaced = hostile.headers["X-Request-ID"]
    assert hostile.status_code == 404 and HEX_ID.fullmatch(replaced)

    entries = json_lines(instance.log())
    by_logger: dict[str, list[dict]] = {}
    for entry in entries:
        assert {"time", "level", "logger", "message", "instance_id", "pid"} <= set(entry)
        by_logger.setdefault(entry["logger"], []).append(entry)
    gunicorn = [e["message"] for e in by_logger["gunicorn.error"]]
    assert any(m.startswith("Starting gunicorn") for m in gunicorn)
    assert any(m.startswith("Booting worker") for m in gunicorn)
    assert any(m.startswith("Shutting down") for m in gunicorn)
    migrations = [e["message"] for e in by_logger["alembic.runtime.migration"]]
    assert any(m.startswith("Running upgrade  -> 0001") for m in migrations), migrations
    # The access log: one line per request, its fields as fields, with the request id.
    access = {(e["method"], e["path"]): e for e in by_logger["gunicorn.access"]}
    listed = access[("GET", "/tasks/")]
    assert (listed["status"], listed["request_id"]) == (200, "json-test-1")
    assert listed["instance_id"] == instance_id and listed["duration_ms"] >= 0
    assert access[("GET", "/tasks/999")]["request_id"] == replaced
    assert "x" * 100 not in instance.log()  # the hostile id was never written
    assert access[("POST", "/tasks/")]["status"] == 201
    completed = [e for e in by_logger["taskapp.worker"] if e.get("task_id") == task["id"]]
    assert completed and all(e["instance_id"] == instance_id for e in completed)
    # The housekeeper's word on autovacuum, said once, exactly when the server has it off.
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        autovacuum = conn.execute("SHOW autovacuum").fetchone()[0]
    warned = [e for e in entries if e["message"].startswith("autovacuum is off")]
    assert len(warned) == (1 if autovacuum == "off" else 0), warned


@pytest.mark.slow  # real gunicorn (the instances fixture would bring a database it can't use)
def test_a_request_s_own_log_lines_carry_its_id_under_gunicorn() -> None:
    # No database at all (AUTO_MIGRATE=0 starts anyway): every API request logs a warning.
    unreachable = f"postgresql://user:secret@127.0.0.1:{free_port()}/taskdb"
    instance = Instance(unreachable, LOG_FORMAT="json", AUTO_MIGRATE="0")
    try:
        instance.start(wait=False)
        instance.wait_ready(("/livez",))
        response = requests.get(
            f"{instance.url}/tasks/1", headers={"X-Request-ID": "outage-42"}, timeout=10
        )
        assert response.status_code == 503
        assert response.headers["Content-Type"] == "application/problem+json"
        assert response.headers["X-Request-ID"] == "outage-42"
        line = wait_for(
            lambda: next(
                (e for e in json_lines(instance.log()) if e.get("request_id") == "outage-42"),
                None,
            ),
            what="the request's log line",
        )
    finally:
        instance.stop()
    assert line["logger"] == "taskapp.errors" and "GET /tasks/1" in line["message"]
    assert "secret" not in instance.log()


def test_json_logs_carry_instance_and_task_ids(instances):
    instance = instances(LOG_FORMAT="json")
    task = create_task(instance.url, "logged")
    wait_for(lambda: get_task(instance.url, task["id"])["status"] == "completed")
    instance_id = instance.status()["instance_id"]

    def worker_lines() -> list[dict]:
        lines = []
        for line in instance.log().splitlines():
            if line.startswith("{") and '"logger": "taskapp.worker"' in line:
                lines.append(json.loads(line))
        return lines

    lines = wait_for(
        lambda: (
            (found := worker_lines())
            and any(e.get("task_id") == task["id"] and "completed" in e["message"] for e in found)
            and found
        ),
        what="the completion log line",
    )
    assert all(entry["instance_id"] == instance_id for entry in lines)
    about_task = [entry for entry in lines if entry.get("task_id") == task["id"]]
    assert any(entry["message"].startswith(f"task {task['id']} completed") for entry in about_task)
    for entry in about_task:
        assert {"time", "level", "logger", "message", "instance_id", "task_id"} <= set(entry)


def test_text_logs_are_the_default(instances):
    instance = instances(ACCESS_LOG="-")
    task = create_task(instance.url, "plain")
    wait_for(lambda: get_task(instance.url, task["id"])["status"] == "completed")
    wait_for(lambda: f"task {task['id']} completed" in instance.log())
    response = requests.get(f"{instance.url}/tasks/", headers={"X-Request-ID": "t-1"}, timeout=5)
    assert response.headers["X-Request-ID"] == "t-1"
    # gunicorn's usual access line, with the request id at its end.
    wait_for(lambda: re.search(r'"GET /tasks/ HTTP/1.1" 200 .* t-1$', instance.log(), re.M))
    assert not any(line.startswith("{") for line in instance.log().splitlines())


def test_the_spec_documents_the_header_on_every_response(client) -> None:
    spec = client.get("/apispec_1.json").get_json()
    header = spec["components"]["headers"]["X-Request-ID"]
    assert header["required"] is True and "pattern" in header["schema"]
    assert logs.REQUEST_ID.pattern in header["schema"]["pattern"]
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            for code, response in operation["responses"].items():
                if "$ref" in response:
                    response = spec["components"]["responses"][response["$ref"].rpartition("/")[2]]
                if code in ("101", "414"):  # a WebSocket's upgrade; gunicorn's own answer
                    continue
                assert "X-Request-ID" in response.get("headers", {}), (method, path, code)
