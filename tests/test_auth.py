"""API keys: with API_KEYS set, everything but /health and the docs needs one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from taskapp import create_app
from taskapp.config import Settings
from tests.api_helpers import assert_problem

KEYS = ("key-one", "key-two")


@pytest.fixture
def secured(settings: Settings) -> Iterator[FlaskClient]:
    app = create_app(settings.with_changes(api_keys=KEYS))
    app.config["TESTING"] = True
    yield app.test_client()
    from taskapp.database import get_database

    get_database(app).close()  # the app's pool: its connections must not outlive the test


GUARDED = [
    ("GET", "/tasks/"),
    ("GET", "/tasks"),
    ("POST", "/tasks/"),
    ("GET", "/tasks/1"),
    ("PUT", "/tasks/1"),
    ("DELETE", "/tasks/1"),
    ("POST", "/tasks/1/retry"),
    ("POST", "/tasks/1/cancel"),
    ("POST", "/tasks/1/conversations/"),
    ("GET", "/tasks/1/conversations/"),
    ("PUT", "/conversations/1"),
    ("GET", "/status"),
    ("GET", "/metrics"),
    ("GET", "/events"),
    ("GET", "/no-such-page"),
]


@pytest.mark.parametrize(("method", "path"), GUARDED)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic key-one"},
        {"Authorization": "key-one"},
        {"X-API-Key": "key-one-and-more"},
        {"X-API-Key": "KEY-ONE"},
        {"X-API-Key": "clé"},
        {"X-API-Key": ""},
    ],
    ids=lambda headers: repr(headers),
)
def test_requests_without_a_valid_key_are_401(
    secured: FlaskClient, method: str, path: str, headers: dict[str, str]
) -> None:
    response = secured.open(path, method=method, headers=headers, json={"title": "t"})
    assert_problem(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_the_dashboard_is_guarded_too(secured: FlaskClient) -> None:
    """Its pages answer a missing key with a 401 of their own (a form asking for the key)."""
    for headers in ({}, {"X-API-Key": "wrong"}):
        response = secured.get("/dashboard/", headers=headers)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert secured.get("/dashboard/", headers={"X-API-Key": "key-one"}).status_code != 401


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer key-one"},
        {"Authorization": "bearer key-two"},
        {"Authorization": "  Bearer   key-one  "},
        {"X-API-Key": "key-one"},
        {"X-API-Key": "key-two"},
        {"Authorization": "Basic whatever", "X-API-Key": "key-two"},
    ],
    ids=lambda headers: repr(headers),
)
def test_either_header_with_any_key_is_accepted(
    secured: FlaskClient, headers: dict[str, str]
) -> None:
    created = secured.post("/tasks/", json={"title": "t"}, headers=headers)
    assert created.status_code == 201
    assert secured.get("/tasks/", headers=headers).status_code == 200


def test_a_valid_key_still_gets_the_usual_errors(secured: FlaskClient) -> None:
    headers = {"X-API-Key": "key-one"}
    assert_problem(secured.get("/tasks/999", headers=headers), 404)
    assert_problem(secured.post("/tasks/", json={}, headers=headers), 422, "title")


@pytest.mark.parametrize(
    "path",
    [
        "/health",
        "/health/",
        "/livez",
        "/readyz",
        "/apidocs/",
        "/apidocs",
        "/apispec_1.json",
        "/flasgger_static/swagger-ui.css",
        "/flasgger_static/swagger-ui-bundle.js",
        "/problems/validation",
    ],
)
def test_health_and_docs_need_no_key(secured: FlaskClient, path: str) -> None:
    response = secured.get(path)
    assert response.status_code == 200, (path, response.status_code)


def test_without_keys_configured_everything_is_open(client: FlaskClient) -> None:
    assert client.get("/tasks/").status_code == 200
    assert client.post("/tasks/", json={"title": "t"}).status_code == 201


def test_keys_come_from_the_environment() -> None:
    settings = Settings.from_env({"API_KEYS": " a , b ,, ", "DATABASE_URL": "postgresql://x/y"})
    assert settings.api_keys == ("a", "b")


@pytest.mark.parametrize(
    "path", ["/events", "/events/", "/ws", "/dashboard/", "/dashboard/tasks/1"]
)
def test_streams_and_dashboard_pages_take_the_key_as_a_query_parameter(
    secured: FlaskClient, path: str
) -> None:
    """Browsers open these without headers; anything but 401 means the key got through."""
    assert secured.get(path, query_string={"api_key": "key-two"}).status_code != 401
    assert secured.get(path, query_string={"api_key": "wrong"}).status_code == 401


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/tasks/"), ("GET", "/status"), ("GET", "/metrics"), ("POST", "/tasks/")],
)
def test_the_api_does_not_take_the_key_as_a_query_parameter(
    secured: FlaskClient, method: str, path: str
) -> None:
    response = secured.open(path, method=method, query_string={"api_key": "key-one"}, json={})
    assert_problem(response, 401)
