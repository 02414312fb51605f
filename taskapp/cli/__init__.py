"""`taskapp`, the command line: enqueue, inspect, retry and cancel, watch, prune.

It talks to a running service over its HTTP API (`--url`, `TASKAPP_URL`), so it needs no
database credentials and goes wherever the API goes (through nginx, into a cluster). Tables
for people; `--json` prints the API's own document for scripts (one per command, one line per
event for `tail`). Every failure is a non-zero exit and one line on stderr.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import IO, Any, TypeVar

import click

from ..states import TASK_STATUSES, TERMINAL, TaskStatus
from . import output
from .client import Client, CliError, Event, Stream

# The README's set-up (./run.sh, docker compose) serves on 12000; PORT's 8000 is for an
# instance by hand, and the image's `taskapp` defaults to its own instance's port.
DEFAULT_URL = "http://127.0.0.1:12000"
# GET /tasks/'s largest page, for commands that read every page.
PAGE_LIMIT = 1000
FINISHED = [status.value for status in TERMINAL]
# How long to wait before opening the stream again when the service ended it and said
# nothing (`retry:`) about how long to wait.
RECONNECT_SECONDS = 1.0
# How long a tail whose stream ended keeps trying to open it again (a restart, a rolling
# update) before it gives up with the last error.
RECONNECT_GIVE_UP_SECONDS = 30.0

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Connection:
    """Where the service is: the group's options, the client made only when a command needs
    it (so `taskapp list --help` works whatever --url says)."""

    url: str
    api_key: str | None
    timeout: float

    @cached_property
    def client(self) -> Client:
        return Client(self.url, api_key=self.api_key, timeout=self.timeout)


def _client() -> Client:
    connection = click.get_current_context().find_object(Connection)
    assert connection is not None, "the group's callback makes it"
    return connection.client


def json_option(function: F) -> F:
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print the API's JSON instead of a table (for scripts).",
    )(function)


def _print_json(document: Any) -> None:
    click.echo(json.dumps(document, ensure_ascii=False, indent=2))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--url",
    envvar="TASKAPP_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="The service's base URL (env TASKAPP_URL).",
)
@click.option(
    "--api-key",
    envvar="TASKAPP_API_KEY",
    help="A key of the service's API_KEYS, if it has any (env TASKAPP_API_KEY).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds to wait for each answer.",
)
@click.pass_context
def cli(context: click.Context, url: str, api_key: str | None, timeout: float) -> None:
    """Work with a taskapp service from the shell."""
    context.obj = Connection(url, api_key or None, timeout)


# -- create ------------------------------------------------------------------------------------


def read_conversations(stream: IO[str]) -> list[dict[str, Any]]:
    """Conversations from a JSON array or JSON lines, each an object (`{"content": …}`) or a
    string (its content); a BadParameter naming the line or item that is neither."""
    name = "stdin" if stream.name == "<stdin>" else stream.name
    try:
        text = stream.read()
    except UnicodeDecodeError:
        raise click.BadParameter(f"{name} is not UTF-8 text", param_hint=_FILE_HINT) from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise click.BadParameter(
                f"{name} line {error.lineno}: not a JSON array ({error.msg})",
                param_hint=_FILE_HINT,
            ) from None
        places = [f"{name} item {n}" for n in range(1, len(items) + 1)]
    else:
        items, places = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise click.BadParameter(
                    f"{name} line {number}: not JSON ({error.msg})", param_hint=_FILE_HINT
                ) from None
            places.append(f"{name} line {number}")
    if not items:
        raise click.BadParameter(f"{name} holds no conversations", param_hint=_FILE_HINT)
    return [_conversation(item, place) for item, place in zip(items, places, strict=True)]


_FILE_HINT = "'--conversations'"


def _conversation(item: Any, place: str) -> dict[str, Any]:
    if isinstance(item, str):
        return {"content": item}
    if isinstance(item, dict):
        return item  # the service checks its fields, and names the bad ones
    raise click.BadParameter(
        f'{place}: a conversation is a string or an object with "content", '
        f"not {type(item).__name__}",
        param_hint=_FILE_HINT,
    )


@cli.command()
@click.argument("title")
@click.option("-d", "--description", help="The task's description.")
@click.option("-p", "--priority", type=int, help="Higher runs first (default 0).")
@click.option("-q", "--queue", help="Its queue (default: default).")
@click.option("-k", "--key", "concurrency_key", help="Its concurrency key (a tenant, an API key).")
@click.option("--max-attempts", type=int, help="Attempts before it fails.")
@click.option("--timeout-seconds", type=int, help="Each attempt's time limit.")
@click.option("--scheduled-for", metavar="TIME", help="Not before this ISO 8601 time.")
@click.option(
    "-c", "--conversation", "texts", multiple=True, metavar="TEXT", help="A conversation (repeat)."
)
@click.option(
    "-f",
    "--conversations",
    "conversations_file",
    type=click.File("r", encoding="utf-8"),
    metavar="FILE",
    help="Conversations, a JSON array or JSON lines of strings or objects; - for stdin.",
)
@click.option("--idempotency-key", metavar="KEY", help="Create once, however often repeated.")
@json_option
def create(
    title: str,
    description: str | None,
    priority: int | None,
    queue: str | None,
    concurrency_key: str | None,
    max_attempts: int | None,
    timeout_seconds: int | None,
    scheduled_for: str | None,
    texts: tuple[str, ...],
    conversations_file: IO[str] | None,
    idempotency_key: str | None,
    as_json: bool,
) -> None:
    """Create a task, with conversations from -c, a file or stdin.

    \b
      taskapp create "Summarise feedback" -c "The app is slow" -c "Add dark mode"
      taskapp create "Batch 7" --queue llm --key team-a -f conversations.jsonl
      jq -c '.[]' export.json | taskapp create "Import" -f -
    """
    conversations = [{"content": text} for text in texts]
    if conversations_file is not None:
        conversations += read_conversations(conversations_file)
    body: dict[str, Any] = {
        "title": title,
        "description": description,
        "priority": priority,
        "queue": queue,
        "concurrency_key": concurrency_key,
        "max_attempts": max_attempts,
        "timeout_seconds": timeout_seconds,
        "scheduled_for": scheduled_for,
    }
    body = {name: value for name, value in body.items() if value is not None}
    if conversations:
        body["conversations"] = conversations
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
    task = _client().request("POST", "/tasks/", body=body, headers=headers).body
    if as_json:
        _print_json(task)
        return
    click.echo(
        f"created task {task['id']}: {task['status']} in queue {task['queue']}, "
        f"{output.count(len(task['conversations']), 'conversation')}"
    )


# -- list and show -----------------------------------------------------------------------------


def _pages(client: Client, **query: Any) -> Iterator[dict[str, Any]]:
    """Every task matching the query, a page of PAGE_LIMIT at a time."""
    offset = 0
    while True:
        page = client.request(
            "GET", "/tasks/", query={**query, "limit": PAGE_LIMIT, "offset": offset}
        ).body
        yield from page
        if len(page) < PAGE_LIMIT:
            return
        offset += len(page)


LIST_COLUMNS = ["ID", "STATUS", "QUEUE", "PRIORITY", "ATTEMPTS", "CONVS", "UPDATED", "TITLE"]


def _list_row(task: dict[str, Any]) -> list[Any]:
    return [
        task["id"],
        task["status"],
        task["queue"],
        task["priority"],
        f"{task['attempts']}/{task['max_attempts']}",
        task["conversation_count"],
        output.when(task["updated_at"]),
        task["title"],
    ]


@cli.command("list")
@click.option("-s", "--status", type=click.Choice(TASK_STATUSES), help="Only tasks in this state.")
@click.option("-q", "--queue", help="Only this queue's tasks.")
@click.option("--limit", type=int, default=100, show_default=True, help="Tasks per page.")
@click.option("--offset", type=int, default=0, show_default=True, help="Tasks to skip.")
@click.option("--all", "every_page", is_flag=True, help="Every page, not just one.")
@json_option
def list_tasks(
    status: str | None, queue: str | None, limit: int, offset: int, every_page: bool, as_json: bool
) -> None:
    """List tasks by id, with filters and paging.

    \b
      taskapp list --status failed --queue llm
      taskapp list --limit 20 --offset 40
      taskapp list --all --json | jq '.tasks[].id'
    """
    client = _client()
    filters = {"status": status, "queue": queue}
    if every_page:
        tasks = list(_pages(client, **filters))
        total, offset = len(tasks), 0
    else:
        answer = client.request(
            "GET", "/tasks/", query={**filters, "limit": limit, "offset": offset}
        )
        tasks = answer.body
        total = int(answer.headers.get("X-Total-Count", len(tasks)))
    if as_json:
        _print_json({"total": total, "offset": offset, "tasks": tasks})
        return
    if not tasks:
        click.echo(f"no tasks (of {total:,})" if total else "no tasks")
        return
    click.echo(output.table(LIST_COLUMNS, map(_list_row, tasks), right=("ID", "PRIORITY", "CONVS")))
    shown = f"tasks {offset + 1:,}-{offset + len(tasks):,} of {total:,}"
    if offset + len(tasks) < total:
        shown += f" (next: --offset {offset + len(tasks)})"
    click.echo(shown)


def _show(task: dict[str, Any]) -> str:
    """A task's detail as lines of fields, then its conversations and errors."""
    progress = task.get("progress")
    state = f"{task['status']}, attempt {task['attempts']} of {task['max_attempts']}"
    lines = [
        f"task {task['id']}: {task['title']}",
        output.fields(
            [
                ("status", state),
                ("queue", task["queue"]),
                ("concurrency key", output.cell(task["concurrency_key"])),
                ("priority", task["priority"]),
                ("description", output.cell(task["description"], 200)),
                ("created", output.when(task["created_at"])),
                ("updated", output.when(task["updated_at"])),
                ("scheduled for", output.when(task["scheduled_for"])),
                ("started", output.when(task["started_at"])),
                ("processed", output.when(task["processed_at"])),
                ("instance", output.cell(task["processing_instance_id"])),
                ("last error", output.cell(task["last_error"], 200)),
                ("progress", _progress(progress) if progress else "-"),
                ("result", output.cell(task["result"], 200)),
            ]
        ),
    ]
    conversations = task["conversations"]
    lines.append(f"\n{output.count(len(conversations), 'conversation')}")
    if conversations:
        rows = [
            [c["id"], c["status"], output.when(c["processed_at"]), c["content"], c["result"]]
            for c in conversations
        ]
        headers = ["ID", "STATUS", "PROCESSED", "CONTENT", "RESULT"]
        lines.append(output.table(headers, rows, right=("ID",)))
    if task["errors"]:
        lines.append(f"\n{output.count(len(task['errors']), 'failed attempt')}")
        rows = [
            [e["attempt"], output.when(e["at"]), e["instance_id"], e["error"]]
            for e in task["errors"]
        ]
        lines.append(output.table(["ATTEMPT", "AT", "INSTANCE", "ERROR"], rows, right=("ATTEMPT",)))
    return "\n".join(lines)


