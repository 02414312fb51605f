"""Failures on the server's side: still problem+json, never a stack trace."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
import requests
from flask import Flask

from taskapp import create_app
from taskapp.config import Settings
from tests.api_helpers import PROBLEM, assert_problem
from tests.support import Instance, free_port


@pytest.fixture
def unreachable_app() -> Iterator[Flask]:
    """An app whose database is a port nobody listens on."""
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    app = create_app(Settings(database_url=url, auto_migrate=False).validated())
    app.config["TESTING"] = True
    yield app


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/tasks/", None),
        ("POST", "/tasks/", {"title": "t"}),
        ("GET", "/tasks/1", None),
        ("PUT", "/tasks/1", {"title": "t"}),
        ("DELETE", "/tasks/1", None),
        ("POST", "/tasks/1/retry", None),
        ("POST", "/tasks/1/cancel", None),
        ("POST", "/tasks/1/conversations/", {"content": "c"}),
        ("GET", "/tasks/1/conversations/", None),
        ("PUT", "/conversations/1", {"content": "c"}),
    ],
)
def test_an_unreachable_database_is_503(
    unreachable_app: Flask, method: str, path: str, body: object
) -> None:
    response = unreachable_app.test_client().open(path, method=method, json=body)
    assert_problem(response, 503)
    assert response.headers["Retry-After"] == "1"


def test_validation_comes_before_the_database(unreachable_app: Flask) -> None:
    response = unreachable_app.test_client().post("/tasks/", json={"title": ""})
    assert_problem(response, 422, "title")


def test_an_unexpected_error_is_a_logged_500_without_details(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    def explode() -> None:
        raise RuntimeError("secret internals")

    app.add_url_rule("/explode", view_func=explode)
    with caplog.at_level(logging.ERROR, logger="taskapp.errors"):
        response = app.test_client().get("/explode")
    body = assert_problem(response, 500)
    assert "secret internals" not in response.get_data(as_text=True)
    assert body["title"] == "Internal Server Error"
    (record,) = [r for r in caplog.records if r.name == "taskapp.errors"]
    assert record.exc_info is not None and "secret internals" in str(record.exc_info[1])


def test_errors_through_gunicorn(instances: Callable[..., Instance]) -> None:
    """The same problems come out of a real server, including a chunked body that is too big."""
    url = instances(WORKER_ENABLED=0).url

    def chunks() -> Iterator[bytes]:
        yield b'{"title": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    too_big = requests.post(
        f"{url}/tasks/", data=chunks(), headers={"Content-Type": "application/json"}, timeout=10
    )
    assert too_big.status_code == 413
    assert too_big.headers["Content-Type"] == PROBLEM
    # Cut at the limit, this body would still be valid JSON: it must be refused all the same.
    as_json = {"Content-Type": "application/json"}
    padded = iter([b'{"title": "t"}', b" " * (2 * 1024 * 1024)])
    assert (
        requests.post(f"{url}/tasks/", data=padded, headers=as_json, timeout=10).status_code == 413
    )
    small = iter([b'{"title": ', b'"chunked"}'])
    assert (
        requests.post(f"{url}/tasks/", data=small, headers=as_json, timeout=10).status_code == 201
    )
    for method, path, status in [
        ("GET", "/tasks/0", 404),
        ("GET", f"/tasks/{2**64}", 404),
        ("PATCH", "/tasks/", 405),
        ("GET", "/nowhere", 404),
    ]:
        response = requests.request(method, url + path, timeout=10)
        assert response.status_code == status, (method, path)
        assert response.headers["Content-Type"] == PROBLEM
        assert response.json()["status"] == status
    not_json = requests.post(f"{url}/tasks/", data="{", headers=as_json, timeout=10)
    assert (not_json.status_code, not_json.headers["Content-Type"]) == (400, PROBLEM)
    # Not sent as JSON (a cross-site form can only send these without a preflight): 415.
    for body_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        for path in ("/tasks/", "/tasks/1/cancel"):
            refused = requests.post(
                f"{url}{path}",
                data='{"title": "t"}',
                headers={"Content-Type": body_type},
                timeout=10,
            )
            assert (refused.status_code, refused.headers["Content-Type"]) == (415, PROBLEM), path
            assert "Content-Type" in refused.json()["errors"]
    no_type = requests.post(f"{url}/tasks/", data='{"title": "t"}', timeout=10)
    assert no_type.status_code == 415
    assert requests.post(f"{url}/tasks", json={"title": "t"}, timeout=10).status_code == 201
