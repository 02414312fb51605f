"""The `taskapp` command line, run as the installed console script against real gunicorn.

One instance serves the module (API keys on, so every command sends one): its `default` queue
runs tasks at once, `doomed` fails every task, and nobody serves `parked`, whose tasks stay
pending. Each test starts from empty tables (conftest's truncation).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from taskapp import services
from taskapp.database import Database
from tests.support import Instance, wait_for
from tools.gunicorn_process import free_port

# The venv's console script, as tools/venv.sh installs it (pip install -e . --no-deps).
TASKAPP = Path(sys.executable).with_name("taskapp")
API_KEY = "cli-test-key"
# These start the command as a process against gunicorn: the slow tier.
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def service(database_url: str) -> Iterator[Instance]:
    instance = Instance(
        database_url,
        API_KEYS=API_KEY,
        WORKER_QUEUES="default:2,doomed:1",
        QUEUE_PROCESSORS="doomed=tests.processors:always_fail",
        POLL_INTERVAL_SECONDS=0.2,
    )
    instance.start()
    yield instance
    instance.stop(timeout=20)


def run(
    service: Instance | None, *args: str, stdin: str | None = None, key: str | None = API_KEY
) -> subprocess.CompletedProcess[str]:
    """`taskapp ARGS` with TASKAPP_URL (and TASKAPP_API_KEY) pointing at the service."""
    assert TASKAPP.exists(), f"{TASKAPP} is missing: tools/venv.sh installs it (./test.sh)"
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    if service is not None:
        env["TASKAPP_URL"] = service.url
    if key is not None:
        env["TASKAPP_API_KEY"] = key
    return subprocess.run(
        [str(TASKAPP), *args], input=stdin, env=env, capture_output=True, text=True, timeout=60
    )


def ok(service: Instance, *args: str, stdin: str | None = None) -> str:
    result = run(service, *args, stdin=stdin)
    assert (result.returncode, result.stderr) == (0, ""), result
    return result.stdout


def ok_json(service: Instance, *args: str, stdin: str | None = None) -> Any:
    return json.loads(ok(service, *args, "--json", stdin=stdin))


def fails(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The one line a failed command wrote on stderr (and nothing on stdout, no traceback)."""
    assert result.returncode == code, result
    assert result.stdout == "", result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("taskapp: "), result.stderr
    return lines[0]


