"""HTTP conventions: a conversation's Location and GET, tasks' ETag / If-Match / If-None-Match,
and a problem `type` per kind of error, each with its page and in the spec."""

from __future__ import annotations

import html
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import requests
from flask.testing import FlaskClient

from taskapp.errors import PROBLEM_TYPES
from taskapp.schemas import MAX_CONVERSATIONS_PER_TASK
from tests.api_helpers import assert_conversation_shape, assert_problem, dump_tables
from tests.support import Instance


def create_task(client: FlaskClient, *contents: str, **fields: Any) -> Any:
    body = {"title": "t", "conversations": [{"content": c} for c in contents], **fields}
    response = client.post("/tasks/", json=body)
    assert response.status_code == 201, response.get_data(as_text=True)
    return response


def etag_of(client: FlaskClient, task_id: int) -> str:
    response = client.get(f"/tasks/{task_id}")
    assert response.status_code == 200
    return response.headers["ETag"]


def problem_type(response: Any) -> str:
    return response.get_json(force=True)["type"]


# -- conversations: Location and GET ----------------------------------------------------------


def test_a_created_conversation_has_a_location_that_gets_it(client: FlaskClient) -> None:
    task = create_task(client).get_json()
    created = client.post(f"/tasks/{task['id']}/conversations/", json={"content": "hello"})
    assert created.status_code == 201
    conversation = created.get_json()
    assert created.headers["Location"] == f"/conversations/{conversation['id']}"
    fetched = client.get(created.headers["Location"])
    assert fetched.status_code == 200 and fetched.mimetype == "application/json"
    assert fetched.get_json() == conversation
    assert_conversation_shape(fetched.get_json())
    # An update shows in the GET, and trailing slashes work as everywhere.
    client.put(created.headers["Location"], json={"content": "changed"})
    assert client.get(f"{created.headers['Location']}/").get_json()["content"] == "changed"


def test_a_missing_conversation_is_a_404_problem(client: FlaskClient) -> None:
    body = assert_problem(client.get("/conversations/999"), 404)
    assert body["type"] == "/problems/not-found" and "999" in body["detail"]
    assert_problem(client.get("/conversations/0"), 404)
    task_id = create_task(client, "a").get_json()["id"]
    (conversation,) = client.get(f"/tasks/{task_id}/conversations/").get_json()
    assert client.delete(f"/tasks/{task_id}").status_code == 204
    assert_problem(client.get(f"/conversations/{conversation['id']}"), 404)


# -- tasks: ETag ------------------------------------------------------------------------------


def test_every_response_carrying_a_task_has_the_etag_of_what_get_shows(
    client: FlaskClient,
) -> None:
    created = create_task(client, "a")
    task_id = created.get_json()["id"]
    tag = created.headers["ETag"]
    assert tag.startswith('"') and tag.endswith('"') and not tag.startswith("W/")
    assert created.headers["Content-Location"] == f"/tasks/{task_id}"
    assert etag_of(client, task_id) == tag

    updated = client.put(f"/tasks/{task_id}", json={"title": "new"})
    assert updated.headers["ETag"] != tag
    assert updated.headers["Content-Location"] == f"/tasks/{task_id}"
    assert etag_of(client, task_id) == updated.headers["ETag"]

    cancelled = client.post(f"/tasks/{task_id}/cancel")
    assert cancelled.headers["Content-Location"] == f"/tasks/{task_id}"
    assert etag_of(client, task_id) == cancelled.headers["ETag"] != updated.headers["ETag"]
    retried = client.post(f"/tasks/{task_id}/retry")
    assert etag_of(client, task_id) == retried.headers["ETag"] != cancelled.headers["ETag"]
    # A GET says nothing of Content-Location: the body is the target's own.
    assert "Content-Location" not in client.get(f"/tasks/{task_id}").headers


def test_the_etag_changes_with_anything_the_task_shows_and_only_then(
    client: FlaskClient, db_conn: psycopg.Connection
) -> None:
    task_id = create_task(client, "a").get_json()["id"]
    first = etag_of(client, task_id)
    assert etag_of(client, task_id) == first
    # Two tasks alike in every field but their id differ.
    assert create_task(client, "a").headers["ETag"] != first
    # A lease renewal changes no field the task shows: the tag stays.
    db_conn.execute("UPDATE tasks SET run_after = run_after WHERE id = %s", (task_id,))
    assert etag_of(client, task_id) == first

    added = client.post(f"/tasks/{task_id}/conversations/", json={"content": "b"})
    after_add = etag_of(client, task_id)
    assert after_add != first
    client.put(f"/conversations/{added.get_json()['id']}", json={"content": "c"})
    assert etag_of(client, task_id) not in {first, after_add}


