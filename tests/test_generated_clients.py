"""Clients generated from the live spec by two generators nobody here wrote do the seed's whole
walkthrough against a real instance: create with conversations, get, list with filters,
update, add and change a conversation, cancel and retry, delete, with the headers (Location,
ETag, If-Match, X-Total-Count) and the errors' problem bodies.

openapi-python-client (attrs + httpx) and openapi-generator's `python` generator (pydantic +
urllib3, on the machine's Java) each generate once per session, from /apispec_1.json of a
running instance, with their warnings treated as failures.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import requests

from tests.support import Instance

API_KEY = "generated-client-key"
OPC_PACKAGE, OAG_PACKAGE = "taskapp_opc", "taskapp_oag"
# openapi-generator says this of every document, the smallest included: not about ours.
OAG_NOISE = "Failed to get the schema name: null"


def _run(command: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(process: subprocess.Popen[str], what: str) -> str:
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, f"{what} failed:\n{output[-5000:]}"
    return output


@pytest.fixture(scope="session")
def clients(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ModuleType, ModuleType]]:
    """Both clients, generated (at once) from an instance's live spec and imported."""
    assert shutil.which("java"), "openapi-generator needs Java: apt-get install default-jre"
    root = tmp_path_factory.mktemp("generated-clients")
    instance = Instance(database_url, WORKER_ENABLED=0, API_KEYS=API_KEY).start()
    try:
        spec_url = f"{instance.url}/apispec_1.json"
        # Generated from the URL, as a user would: the spec as the service serves it.
        (root / "opc.yaml").write_text("post_hooks: []\n")  # no ruff over the output: faster
        opc = _run(
            [
                str(Path(sys.executable).with_name("openapi-python-client")),
                "generate",
                "--url",
                spec_url,
                "--meta",
                "none",
                "--config",
                "opc.yaml",
                "--fail-on-warning",
                "--output-path",
                OPC_PACKAGE,
            ],
            root,
        )
        oag = _run(
            [
                str(Path(sys.executable).with_name("openapi-generator-cli")),
                "generate",
                "--input-spec",
                spec_url,
                "--generator-name",
                "python",
                "--output",
                "oag",
                "--package-name",
                OAG_PACKAGE,
                "--global-property",
                "apiTests=false,modelTests=false,apiDocs=false,modelDocs=false",
            ],
            root,
        )
        opc_output = _finish(opc, "openapi-python-client")
        oag_output = _finish(oag, "openapi-generator")
    finally:
        instance.stop()
    assert "Warning" not in opc_output, opc_output
    warnings = [
        line for line in oag_output.splitlines() if "WARN" in line and OAG_NOISE not in line
    ]
    assert warnings == [], "\n".join(warnings)
    sys.path[:0] = [str(root), str(root / "oag")]
    try:
        yield importlib.import_module(OPC_PACKAGE), importlib.import_module(OAG_PACKAGE)
    finally:
        sys.path.remove(str(root))
        sys.path.remove(str(root / "oag"))
        for name in list(sys.modules):
            if name.split(".")[0] in {OPC_PACKAGE, OAG_PACKAGE}:
                del sys.modules[name]


@pytest.fixture
def service(instances: Callable[..., Instance]) -> Instance:
    """An instance that processes at once, with API keys, on a fresh database."""
    return instances(API_KEYS=API_KEY, POLL_INTERVAL_SECONDS="0.2")


def eventually(read: Callable[[], Any], done: Callable[[Any], bool], what: str) -> Any:
    """Poll read() until done(its value); return the value."""
    deadline = time.monotonic() + 20
    while True:
        value = read()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {value}"
        time.sleep(0.05)


def operations(tag: str, *names: str) -> SimpleNamespace:
    """openapi-python-client's modules of a tag's operations, by name."""
    package = f"{OPC_PACKAGE}.api.{tag}"
    return SimpleNamespace(**{n: importlib.import_module(f"{package}.{n}") for n in names})


def is_problem(response_headers: Any, body: Any, status: int, kind: str) -> None:
    assert response_headers["Content-Type"] == "application/problem+json"
    # openapi-python-client names the member `type_` (`type` is a builtin); pydantic `type`.
    assert (getattr(body, "type_", None) or body.type) == f"/problems/{kind}"
    assert body.status == status
    assert body.title and body.detail