def api(service: Instance, method: str, path: str, **kwargs: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return requests.request(method, service.url + path, headers=headers, timeout=10, **kwargs)


def task(service: Instance, task_id: int) -> dict[str, Any]:
    response = api(service, "GET", f"/tasks/{task_id}")
    assert response.status_code == 200, response.text
    return response.json()


def make(service: Instance, title: str, **fields: Any) -> dict[str, Any]:
    response = api(service, "POST", "/tasks/", json={"title": title, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def wait_status(service: Instance, task_id: int, status: str) -> dict[str, Any]:
    return wait_for(
        lambda: (found := task(service, task_id))["status"] == status and found,
        what=f"task {task_id} {status}",
    )


# -- set-up ------------------------------------------------------------------------------------


@slow
def test_the_console_script_is_installed_and_names_every_verb() -> None:
    result = run(None, "--help", key=None)
    assert result.returncode == 0, result
    verbs = re.findall(r"^  (\w+)  ", result.stdout, re.MULTILINE)
    assert set(verbs) == {
        "create",
        "list",
        "show",
        "retry",
        "cancel",
        "tail",
        "queues",
        "pause",
        "resume",
        "prune",
    }
    assert "TASKAPP_URL" in result.stdout


# -- create ------------------------------------------------------------------------------------


@slow
def test_create_sends_every_field_and_conversations_from_options_and_a_json_lines_file(
    service: Instance, tmp_path: Path
) -> None:
    lines = tmp_path / "conversations.jsonl"
    lines.write_text('{"content": "from the file"}\n\n"a plain string"\n', encoding="utf-8")
    created = ok_json(
        service,
        "create",
        "Summarise feedback",
        "--description",
        "twice",
        "--priority",
        "7",
        "--queue",
        "parked",
        "--key",
        "team-a",
        "--max-attempts",
        "5",
        "--timeout-seconds",
        "30",
        "--scheduled-for",
        "2030-01-01T22:00:00+00:00",
        "-c",
        "from an option",
        "--conversations",
        str(lines),
    )
    stored = task(service, created["id"])
    assert created == stored
    expected = {
        "title": "Summarise feedback",
        "description": "twice",
        "priority": 7,
        "queue": "parked",
        "concurrency_key": "team-a",
        "max_attempts": 5,
        "timeout_seconds": 30,
        "scheduled_for": "2030-01-01T22:00:00+00:00",
        "status": "pending",
    }
    assert {name: stored[name] for name in expected} == expected
    contents = [c["content"] for c in stored["conversations"]]
    assert contents == ["from an option", "from the file", "a plain string"]


@slow
def test_create_reads_a_json_array_from_stdin_and_says_what_it_made(service: Instance) -> None:
    stdin = json.dumps([{"content": "één"}, "two"])
    out = ok(service, "create", "From stdin", "--queue", "parked", "-f", "-", stdin=stdin)
    assert out == "created task 1: pending in queue parked, 2 conversations\n"
    assert [c["content"] for c in task(service, 1)["conversations"]] == ["één", "two"]


@slow
def test_create_with_an_idempotency_key_creates_once(service: Instance) -> None:
    args = ("create", "Charge order 1234", "-q", "parked", "--idempotency-key", "order-1234")
    first, again = ok_json(service, *args), ok_json(service, *args)
    assert first == again
    assert ok_json(service, "list")["total"] == 1


@slow
@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"content": "fine"}\n{"content": \n', "conversations.jsonl line 2: not JSON"),
        ("[1, 2", "conversations.jsonl line 1: not a JSON array"),
        ('["fine", 3]', "conversations.jsonl item 2: a conversation is a string or an object"),
        ("\n\n", "conversations.jsonl holds no conversations"),
    ],
)
def test_a_bad_conversations_file_is_one_line_naming_where_and_creates_nothing(
    service: Instance, tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "conversations.jsonl"
    path.write_text(content, encoding="utf-8")
    line = fails(run(service, "create", "Bad file", "-f", str(path)), code=2)
    assert message in line and "'--conversations'" in line
    assert api(service, "GET", "/tasks/").json() == []


@slow
def test_a_missing_conversations_file_is_one_line(service: Instance, tmp_path: Path) -> None:
    line = fails(run(service, "create", "x", "-f", str(tmp_path / "nope.json")), code=2)
    assert "nope.json" in line and "No such file" in line


@slow
def test_invalid_fields_are_the_services_422_naming_each_field(service: Instance) -> None:
    result = run(service, "create", "   ", "--max-attempts", "0", "-c", "")
    line = fails(result)
    assert line.endswith("(422 Unprocessable Entity)"), line
    for field in ("title: Must not be blank", "max_attempts:", "conversations.0.content:"):
        assert field in line, line


# -- list and show -----------------------------------------------------------------------------


@slow
def test_list_filters_by_status_and_queue_and_pages(service: Instance) -> None:
    for n in range(5):
        make(service, f"parked {n}", queue="parked", conversations=[{"content": "c"}] * n)
    cancelled = make(service, "cancelled one", queue="parked")
    api(service, "POST", f"/tasks/{cancelled['id']}/cancel").raise_for_status()

    page = ok_json(service, "list", "--status", "pending", "--queue", "parked", "--limit", "2")
    assert (page["total"], page["offset"]) == (5, 0)
    assert [t["id"] for t in page["tasks"]] == [1, 2]
    page = ok_json(service, "list", "-s", "pending", "--limit", "2", "--offset", "4")
    assert [t["id"] for t in page["tasks"]] == [5]
    assert [t["id"] for t in ok_json(service, "list", "--status", "cancelled")["tasks"]] == [6]
    assert ok_json(service, "list", "--queue", "elsewhere") == {
        "total": 0,
        "offset": 0,
        "tasks": [],
    }
    every = ok_json(service, "list", "--all", "--queue", "parked")
    assert [t["id"] for t in every["tasks"]] == [1, 2, 3, 4, 5, 6]

    table = ok(service, "list", "--queue", "parked", "--limit", "3", "--offset", "1")
    header, *rows, footer = table.splitlines()
    assert header.split() == [
        "ID",
        "STATUS",
        "QUEUE",
        "PRIORITY",
        "ATTEMPTS",
        "CONVS",
        "UPDATED",
        "TITLE",
    ]
    assert [row.split()[:6] for row in rows] == [
        [str(n), "pending", "parked", "0", "0/3", str(n - 1)] for n in (2, 3, 4)
    ]
    assert rows[0].endswith("parked 1")
    assert footer == "tasks 2-4 of 6 (next: --offset 4)"
    assert ok(service, "list", "--queue", "elsewhere") == "no tasks\n"


@slow
def test_show_prints_a_task_and_json_is_the_apis_document(service: Instance) -> None:
    created = make(
        service,
        "Process feedback",
        description="Analyse it",
        queue="parked",
        conversations=[{"content": "The app is slow"}, {"content": "New features"}],
    )
    assert ok_json(service, "show", str(created["id"])) == task(service, created["id"])
    text = ok(service, "show", str(created["id"]))
    assert text.startswith("task 1: Process feedback\n")
    assert re.search(r"^status +pending, attempt 0 of 3$", text, re.MULTILINE)
    assert re.search(r"^queue +parked$", text, re.MULTILINE)
    assert re.search(r"^description +Analyse it$", text, re.MULTILINE)
    assert "\n2 conversations\n" in text
    assert re.search(r"^ +1 +active +- +The app is slow", text, re.MULTILINE)


@slow
def test_show_of_a_failed_task_lists_its_failed_attempts(service: Instance) -> None:
    doomed = make(service, "doomed", queue="doomed", max_attempts=1)
    wait_status(service, doomed["id"], "failed")
    text = ok(service, "show", str(doomed["id"]))
    assert re.search(r"^status +failed, attempt 1 of 1$", text, re.MULTILINE)
    assert "\n1 failed attempt\n" in text
    assert "ProcessorError: task 1 cannot be processed" in text


@slow
def test_an_unknown_id_is_the_services_404_in_one_line(service: Instance) -> None:
    for args in (["show", "999"], ["retry", "999"], ["cancel", "999"]):
        assert fails(run(service, *args)) == "taskapp: Task 999 does not exist (404 Not Found)"
    assert fails(run(service, "show", "999", "--json")).endswith("(404 Not Found)")
    line = fails(run(service, "show", "abc"), code=2)
    assert "'abc' is not a valid integer" in line and "taskapp show --help" in line


# -- retry and cancel --------------------------------------------------------------------------


@slow
def test_retry_one_task_and_every_failed_one(service: Instance) -> None:
    doomed = [make(service, f"doomed {n}", queue="doomed", max_attempts=1) for n in range(3)]
    for created in doomed:
        wait_status(service, created["id"], "failed")
    completed = make(service, "done")
    wait_status(service, completed["id"], "completed")

    retried = ok_json(service, "retry", str(completed["id"]))
    assert (retried["id"], retried["status"], retried["attempts"]) == (4, "pending", 0)
    wait_status(service, completed["id"], "completed")
    assert ok(service, "retry", str(completed["id"])) == "task 4: pending\n"

    assert ok_json(service, "retry", "--all-failed", "--queue", "default") == {
        "retried": [],
        "skipped": [],
    }
    assert ok_json(service, "retry", "--all-failed") == {"retried": [1, 2, 3], "skipped": []}
    # Each ran again, and failed again: two failed attempts in its history.
    for created in doomed:
        wait_for(lambda c=created: len(task(service, c["id"])["errors"]) == 2)
        wait_status(service, created["id"], "failed")
    out = ok(service, "retry", "--all-failed", "--queue", "doomed")
    assert out == "retried 3 failed tasks in queue doomed\n"


@slow
def test_cancel_one_task_and_every_pending_one_of_a_queue(service: Instance) -> None:
    parked = [make(service, f"parked {n}", queue="parked") for n in range(3)]
    other = make(service, "elsewhere", queue="nobody-serves-this-either")

    cancelled = ok_json(service, "cancel", str(parked[0]["id"]))
    assert (cancelled["id"], cancelled["status"]) == (1, "cancelled")
    assert ok(service, "cancel", "--all-pending", "--queue", "parked") == (
        "cancelled 2 pending tasks in queue parked\n"
    )
    assert [task(service, t["id"])["status"] for t in parked] == ["cancelled"] * 3
    assert task(service, other["id"])["status"] == "pending"
    assert ok_json(service, "cancel", "--all-pending") == {"cancelled": [4], "skipped": []}


@slow
def test_cancelling_a_finished_task_is_the_services_409(service: Instance) -> None:
    doomed = make(service, "doomed", queue="doomed", max_attempts=1)
    wait_status(service, doomed["id"], "failed")
    line = fails(run(service, "cancel", str(doomed["id"])))
    assert line == (
        "taskapp: Task 1 is failed; only pending or processing tasks can be cancelled "
        "(409 Conflict)"
    )


@slow
def test_retry_and_cancel_take_an_id_or_the_bulk_flag(service: Instance) -> None:
    assert "give a task ID or --all-failed" in fails(run(service, "retry"), code=2)
    assert "not both" in fails(run(service, "retry", "1", "--all-failed"), code=2)
    assert "--queue goes with --all-pending" in fails(
        run(service, "cancel", "1", "--queue", "x"), code=2
    )


# -- queues ------------------------------------------------------------------------------------


@slow
def test_queues_pause_and_resume(service: Instance) -> None:
    for n in range(2):
        make(service, f"parked {n}", queue="parked")
    table = ok(service, "queues")
    header, *rows = table.splitlines()
    assert header.split()[:7] == [
        "QUEUE",
        "PAUSED",
        "PENDING",
        "PROCESSING",
        "COMPLETED",
        "FAILED",
        "CANCELLED",
    ]
    parked = next(row for row in rows if row.startswith("parked"))
    assert parked.split()[:7] == ["parked", "-", "2", "0", "0", "0", "0"]
    # Queues holding tasks or configured: the empty tables hold parked's two tasks alone.
    assert [queue["name"] for queue in ok_json(service, "queues")] == ["parked"]

    assert ok(service, "pause", "parked") == "queue parked: paused\n"
    assert ok_json(service, "queues", "parked")["paused"] is True
    assert ok(service, "queues", "parked").splitlines()[1].split()[:3] == ["parked", "paused", "2"]
    resumed = ok_json(service, "resume", "parked")
    assert (resumed["name"], resumed["paused"]) == ("parked", False)
    assert ok_json(service, "pause", "parked")["paused"] is True
    assert ok(service, "resume", "parked") == "queue parked: running\n"


# -- prune -------------------------------------------------------------------------------------


@slow
def test_prune_deletes_finished_tasks_older_than_the_duration(
    service: Instance, db_conn: psycopg.Connection
) -> None:
    done = [make(service, f"done {n}", conversations=[{"content": "c"}]) for n in range(3)]
    doomed = make(service, "doomed", queue="doomed", max_attempts=1)
    for created in done:
        wait_status(service, created["id"], "completed")
    wait_status(service, doomed["id"], "failed")
    waiting = make(service, "waiting", queue="parked")
    # Two completed and the failed one last changed two days ago; one completed just now.
    db_conn.execute(
        "UPDATE tasks SET updated_at = now() - interval '2 days' WHERE id IN (1, 2, %s)",
        (doomed["id"],),
    )
    db_conn.execute("UPDATE tasks SET updated_at = now() - interval '2 days' WHERE id = %s", (5,))

    assert ok_json(service, "prune", "--older-than", "1d", "--status", "completed") == {
        "deleted": {"completed": 2},
        "total": 2,
    }
    out = ok(service, "prune", "--older-than", "1d12h")
    assert out == "deleted 1 finished task (completed 0, failed 1, cancelled 0)\n"
    remaining = [t["id"] for t in api(service, "GET", "/tasks/").json()]
    assert remaining == [3, waiting["id"]]  # the recent one and the pending one (old as it is)
    assert api(service, "GET", "/tasks/1/conversations/").status_code == 404
    assert ok_json(service, "prune", "--older-than", "0")["deleted"] == {
        "completed": 1,
        "failed": 0,
        "cancelled": 0,
    }


@slow
def test_prune_refuses_a_malformed_duration(service: Instance) -> None:
    for duration in ("7 days", "1x", "-1d", ""):
        line = fails(run(service, "prune", "--older-than", duration), code=2)
        assert "is not a duration such as 90s, 30m, 12h, 7d or 1h30m" in line


def test_a_prune_request_deletes_for_its_budget_and_says_whether_it_is_done(
    gateway: Database, db_conn: psycopg.Connection
) -> None:
    db_conn.execute(
        "INSERT INTO tasks (title, status, updated_at, created_at, max_attempts, run_after,"
        " queue, priority, attempts, deferrals)"
        " SELECT 't' || n, 'completed', now() - interval '1 hour', now(), 3, now(), 'default',"
        " 0, 1, 0 FROM generate_series(1, 2500) AS n"
    )
    prune = {"database": gateway, "statuses": ["completed", "failed"], "older_than_seconds": 60}
    # No time at all: one batch of 1,000, and more to do.
    first = services.prune_tasks(**prune, budget_seconds=0)
    assert (first.deleted, first.done) == ({"completed": 1000, "failed": 0}, False)
    rest = services.prune_tasks(**prune)
    assert (rest.deleted, rest.done) == ({"completed": 1500, "failed": 0}, True)
    assert db_conn.execute("SELECT count(*) FROM tasks").fetchone() == (0,)


def test_the_prune_endpoint_validates_its_body(client: Any) -> None:
    answer = client.post("/tasks/prune", json={"older_than_seconds": -1, "statuses": ["pending"]})
    assert answer.status_code == 422
    assert set(answer.get_json()["errors"]) == {"older_than_seconds", "statuses.0"}
    assert client.post("/tasks/prune", json={"statuses": []}).get_json()["errors"] == {
        "older_than_seconds": ["Missing data for required field."],
        "statuses": ["Shorter than minimum length 1."],
    }
    answer = client.post("/tasks/prune/", json={"older_than_seconds": 0})
    assert answer.get_json() == {
        "deleted": {"completed": 0, "failed": 0, "cancelled": 0},
        "done": True,
    }


# -- tail --------------------------------------------------------------------------------------


def _streams_open(service: Instance) -> int:
    metrics = api(service, "GET", "/metrics").text
    (value,) = re.findall(r"^taskapp_event_streams_open (\S+)$", metrics, re.MULTILINE)
    return int(float(value))


# The tail as a terminal starts it: Ctrl-C (SIGINT) on. A suite started in the background (`&`
# in a script, a CI runner's job) inherits SIGINT ignored, and so would the tail: Python leaves
# an ignored SIGINT ignored, and the Ctrl-C test would wait for ever. An ignored disposition
# survives exec, a default one too: the launcher sets it and becomes the tail.
WITH_CTRL_C = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])",
]