def test_if_none_match_is_a_304_compared_weakly(client: FlaskClient) -> None:
    task_id = create_task(client).get_json()["id"]
    tag = etag_of(client, task_id)
    for sent in (tag, f"W/{tag}", f'"other", {tag}', "*"):
        response = client.get(f"/tasks/{task_id}", headers={"If-None-Match": sent})
        assert response.status_code == 304, sent
        assert response.get_data() == b"" and response.headers["ETag"] == tag
    client.put(f"/tasks/{task_id}", json={"priority": 3})
    fresh = client.get(f"/tasks/{task_id}", headers={"If-None-Match": tag})
    assert fresh.status_code == 200 and fresh.get_json()["priority"] == 3
    assert fresh.headers["ETag"] != tag
    assert_problem(client.get("/tasks/999", headers={"If-None-Match": "*"}), 404)


# -- tasks: If-Match --------------------------------------------------------------------------


def test_a_stale_if_match_is_a_412_that_changes_nothing(
    client: FlaskClient, db_conn: psycopg.Connection
) -> None:
    """The lost update: two editors read the task, the first saves, the second is told."""
    task_id = create_task(client, "a").get_json()["id"]
    read_by_both = etag_of(client, task_id)
    first = client.put(
        f"/tasks/{task_id}", json={"title": "by A"}, headers={"If-Match": read_by_both}
    )
    assert first.status_code == 200

    before = dump_tables(db_conn)
    second = client.put(
        f"/tasks/{task_id}", json={"title": "by B"}, headers={"If-Match": read_by_both}
    )
    body = assert_problem(second, 412)
    assert body["type"] == "/problems/precondition-failed"
    assert str(task_id) in body["detail"] and "If-Match" in body["detail"]
    deleted = client.delete(f"/tasks/{task_id}", headers={"If-Match": read_by_both})
    assert_problem(deleted, 412)
    assert dump_tables(db_conn) == before
    assert client.get(f"/tasks/{task_id}").get_json()["title"] == "by A"

    # With the tag read again, B's edit goes through.
    again = client.put(
        f"/tasks/{task_id}", json={"title": "by B"}, headers={"If-Match": first.headers["ETag"]}
    )
    assert again.status_code == 200 and again.get_json()["title"] == "by B"


def test_if_match_compares_strongly_and_takes_star_and_lists(client: FlaskClient) -> None:
    task_id = create_task(client).get_json()["id"]
    tag = etag_of(client, task_id)
    # A weak tag never matches strongly (RFC 9110, section 13.1.1). (werkzeug reads a tag
    # sent without its quotes as the same tag: lenient, and no other tag's.)
    for stale in (f"W/{tag}", '"nope"', f'"{tag}"', ""):
        response = client.put(
            f"/tasks/{task_id}", json={"priority": 1}, headers={"If-Match": stale}
        )
        assert_problem(response, 412)
    listed = client.put(
        f"/tasks/{task_id}", json={"priority": 2}, headers={"If-Match": f'"old", {tag}'}
    )
    assert listed.status_code == 200
    star = client.put(f"/tasks/{task_id}", json={"priority": 3}, headers={"If-Match": "*"})
    assert star.status_code == 200 and star.get_json()["priority"] == 3
    # An empty body with a good tag is the task as it is; with a stale one, a 412.
    same = client.put(f"/tasks/{task_id}", json={}, headers={"If-Match": star.headers["ETag"]})
    assert same.status_code == 200 and same.headers["ETag"] == star.headers["ETag"]
    assert_problem(client.put(f"/tasks/{task_id}", json={}, headers={"If-Match": tag}), 412)


def test_if_match_is_optional_and_a_missing_task_stays_a_404(client: FlaskClient) -> None:
    task_id = create_task(client).get_json()["id"]
    assert client.put(f"/tasks/{task_id}", json={"title": "plain"}).status_code == 200
    for headers in ({"If-Match": "*"}, {"If-Match": '"x"'}):
        assert_problem(client.put("/tasks/999", json={"title": "x"}, headers=headers), 404)
        assert_problem(client.delete("/tasks/999", headers=headers), 404)
    # Bad input is a 422 before any precondition is looked at.
    response = client.put(f"/tasks/{task_id}", json={"title": ""}, headers={"If-Match": '"x"'})
    assert_problem(response, 422, "title")


def test_a_conditional_delete(client: FlaskClient) -> None:
    task_id = create_task(client, "a").get_json()["id"]
    tag = etag_of(client, task_id)
    client.post(f"/tasks/{task_id}/conversations/", json={"content": "b"})
    assert_problem(client.delete(f"/tasks/{task_id}", headers={"If-Match": tag}), 412)
    assert client.get(f"/tasks/{task_id}").status_code == 200
    current = etag_of(client, task_id)
    assert client.delete(f"/tasks/{task_id}", headers={"If-Match": current}).status_code == 204
    assert_problem(client.get(f"/tasks/{task_id}"), 404)


