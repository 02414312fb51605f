"""Helpers for tests that run the service as real gunicorn processes."""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import requests

from tools.gunicorn_process import GunicornProcess, free_port

ROOT = Path(__file__).resolve().parent.parent


def wait_for(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll until condition() returns something truthy; return it, or fail after timeout."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
        except (requests.RequestException, OSError) as exc:
            last_error, result = exc, None
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what or condition}: {last_error}"
    )


class Instance(GunicornProcess):
    """One gunicorn master and its worker(s): `gunicorn -c gunicorn.conf.py wsgi:app`."""

    def __init__(self, database_url: str, port: int | None = None, **env: object) -> None:
        port = port or free_port()
        settings = {
            "DATABASE_URL": database_url,
            "PROCESSING_MIN_SECONDS": "0",
            "PROCESSING_MAX_SECONDS": "0",
            "EVENT_KEEPALIVE_SECONDS": "0.5",
            "PYTHONPATH": str(ROOT),
            **{key: str(value) for key, value in env.items()},
        }
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"taskapp-gunicorn-{port}.log"
        # Not a session of its own: a Ctrl-C on pytest reaches the instances too.
        super().__init__(port, settings, log_path=log_path)

    def start(self, wait: bool = True) -> Instance:
        super().start()
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        self.wait_ready(("/health",), timeout=timeout)

    def status(self) -> dict[str, Any]:
        return requests.get(self.url + "/status", timeout=5).json()

    def worker_pid(self) -> int:
        return int(self.status()["pid"])

    def signal_master(self, sig: int) -> None:
        self.signal(sig)


def healthy(*group: Instance, timeout: float = 30.0) -> tuple[Instance, ...]:
    """Wait until every instance of a group started side by side (`wait=False`) is healthy;
    return them. They boot at once, as a deployment's do, instead of one after another."""
    for instance in group:
        instance.wait_healthy(timeout=timeout)
    return group


# -- tasks and events, for the fault tests ---------------------------------------------------


def create_task(
    base_url: str, title: str, *, conversations: int = 1, timeout: float = 10, **fields: Any
) -> dict[str, Any]:
    """POST /tasks/ with `conversations` conversations; return the created task."""
    body = {
        "title": title,
        "conversations": [{"content": f"{title}: conversation {n}"} for n in range(conversations)],
        **fields,
    }
    response = requests.post(f"{base_url}/tasks/", json=body, timeout=timeout)
    assert response.status_code == 201, (response.status_code, response.text)
    return response.json()


def get_task(base_url: str, task_id: int) -> dict[str, Any]:
    """GET /tasks/{id}; return the task."""
    response = requests.get(f"{base_url}/tasks/{task_id}", timeout=10)
    assert response.status_code == 200, (response.status_code, response.text)
    return response.json()


def task_row(conn: psycopg.Connection, task_id: int) -> dict[str, Any]:
    """The task's row as the database holds it ({} when it does not exist)."""
    cursor = conn.execute("SELECT * FROM tasks WHERE id = %s", (task_id,))
    row = cursor.fetchone()
    return dict(zip([d.name for d in cursor.description], row, strict=True)) if row else {}