def _start_tail(service: Instance, *args: str) -> subprocess.Popen[str]:
    # An earlier test's stream may still hold its slot for a second after its client left.
    wait_for(lambda: _streams_open(service) == 0, what="no stream open")
    env = {"PATH": "/usr/bin:/bin", "TASKAPP_URL": service.url, "TASKAPP_API_KEY": API_KEY}
    process = subprocess.Popen(
        [*WITH_CTRL_C, str(TASKAPP), "tail", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: _streams_open(service) == 1, what="the tail's stream")
    return process


@slow
def test_tail_json_prints_each_event_as_a_line_and_stops_after_count(service: Instance) -> None:
    process = _start_tail(service, "--json", "--count", "3")
    created = make(service, "watched")
    out, err = process.communicate(timeout=20)
    assert (process.returncode, err) == (0, "")
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in events] == ["task.created", "task.claimed", "task.completed"]
    assert {e["task_id"] for e in events} == {created["id"]}


@slow
def test_tail_of_one_task_prints_its_events_as_lines_for_people(service: Instance) -> None:
    make(service, "before", queue="parked")
    process = _start_tail(service, "2", "--count", "2")
    make(service, "followed", queue="parked")  # task 2
    make(service, "not followed", queue="parked")
    api(service, "POST", "/tasks/2/cancel").raise_for_status()
    out, err = process.communicate(timeout=20)
    assert (process.returncode, err) == (0, "")
    lines = out.splitlines()
    assert [line.split()[1:5] for line in lines] == [
        ["task.created", "task", "2", "pending"],
        ["task.cancelled", "task", "2", "cancelled"],
    ]
    assert re.match(r"\d\d:\d\d:\d\d\.\d{3}Z  task\.created ", lines[0]), lines[0]