def test_openapi_python_client_does_the_walkthrough(
    clients: tuple[ModuleType, ModuleType], service: Instance
) -> None:
    opc, _ = clients
    # One module per operation, in its tag's package.
    tasks = operations(
        "tasks",
        "create_task",
        "get_task",
        "list_tasks",
        "update_task",
        "delete_task",
        "retry_task",
        "cancel_task",
    )
    conversations = operations(
        "conversations",
        "create_conversation",
        "get_conversation",
        "list_conversations",
        "update_conversation",
    )
    models = importlib.import_module(f"{OPC_PACKAGE}.models")
    client = opc.AuthenticatedClient(base_url=service.url, token=API_KEY)

    # No key: a 401 problem, with its challenge.
    anonymous = tasks.list_tasks.sync_detailed(client=opc.Client(base_url=service.url))
    assert anonymous.status_code == 401 and "WWW-Authenticate" in anonymous.headers
    is_problem(anonymous.headers, anonymous.parsed, 401, "unauthorized")

    # Create a task with conversations: 201, Location, ETag, typed fields.
    body = models.TaskCreate(
        title="Process customer feedback",
        description="Analyze and respond to customer feedback",
        conversations=[
            models.ConversationCreate(content="Customer says the app is slow"),
            models.ConversationCreate(content="Customer wants new features"),
        ],
    )
    created = tasks.create_task.sync_detailed(client=client, body=body)
    assert created.status_code == 201, created.content
    task = created.parsed
    assert isinstance(task, models.TaskOut) and task.status == models.TaskOutStatus.PENDING
    assert created.headers["Location"] == f"/tasks/{task.id}"
    assert [c.content for c in task.conversations] == [
        "Customer says the app is slow",
        "Customer wants new features",
    ]
    assert task.created_at.tzinfo is not None and task.scheduled_for is None

    # It is processed; get it, and list with filters.
    done = eventually(
        lambda: tasks.get_task.sync_detailed(task.id, client=client),
        lambda r: r.parsed.status == models.TaskOutStatus.COMPLETED,
        "the task to complete",
    )
    assert all(
        c.status == models.ConversationOutStatus.PROCESSED for c in done.parsed.conversations
    )
    tag = done.headers["ETag"]
    unchanged = tasks.get_task.sync_detailed(task.id, client=client, if_none_match=tag)
    assert unchanged.status_code == 304
    page = tasks.list_tasks.sync_detailed(
        client=client, status=models.ListTasksStatus.COMPLETED, limit=10, offset=0
    )
    assert page.status_code == 200 and page.headers["X-Total-Count"] == "1"
    assert [(t.id, t.conversation_count) for t in page.parsed] == [(task.id, 2)]
    assert tasks.list_tasks.sync(client=client, status=models.ListTasksStatus.FAILED) == []

    # Update it if nobody else did; a second writer with the same tag is told (412).
    changes = models.TaskUpdate(title="Updated Title", description="Updated Description")
    updated = tasks.update_task.sync_detailed(task.id, client=client, body=changes, if_match=tag)
    assert updated.status_code == 200 and updated.parsed.title == "Updated Title"
    assert updated.headers["ETag"] != tag
    stale = tasks.update_task.sync_detailed(
        task.id, client=client, body=models.TaskUpdate(priority=5), if_match=tag
    )
    assert stale.status_code == 412
    is_problem(stale.headers, stale.parsed, 412, "precondition-failed")

    # Add a conversation: 201 with its Location, which the client can GET; change it.
    added = conversations.create_conversation.sync_detailed(
        task.id, client=client, body=models.ConversationCreate(content="New conversation")
    )
    assert added.status_code == 201
    assert added.headers["Location"] == f"/conversations/{added.parsed.id}"
    fetched = conversations.get_conversation.sync(added.parsed.id, client=client)
    assert fetched == added.parsed
    changed = conversations.update_conversation.sync(
        added.parsed.id, client=client, body=models.ConversationUpdate(content="Updated")
    )
    assert changed.content == "Updated"
    listed = conversations.list_conversations.sync(task.id, client=client)
    assert [c.id for c in listed] == [*(c.id for c in task.conversations), added.parsed.id]

    # Retry the completed task; cancel one scheduled for later; cancelling it again is a 409.
    retried = tasks.retry_task.sync(task.id, client=client)
    assert retried.status == models.TaskOutStatus.PENDING and retried.attempts == 0
    later = tasks.create_task.sync(
        client=client,
        body=models.TaskCreate(
            title="Tonight",
            scheduled_for=datetime(2030, 1, 1, 22, tzinfo=UTC),
        ),
    )
    assert later.scheduled_for.year == 2030
    cancelled = tasks.cancel_task.sync_detailed(later.id, client=client)
    assert cancelled.parsed.status == models.TaskOutStatus.CANCELLED
    assert cancelled.headers["Content-Location"] == f"/tasks/{later.id}"
    again = tasks.cancel_task.sync_detailed(later.id, client=client)
    assert again.status_code == 409
    is_problem(again.headers, again.parsed, 409, "invalid-state")

    # Invalid input names the field; a missing task is a 404.
    invalid = tasks.create_task.sync_detailed(client=client, body=models.TaskCreate(title=""))
    assert invalid.status_code == 422
    is_problem(invalid.headers, invalid.parsed, 422, "validation")
    assert "title" in invalid.parsed.errors.additional_properties

    # Delete it with its current tag: 204, then it is gone.
    current = tasks.get_task.sync_detailed(task.id, client=client).headers["ETag"]
    deleted = tasks.delete_task.sync_detailed(task.id, client=client, if_match=current)
    assert deleted.status_code == 204
    missing = tasks.get_task.sync_detailed(task.id, client=client)
    assert missing.status_code == 404
    is_problem(missing.headers, missing.parsed, 404, "not-found")


