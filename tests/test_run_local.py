"""The no-Docker path: tools.embedded_pg's PostgreSQL and `python -m tools.run_local`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import requests
from psycopg import sql

from tests.support import ROOT, free_port, wait_for
from tools.embedded_pg import EmbeddedPostgres, port_is_free


def _count(url: str) -> int:
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute("SELECT count(*) FROM kept").fetchone()
        assert row is not None
        return int(row[0])


def _session_members(sid: int) -> list[int]:
    """Pids of the live processes in session sid (gunicorn master and workers)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def test_embedded_postgres_restarts_survives_a_kill_and_reuses_its_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    with EmbeddedPostgres(data_dir) as server:
        assert server.url("app") == f"postgresql://postgres@127.0.0.1:{server.port}/app"
        server.create_database("app")
        server.create_database("app")  # a second time is no error
        with psycopg.connect(server.url("app"), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (id int)")
            conn.execute("INSERT INTO kept VALUES (1)")

            server.restart()
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")  # the restart cut this connection
        assert _count(server.url("app")) == 1

        # kill -9 of the postmaster alone leaves a stale postmaster.pid and dying backends.
        pid = server.running_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: server.running_pid() is None, what="the postmaster to die")
        server.start()
        assert _count(server.url("app")) == 1

        server.kill()
        assert server.running_pid() is None
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.url("app"), connect_timeout=2)
        server.start()
        assert _count(server.url("app")) == 1
        port = server.port

    server.stop()  # stopping twice is no error
    assert port_is_free(port)
    with EmbeddedPostgres(data_dir, port=port) as again:  # the same data, no new initdb
        assert _count(again.url("app")) == 1
    assert again.running_pid() is None


@pytest.fixture
def fresh_database_url(server_url: str) -> Iterator[str]:
    """An empty database (no schema: the instances must migrate it), dropped afterwards."""
    name = f"taskapp_run_local_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield server_url.rpartition("/")[0] + "/" + name
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def test_run_local_serves_two_instances_on_one_database_and_stops_on_ctrl_c(
    fresh_database_url: str,
) -> None:
    ports = [free_port(), free_port()]
    env = {
        **os.environ,
        "DATABASE_URL": fresh_database_url,
        "PROCESSING_MIN_SECONDS": "0",
        "PROCESSING_MAX_SECONDS": "0",
        "PYTHONUNBUFFERED": "1",
    }
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tools.run_local", "--ports", ",".join(map(str, ports))],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    output: list[str] = []
    assert launcher.stdout is not None
    reader = threading.Thread(target=lambda: output.extend(launcher.stdout), daemon=True)
    reader.start()
    masters: list[int] = []
    try:

        def banner_shown() -> bool:
            assert launcher.poll() is None, "run_local exited:\n" + "".join(output)
            return any("Ctrl-C stops everything" in line for line in output)

        wait_for(banner_shown, timeout=90, what="run_local's banner")
        masters = [int(line.split()[-1]) for line in output if "gunicorn pid" in line]
        assert len(masters) == 2
        for port in ports:
            assert any(line.startswith(f"[{port}] ") for line in output), f"no [{port}] lines"
            health = requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
            assert health.json() == {"status": "healthy", "database": "ok"}

        created = requests.post(
            f"http://127.0.0.1:{ports[0]}/tasks/", json={"title": "across"}, timeout=10
        )
        assert created.status_code == 201, created.text
        task_id = created.json()["id"]
        read = requests.get(f"http://127.0.0.1:{ports[1]}/tasks/{task_id}", timeout=10)
        assert read.status_code == 200 and read.json()["title"] == "across"

        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=60) == 0, "".join(output)
        reader.join(timeout=10)
        for master in masters:
            assert _session_members(master) == [], f"gunicorn {master} left processes behind"
        assert all(port_is_free(port, "0.0.0.0") for port in ports)
    finally:
        if launcher.poll() is None:
            launcher.kill()  # the gunicorns get SIGTERM through PR_SET_PDEATHSIG
            launcher.wait()
        for master in masters:
            for pid in _session_members(master):
                os.kill(pid, signal.SIGKILL)