def _progress(progress: dict[str, Any]) -> str:
    done = f"{progress['done']}/{progress['total']}" if progress["total"] else str(progress["done"])
    return f"{done} {progress['message']}" if progress.get("message") else done


@cli.command()
@click.argument("task_id", type=click.IntRange(min=1), metavar="ID")
@json_option
def show(task_id: int, as_json: bool) -> None:
    """Show a task with its conversations, result and failed attempts."""
    task = _client().request("GET", f"/tasks/{task_id}").body
    if as_json:
        _print_json(task)
    else:
        click.echo(_show(task))


# -- retry and cancel --------------------------------------------------------------------------


def _act(
    action: str,
    task_id: int | None,
    every: bool,
    flag: str,
    status: TaskStatus,
    queue: str | None,
    as_json: bool,
) -> None:
    """POST /tasks/{id}/{action} for one task, or for every task in `status` (of a queue)."""
    if (task_id is None) == (not every):
        raise click.UsageError(f"give a task ID or {flag}, not both")
    if queue is not None and not every:
        raise click.UsageError(f"--queue goes with {flag}")
    client = _client()
    if task_id is not None:
        task = client.request("POST", f"/tasks/{task_id}/{action}").body
        if as_json:
            _print_json(task)
        else:
            click.echo(f"task {task['id']}: {task['status']}")
        return
    # The ids first, then the changes: a task changed meanwhile (by a worker, by someone else)
    # is a 409 or 404 that is reported as skipped, not a failure of the whole command.
    ids = [task["id"] for task in _pages(client, status=status.value, queue=queue)]
    done: list[int] = []
    skipped: list[dict[str, Any]] = []
    for number in ids:
        try:
            client.request("POST", f"/tasks/{number}/{action}")
        except CliError as error:
            if error.status not in (404, 409):
                raise CliError(f"{error} (after {len(done)} of {len(ids)} tasks)") from None
            skipped.append({"id": number, "reason": str(error)})
        else:
            done.append(number)
    verb = "retried" if action == "retry" else "cancelled"
    if as_json:
        _print_json({verb: done, "skipped": skipped})
        return
    where = f" in queue {queue}" if queue else ""
    click.echo(f"{verb} {output.count(len(done), f'{status.value} task')}{where}")
    for skip in skipped:
        click.echo(f"skipped task {skip['id']}: {skip['reason']}")