@slow
def test_tail_ends_cleanly_on_ctrl_c(service: Instance) -> None:
    process = _start_tail(service)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=20)
    assert (process.returncode, out, err) == (0, "", "")
    wait_for(lambda: _streams_open(service) == 0, what="the stream's slot back")


def test_tail_follows_the_service_through_a_restart(instances: Any) -> None:
    port = free_port()
    first = instances(port=port, WORKER_ENABLED=0)
    process = _start_tail(first, "--json", "--count", "3")
    assert process.stdout is not None
    make(first, "before the restart", queue="parked")  # the module's instance may be running
    assert json.loads(process.stdout.readline())["task_id"] == 1
    first.stop(timeout=20)  # a SIGTERM ends the stream; the tail tries again
    second = instances(port=port, WORKER_ENABLED=0)
    # A new instance never heard the old one's event ids: the tail is told to re-fetch
    # (stream.reset, README "Events"), then follows the live events.
    assert json.loads(process.stdout.readline())["type"] == "stream.reset"
    make(second, "after the restart", queue="parked")
    out, err = process.communicate(timeout=30)
    assert (process.returncode, err) == (0, ""), err
    (event,) = [json.loads(line) for line in out.splitlines()]
    assert (event["type"], event["task_id"]) == ("task.created", 2)