def task_errors(conn: psycopg.Connection, task_id: int) -> list[dict[str, Any]]:
    """The task's error history, oldest first."""
    cursor = conn.execute(
        "SELECT attempt, instance_id, error, at FROM task_errors WHERE task_id = %s ORDER BY id",
        (task_id,),
    )
    names = [d.name for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def conversation_statuses(conn: psycopg.Connection, task_id: int) -> list[str]:
    rows = conn.execute(
        "SELECT status FROM conversations WHERE task_id = %s ORDER BY id", (task_id,)
    ).fetchall()
    return [status for (status,) in rows]


def status_counts(conn: psycopg.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall())


def listen_to_events(conn: psycopg.Connection) -> None:
    """LISTEN on taskapp_events as an instance with a stream does: PostgreSQL sends events
    only while someone says it watches (taskapp_watch_events, migration 0011)."""
    conn.execute("SELECT taskapp_watch_events(3600)")
    conn.execute("LISTEN taskapp_events")


class EventLog:
    """Every taskapp event, heard on a LISTEN connection of the test's own.

    Completions are announced by the very statement that writes them (pg_notify, delivered on
    commit), so counting `task.completed` events counts completions actually recorded: a
    fenced write that changed nothing sends nothing.
    """

    def __init__(self, database_url: str) -> None:
        self._conn = psycopg.connect(database_url, autocommit=True)
        listen_to_events(self._conn)
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="test-event-log", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            for notify in self._conn.notifies(timeout=0.2):
                with self._lock:
                    self._events.append(json.loads(notify.payload))

    def events(self, event_type: str | None = None, task_id: int | None = None) -> list[dict]:
        with self._lock:
            return [
                e
                for e in self._events
                if (event_type is None or e["type"] == event_type)
                and (task_id is None or e["task_id"] == task_id)
            ]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._conn.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Load:
    """Client threads that create and read tasks until stopped, recording every answer.

    Each round is POST /tasks/, GET /tasks/{id}, GET /tasks/?limit=5 on one of `urls`.
    `codes` counts statuses (exceptions as their class name, e.g. "ReadTimeout");
    `bad` keeps what no outage excuses: a 5xx other than a problem+json 503, or an exception.
    """

    def __init__(self, urls: list[str], threads: int = 4, timeout: float = 10.0) -> None:
        self.urls = urls
        self.timeout = timeout
        self.codes: collections.Counter[int | str] = collections.Counter()
        self.created: list[tuple[float, int]] = []  # (monotonic time, task id)
        self.bad: list[str] = []
        self.slowest = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), name=f"test-load-{n}", daemon=True)
            for n in range(threads)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)

    @property
    def requests(self) -> int:
        with self._lock:
            return sum(self.codes.values())

    def wait_more(self, count: int, timeout: float = 20.0) -> None:
        """Wait until `count` more requests than now have been answered."""
        target = self.requests + count
        wait_for(lambda: self.requests >= target, timeout=timeout, what=f"{count} more requests")

    def created_ids(self, since: float = 0.0) -> list[int]:
        with self._lock:
            return [task_id for at, task_id in self.created if at >= since]

    def _run(self, n: int) -> None:
        rounds = 0
        with requests.Session() as session:
            while not self._stop.is_set():
                url = self.urls[(n + rounds) % len(self.urls)]
                rounds += 1
                body = {"title": f"load {n}.{rounds}", "conversations": [{"content": "c"}]}
                created = self._call(session, "POST", f"{url}/tasks/", json=body)
                if created is not None and created.status_code == 201:
                    task_id = created.json()["id"]
                    with self._lock:
                        self.created.append((time.monotonic(), task_id))
                    self._call(session, "GET", f"{url}/tasks/{task_id}")
                self._call(session, "GET", f"{url}/tasks/?limit=5")

    def _call(self, session: requests.Session, method: str, url: str, **kw: Any) -> Any:
        started = time.monotonic()
        try:
            response = session.request(method, url, timeout=self.timeout, **kw)
        except requests.RequestException as exc:
            outcome: int | str = type(exc).__name__
            response = None
            problem = f"{method} {url}: {exc}"
        else:
            outcome = response.status_code
            problem = ""
            is_problem = response.headers.get("Content-Type", "").startswith(
                "application/problem+json"
            )
            if response.status_code >= 500 and not (response.status_code == 503 and is_problem):
                problem = f"{method} {url}: {response.status_code} {response.text[:300]}"
        with self._lock:
            self.codes[outcome] += 1
            self.slowest = max(self.slowest, time.monotonic() - started)
            if problem:
                self.bad.append(problem)
        return response