@cli.command()
@click.argument("task_id", type=click.IntRange(min=1), required=False, metavar="[ID]")
@click.option("--all-failed", is_flag=True, help="Retry every failed task.")
@click.option("-q", "--queue", help="With --all-failed: only this queue's.")
@json_option
def retry(task_id: int | None, all_failed: bool, queue: str | None, as_json: bool) -> None:
    """Send a finished task back to pending (or every failed one).

    A failed, cancelled or completed task runs again with fresh attempts.

    \b
      taskapp retry 12
      taskapp retry --all-failed --queue llm
    """
    _act("retry", task_id, all_failed, "--all-failed", TaskStatus.FAILED, queue, as_json)


@cli.command()
@click.argument("task_id", type=click.IntRange(min=1), required=False, metavar="[ID]")
@click.option("--all-pending", is_flag=True, help="Cancel every pending task.")
@click.option("-q", "--queue", help="With --all-pending: only this queue's.")
@json_option
def cancel(task_id: int | None, all_pending: bool, queue: str | None, as_json: bool) -> None:
    """Cancel a pending or running task (or every pending one).

    A running task stops at once (its processor is told); a finished one can't be cancelled
    (409), so the bulk form is for tasks still waiting.

    \b
      taskapp cancel 12
      taskapp cancel --all-pending --queue llm
    """
    _act("cancel", task_id, all_pending, "--all-pending", TaskStatus.PENDING, queue, as_json)