def test_openapi_generator_client_does_the_walkthrough(
    clients: tuple[ModuleType, ModuleType], service: Instance
) -> None:
    _, oag = clients
    exceptions = importlib.import_module(f"{OAG_PACKAGE}.exceptions")
    api = oag.ApiClient(oag.Configuration(host=service.url, access_token=API_KEY))
    tasks, conversations = oag.TasksApi(api), oag.ConversationsApi(api)

    with pytest.raises(exceptions.UnauthorizedException) as refused:
        oag.TasksApi(oag.ApiClient(oag.Configuration(host=service.url))).list_tasks()
    is_problem(refused.value.headers, refused.value.data, 401, "unauthorized")

    body = oag.TaskCreate(
        title="Process customer feedback",
        description="Analyze and respond to customer feedback",
        conversations=[
            oag.ConversationCreate(content="Customer says the app is slow"),
            oag.ConversationCreate(content="Customer wants new features"),
        ],
    )
    created = tasks.create_task_with_http_info(body)
    task = created.data
    assert created.status_code == 201 and isinstance(task, oag.TaskOut)
    assert created.headers["Location"] == f"/tasks/{task.id}"
    assert task.status == "pending" and len(task.conversations) == 2

    done = eventually(
        lambda: tasks.get_task_with_http_info(task.id),
        lambda r: r.data.status == "completed",
        "the task to complete",
    )
    assert all(c.status == "processed" for c in done.data.conversations)
    tag = done.headers["ETag"]
    page = tasks.list_tasks_with_http_info(status="completed", limit=10, offset=0)
    assert page.headers["X-Total-Count"] == "1"
    assert [(t.id, t.conversation_count) for t in page.data] == [(task.id, 2)]
    assert tasks.list_tasks(status="failed") == []

    changes = oag.TaskUpdate(title="Updated Title", description="Updated Description")
    updated = tasks.update_task_with_http_info(task.id, changes, if_match=tag)
    assert updated.data.title == "Updated Title" and updated.headers["ETag"] != tag
    with pytest.raises(exceptions.ApiException) as stale:
        tasks.update_task(task.id, oag.TaskUpdate(priority=5), if_match=tag)
    assert stale.value.status == 412
    is_problem(stale.value.headers, stale.value.data, 412, "precondition-failed")

    added = conversations.create_conversation_with_http_info(
        task.id, oag.ConversationCreate(content="New conversation")
    )
    assert added.status_code == 201
    assert added.headers["Location"] == f"/conversations/{added.data.id}"
    assert conversations.get_conversation(added.data.id) == added.data
    changed = conversations.update_conversation(
        added.data.id, oag.ConversationUpdate(content="Updated")
    )
    assert changed.content == "Updated"
    listed = conversations.list_conversations(task.id)
    assert [c.id for c in listed] == [*(c.id for c in task.conversations), added.data.id]

    retried = tasks.retry_task(task.id)
    assert retried.status == "pending" and retried.attempts == 0
    later = tasks.create_task(
        oag.TaskCreate(title="Tonight", scheduled_for=datetime(2030, 1, 1, 22, tzinfo=UTC))
    )
    assert later.scheduled_for == datetime(2030, 1, 1, 22, tzinfo=UTC)
    cancelled = tasks.cancel_task_with_http_info(later.id)
    assert cancelled.data.status == "cancelled"
    assert cancelled.headers["Content-Location"] == f"/tasks/{later.id}"
    with pytest.raises(exceptions.ConflictException) as conflict:
        tasks.cancel_task(later.id)
    is_problem(conflict.value.headers, conflict.value.data, 409, "invalid-state")

    # The generated models check lengths and patterns before sending; what only the service
    # can know is an Idempotency-Key reused with another body: a 422 of its own kind.
    tasks.create_task(oag.TaskCreate(title="Charge order 1234"), idempotency_key="order-1234")
    with pytest.raises(exceptions.UnprocessableEntityException) as reused:
        tasks.create_task(oag.TaskCreate(title="Charge order 9999"), idempotency_key="order-1234")
    is_problem(reused.value.headers, reused.value.data, 422, "idempotency-key-reused")
    assert list(reused.value.data.errors) == ["Idempotency-Key"]

    current = tasks.get_task_with_http_info(task.id).headers["ETag"]
    assert tasks.delete_task_with_http_info(task.id, if_match=current).status_code == 204
    with pytest.raises(exceptions.NotFoundException) as missing:
        tasks.get_task(task.id)
    is_problem(missing.value.headers, missing.value.data, 404, "not-found")
    assert requests.get(f"{service.url}/tasks/{task.id}", timeout=5).status_code == 401
