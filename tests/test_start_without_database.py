"""A database that can't be reached at start: one clear line, a non-zero exit within seconds,
no traceback, no password: from gunicorn by hand, from ./run.sh, and from a worker that finds
it gone after the master's check (gunicorn must stop, not fork another worker)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from urllib.parse import urlsplit

import pytest

from tests.support import ROOT, Instance, free_port

pytestmark = pytest.mark.slow  # real gunicorn processes

PASSWORD = "s3cret-pw"


def _message(port: int) -> str:
    return f"cannot reach the database at 127.0.0.1:{port}: connection refused"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_gunicorn_says_it_in_one_line_and_exits(log_format: str) -> None:
    port = free_port()  # nothing listens there
    instance = Instance(
        f"postgresql://user:{PASSWORD}@127.0.0.1:{port}/taskdb", LOG_FORMAT=log_format
    )
    started = time.monotonic()
    instance.start(wait=False)
    status = instance.wait_exit(timeout=20)
    took = time.monotonic() - started
    lines = instance.log().splitlines()
    assert status == 3, lines
    assert took < 5, took
    # gunicorn's "Starting gunicorn" and ours: nothing else, no worker was forked.
    assert len(lines) == 2, lines
    assert PASSWORD not in instance.log() and "Traceback" not in instance.log()
    if log_format == "json":
        entries = [json.loads(line) for line in lines]
        assert (entries[1]["message"], entries[1]["level"]) == (_message(port), "error")
    else:
        assert lines[1].endswith(f" ERROR [-] taskapp: {_message(port)}"), lines


def test_run_sh_says_it_once_per_instance_and_exits() -> None:
    port = free_port()
    ports = f"{free_port()},{free_port()}"
    env = {**os.environ, "DATABASE_URL": f"postgresql://user:{PASSWORD}@127.0.0.1:{port}/db"}
    started = time.monotonic()
    done = subprocess.run(
        ["./run.sh", "--ports", ports],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    took = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert took < 10, (took, output)
    assert output.count(_message(port)) == 2, output  # one line from each instance
    assert "Traceback" not in output and PASSWORD not in output
    assert len(output.splitlines()) <= 10, output


class FirstConnectionOnly:
    """Relays the first connection to PostgreSQL, then stops listening: later ones are
    refused, as when the database goes away between the master's check and a worker."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.threads = [threading.Thread(target=self._serve, daemon=True)]
        self.threads[0].start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        self.listener.close()
        upstream = socket.create_connection(self.target)
        for source, sink in ((client, upstream), (upstream, client)):
            thread = threading.Thread(target=self._pump, args=(source, sink), daemon=True)
            thread.start()
            self.threads.append(thread)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def test_a_worker_that_cannot_reach_it_stops_gunicorn_in_one_line(database_url: str) -> None:
    url = urlsplit(database_url)
    proxy = FirstConnectionOnly((url.hostname or "127.0.0.1", url.port or 5432))
    through = database_url.replace(f":{url.port}/", f":{proxy.port}/", 1)
    instance = Instance(through, LOG_FORMAT="json")
    instance.start(wait=False)
    status = instance.wait_exit(timeout=20)
    entries = [json.loads(line) for line in instance.log().splitlines()]
    messages = [entry["message"] for entry in entries]
    assert status == 3, messages
    assert messages.count(_message(proxy.port)) == 1, messages  # the worker's
    (worker_line,) = [e for e in entries if e["message"] == _message(proxy.port)]
    assert worker_line["instance_id"]  # said by the instance, not the master
    assert sum(m.startswith("Booting worker") for m in messages) == 1, messages  # no retry
    assert not any("exception" in entry for entry in entries), messages


@pytest.mark.parametrize("auto_migrate", ["0", "1"])
def test_flask_db_upgrade_says_it_in_one_line(auto_migrate: str) -> None:
    """The README's migration command, run by hand against a database that isn't there."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"postgresql://user:{PASSWORD}@127.0.0.1:{port}/db",
        "AUTO_MIGRATE": auto_migrate,
    }
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "flask"), "--app", "wsgi", "db", "upgrade"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [f"Error: {_message(port)}"], done.stderr
    assert PASSWORD not in done.stderr + done.stdout