# -- queues ------------------------------------------------------------------------------------

QUEUE_COLUMNS = [
    "QUEUE",
    "PAUSED",
    *(status.upper() for status in TASK_STATUSES),
    "RATE LIMIT",
    "KEY LIMIT",
    "THROTTLED KEYS",
]


def _rate(rate: dict[str, Any] | None) -> str:
    if rate is None:
        return "-"
    burst = f", burst {rate['burst']}" if rate["burst"] != 1 else ""
    return f"{rate['limit']}/{rate['period_seconds']:g}s{burst}"


def _queue_row(queue: dict[str, Any]) -> list[Any]:
    counts = queue["counts"]
    return [
        queue["name"],
        "paused" if queue["paused"] else "-",
        *(counts.get(status, 0) for status in TASK_STATUSES),
        _rate(queue["rate_limit"]),
        queue["key_concurrency_limit"],
        queue["throttled_keys"],
    ]


@cli.command()
@click.argument("name", required=False)
@json_option
def queues(name: str | None, as_json: bool) -> None:
    """Queues: their tasks by status, their limits, whether paused."""
    path = "/queues/" if name is None else f"/queues/{name}"
    found = _client().request("GET", path).body
    if as_json:
        _print_json(found)
        return
    rows = [_queue_row(queue) for queue in (found if name is None else [found])]
    numbers = (*(status.upper() for status in TASK_STATUSES), "KEY LIMIT", "THROTTLED KEYS")
    click.echo(output.table(QUEUE_COLUMNS, rows, right=numbers) if rows else "no queues")