def test_concurrent_writers_with_one_tag_exactly_one_wins(
    instances: Callable[..., Instance],
) -> None:
    """Through real gunicorn threads: the lock between the test and the write lets one through."""
    url = instances(WORKER_ENABLED=0).url
    created = requests.post(f"{url}/tasks/", json={"title": "contested"}, timeout=10)
    task_id, tag = created.json()["id"], created.headers["ETag"]
    start = threading.Barrier(8)
    statuses: list[int] = []

    def edit(n: int) -> None:
        start.wait()
        response = requests.put(
            f"{url}/tasks/{task_id}",
            json={"title": f"editor {n}"},
            headers={"If-Match": tag},
            timeout=10,
        )
        statuses.append(response.status_code)

    threads = [threading.Thread(target=edit, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(statuses) == [200] + [412] * 7


# -- problem types ----------------------------------------------------------------------------


def test_each_kind_of_error_has_its_own_type(
    client: FlaskClient, db_conn: psycopg.Connection
) -> None:
    task_id = create_task(client, "a").get_json()["id"]
    headers = {"Idempotency-Key": "k-1"}
    assert client.post("/tasks/", json={"title": "x"}, headers=headers).status_code == 201
    kinds = {
        "validation": client.post("/tasks/", json={"title": ""}),
        "idempotency-key-reused": client.post("/tasks/", json={"title": "y"}, headers=headers),
        "invalid-state": client.post(f"/tasks/{task_id}/retry"),
        "not-found": client.get("/tasks/999"),
        "method-not-allowed": client.patch(f"/tasks/{task_id}", json={}),
        "malformed-request": client.post("/tasks/", data="{", content_type="application/json"),
        "unsupported-media-type": client.post("/tasks/", data="x", content_type="text/plain"),
        "content-too-large": client.post(
            "/tasks/", data=b"x" * (2 << 20), content_type="application/json"
        ),
    }
    # The most conversations a task may have, then one more.
    db_conn.execute(
        "INSERT INTO conversations (task_id, content) SELECT %s, 'c' FROM generate_series(2, %s)",
        (task_id, MAX_CONVERSATIONS_PER_TASK),
    )
    kinds["conversation-limit"] = client.post(
        f"/tasks/{task_id}/conversations/", json={"content": "one too many"}
    )
    for name, response in kinds.items():
        kind = PROBLEM_TYPES[name]
        body = assert_problem(response, kind.status)
        assert body["type"] == f"/problems/{name}", (name, body)


def test_every_problem_type_has_its_page(client: FlaskClient) -> None:
    for name, kind in PROBLEM_TYPES.items():
        page = client.get(kind.uri)
        assert page.status_code == 200 and page.mimetype == "text/html", name
        text = page.get_data(as_text=True)
        assert html.escape(kind.summary) in text and f"HTTP {kind.status}" in text
    assert_problem(client.get("/problems/nothing-like-it"), 404)


def test_the_spec_documents_every_problem_type(client: FlaskClient) -> None:
    spec = client.get("/apispec_1.json").get_json()
    description = spec["info"]["description"]
    assert all(f"`{kind.uri}` ({kind.status})" in description for kind in PROBLEM_TYPES.values())
    (name,) = spec["paths"]["/problems/{name}"]["parameters"]
    assert name["schema"]["enum"] == list(PROBLEM_TYPES)
    responses = spec["components"]["responses"]
    for kind in PROBLEM_TYPES.values():
        examples = responses[str(kind.status)]["content"]["application/problem+json"]["examples"]
        assert kind.uri in {example["value"]["type"] for example in examples.values()}
    # Every documented response of a task says which headers it carries.
    paths = spec["paths"]
    assert "ETag" in paths["/tasks/{task_id}"]["get"]["responses"]["200"]["headers"]
    assert "304" in paths["/tasks/{task_id}"]["get"]["responses"]
    for method in ("put", "delete"):
        operation = paths["/tasks/{task_id}"][method]
        assert "If-Match" in {p["name"] for p in operation["parameters"]}
        assert "412" in operation["responses"]
    created = paths["/tasks/{task_id}/conversations/"]["post"]["responses"]["201"]
    assert "Location" in created["headers"]
    assert "get" in paths["/conversations/{conversation_id}"]


def test_a_conditional_cancel_and_retry(client: FlaskClient, db_conn: psycopg.Connection) -> None:
    """Cancel and retry are writes too: a stale tag changes nothing, a current one acts."""
    task_id = create_task(client, "a").get_json()["id"]
    tag = etag_of(client, task_id)
    client.put(f"/tasks/{task_id}", json={"priority": 5})
    before = dump_tables(db_conn)
    assert_problem(client.post(f"/tasks/{task_id}/cancel", headers={"If-Match": tag}), 412)
    assert dump_tables(db_conn) == before

    cancelled = client.post(
        f"/tasks/{task_id}/cancel", headers={"If-Match": etag_of(client, task_id)}
    )
    assert cancelled.status_code == 200 and cancelled.get_json()["status"] == "cancelled"
    assert_problem(client.post(f"/tasks/{task_id}/retry", headers={"If-Match": tag}), 412)
    assert client.get(f"/tasks/{task_id}").get_json()["status"] == "cancelled"
    retried = client.post(
        f"/tasks/{task_id}/retry", headers={"If-Match": cancelled.headers["ETag"]}
    )
    assert retried.status_code == 200 and retried.get_json()["status"] == "pending"
    # A missing task stays a 404; a state that forbids the action stays a 409.
    assert_problem(client.post("/tasks/999/cancel", headers={"If-Match": "*"}), 404)
    assert_problem(client.post(f"/tasks/{task_id}/retry", headers={"If-Match": "*"}), 409)