@slow
def test_tail_of_an_unreachable_service_is_one_line(service: Instance) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    line = fails(run(None, "--url", dead, "tail"))
    assert line == f"taskapp: cannot reach {dead}: connection refused"


# -- errors common to every command ------------------------------------------------------------


@slow
def test_an_unreachable_url_is_one_line_for_every_command() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    commands = [
        ["create", "x"],
        ["list"],
        ["show", "1"],
        ["retry", "1"],
        ["retry", "--all-failed"],
        ["cancel", "1"],
        ["queues"],
        ["pause", "q"],
        ["resume", "q"],
        ["prune", "--older-than", "1d"],
    ]
    argvs = [[*command, *extra] for command in commands for extra in ([], ["--json"])]
    # Twenty processes, two at a time (each is mostly Python's start-up and the imports).
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda argv: run(None, "--url", dead, *argv), argvs))
    for argv, result in zip(argvs, results, strict=True):
        line = fails(result)
        assert line == f"taskapp: cannot reach {dead}: connection refused", argv


@slow
def test_a_missing_or_wrong_api_key_is_the_services_401(service: Instance) -> None:
    line = fails(run(service, "list", key=None))
    assert line.startswith("taskapp: A valid API key is required") and "(401 Unauthorized)" in line
    assert "(401 Unauthorized)" in fails(run(service, "tail", key="wrong"))


@slow
def test_a_url_that_is_not_taskapp_or_not_http_is_one_line(service: Instance) -> None:
    line = fails(run(None, "--url", "ftp://example.com", "list"))
    assert line == "taskapp: not an http:// or https:// URL: 'ftp://example.com'"
    # The spec is JSON, but GET /nope is the service's 404 problem, not a traceback.
    assert fails(run(None, "--url", service.url + "/nope", "list")).endswith("(404 Not Found)")


def test_every_readme_example_names_real_verbs_and_options() -> None:
    import shlex

    from click.testing import CliRunner

    from taskapp.cli import cli

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Command line\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    examples = []
    for line in block.splitlines():
        for part in re.split(r"\||&&", line.split("  #", 1)[0]):
            words = shlex.split(part)
            if words and words[0] == "taskapp":
                examples.append(words[1:])
    assert {words[0] for words in examples} >= set(cli.commands) - {"resume"}

    def parses(words: list[str]) -> bool:
        # --help is eager: it answers once every option is known, before values are used.
        return CliRunner().invoke(cli, [*words, "--help"]).exit_code == 0

    for words in examples:
        assert parses(words), words
    assert not parses(["list", "--no-such-option"])