def _set_paused(name: str, paused: bool, as_json: bool) -> None:
    action = "pause" if paused else "resume"
    queue = _client().request("POST", f"/queues/{name}/{action}").body
    if as_json:
        _print_json(queue)
    else:
        click.echo(f"queue {queue['name']}: {'paused' if queue['paused'] else 'running'}")


@cli.command()
@click.argument("name")
@json_option
def pause(name: str, as_json: bool) -> None:
    """Pause a queue on every instance (running tasks finish)."""
    _set_paused(name, True, as_json)


@cli.command()
@click.argument("name")
@json_option
def resume(name: str, as_json: bool) -> None:
    """Resume a paused queue."""
    _set_paused(name, False, as_json)


# -- prune -------------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """Seconds in `90`, `90s`, `30m`, `12h`, `7d`, `2w` or a sum such as `1h30m`."""
    compact = text.strip().lower()
    if compact.isdigit():
        return int(compact)
    parts = _DURATION.findall(compact)
    if not parts or "".join(n + unit for n, unit in parts) != compact:
        raise click.BadParameter(
            f"{text!r} is not a duration such as 90s, 30m, 12h, 7d or 1h30m",
            param_hint="'--older-than'",
        )
    return sum(int(n) * _UNIT_SECONDS[unit] for n, unit in parts)


@cli.command()
@click.option(
    "--older-than",
    required=True,
    metavar="DURATION",
    help="Delete tasks unchanged for this long: 90s, 30m, 12h, 7d, 1h30m; 0 for all.",
)
@click.option(
    "-s",
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(FINISHED),
    help="Only this finished state (repeat; default all three).",
)
@json_option
def prune(older_than: str, statuses: tuple[str, ...], as_json: bool) -> None:
    """Delete finished tasks not changed for a while.

    Completed, failed and cancelled tasks go with their conversations and error history, as
    retention (RETENTION_*_SECONDS) deletes them; no events are sent.

    \b
      taskapp prune --older-than 7d
      taskapp prune --older-than 12h --status failed --status cancelled
    """
    seconds = parse_duration(older_than)
    client = _client()
    chosen = list(statuses or FINISHED)
    body = {"older_than_seconds": seconds, "statuses": chosen}
    deleted = dict.fromkeys(chosen, 0)
    # The service deletes for a couple of seconds a request and says whether it is done.
    while True:
        answer = client.request("POST", "/tasks/prune", body=body).body
        for status, count in answer["deleted"].items():
            deleted[status] = deleted.get(status, 0) + count
        if answer["done"]:
            break
    total = sum(deleted.values())
    if as_json:
        _print_json({"deleted": deleted, "total": total})
        return
    by_status = ", ".join(f"{status} {count:,}" for status, count in deleted.items())
    click.echo(f"deleted {output.count(total, 'finished task')} ({by_status})")


# -- tail --------------------------------------------------------------------------------------


def _event_line(event: Event) -> str:
    """An event as one line for people: time, type, task, status and what else it carries."""
    try:
        data = json.loads(event.data)
    except ValueError:
        return f"{event.type}  {event.data}"
    if not isinstance(data, dict):
        return f"{event.type}  {event.data}"
    parts = [output.clock(data.get("at")), f"{data.get('type', event.type):<22}"]
    if data.get("task_id") is not None:
        parts.append(f"task {data['task_id']:<6}")
    if data.get("status"):
        parts.append(f"{data['status']:<10}")
    if data.get("conversation_id") is not None:
        parts.append(f"conversation {data['conversation_id']}")
    if isinstance(data.get("progress"), dict):
        parts.append(_progress(data["progress"]))
    if isinstance(data.get("output"), dict):
        parts.append(output.cell(data["output"].get("text"), 80))
    if data.get("instance_id"):
        parts.append(f"instance {str(data['instance_id'])[:8]}")
    return "  ".join(parts).rstrip()


@cli.command()
@click.argument("task_id", type=click.IntRange(min=1), required=False, metavar="[ID]")
@click.option(
    "-n", "--count", "limit", type=click.IntRange(min=1), help="Stop after this many events."
)
@json_option
def tail(task_id: int | None, limit: int | None, as_json: bool) -> None:
    """Follow the live events of every task (or of one) until Ctrl-C.

    With --json, each event is one line of JSON, as the service sent it. A stream the service
    ends (a restart, or this client falling behind) is opened again, tried for up to 30 s,
    with the id of the last event seen (Last-Event-ID), so a service that keeps events sends
    what was missed.

    \b
      taskapp tail
      taskapp tail 12
      taskapp tail --json | jq -c 'select(.type == "task.failed")'
    """
    client = _client()
    seen, last_id = 0, None
    try:
        stream = client.events(task_id=task_id)  # the first time, a failure is at once
        while True:
            with stream:
                for event in stream:
                    last_id = event.id if event.id is not None else last_id
                    click.echo(event.data if as_json else _event_line(event))
                    seen += 1
                    if limit is not None and seen >= limit:
                        return
            stream = _reopen(client, task_id, last_id, stream.retry_seconds or RECONNECT_SECONDS)
    except KeyboardInterrupt:
        return  # Ctrl-C is how a tail ends: no traceback, exit 0


def _reopen(client: Client, task_id: int | None, last_id: str | None, wait: float) -> Stream:
    """The stream opened again after the service ended it: tried every `wait` seconds while
    the service can't be reached or is busy (503), for RECONNECT_GIVE_UP_SECONDS."""
    deadline = time.monotonic() + RECONNECT_GIVE_UP_SECONDS
    while True:
        time.sleep(wait)
        try:
            return client.events(task_id=task_id, last_event_id=last_id)
        except CliError as error:
            if error.status not in (None, 502, 503, 504) or time.monotonic() >= deadline:
                raise CliError(
                    f"{error} (the stream ended; tried again for {RECONNECT_GIVE_UP_SECONDS:g} s)"
                ) from None


# -- the console script ------------------------------------------------------------------------


def _usage_line(error: click.ClickException) -> str:
    message = error.format_message()
    context = getattr(error, "ctx", None)
    if isinstance(error, click.UsageError) and context is not None:
        message += f" (see: {context.command_path} --help)"
    return message


def main(argv: list[str] | None = None) -> int:
    """The console script: run one command; its exit status, every error as one line."""
    try:
        result = cli.main(args=argv, prog_name="taskapp", standalone_mode=False)
    except CliError as error:
        click.echo(f"taskapp: {error}", err=True)
        return 1
    except click.ClickException as error:
        click.echo(f"taskapp: {' '.join(_usage_line(error).split())}", err=True)
        return error.exit_code
    except click.Abort:
        return 130  # Ctrl-C (or end of input at a prompt)
    except BrokenPipeError:
        # The reader went away (`| head`): say nothing more, as a process killed by SIGPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as error:  # a bug: still one line, but say what it was
        click.echo(f"taskapp: unexpected {type(error).__name__}: {error}", err=True)
        return 1
    return result if isinstance(result, int) else 0
