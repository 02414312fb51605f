"""The no-Docker path: tools.embedded_pg's PostgreSQL and `python -m tools.run_local`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping
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


class RunLocal:
    """`python -m tools.run_local` (or `./run.sh`) as a subprocess, its output collected.

    As a context manager it is killed on the way out if still running (its gunicorns get
    SIGTERM through PR_SET_PDEATHSIG, and whatever they leave behind is killed too).
    """

    def __init__(
        self,
        args: list[str],
        env: Mapping[str, str | None] | None = None,
        command: list[str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.command = (command or [sys.executable, "-m", "tools.run_local"]) + args
        # A None value takes the variable out of the environment (DATABASE_URL, for one).
        merged = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env = {key: value for key, value in merged.items() if value is not None}
        self.cwd = cwd
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> RunLocal:
        self.proc = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        assert self.proc.stdout is not None
        stream = self.proc.stdout
        self._reader = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self._reader.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for master in self.masters():
            for pid in _session_members(master):
                os.kill(pid, signal.SIGKILL)

    def text(self) -> str:
        return "".join(self.lines)

    def wait_banner(self, timeout: float = 90) -> None:
        """Wait until it says everything runs; fail, with its output, if it exits first."""

        def banner_shown() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, "run_local exited:\n" + self.text()
            return any("Ctrl-C stops everything" in line for line in self.lines)

        wait_for(banner_shown, timeout=timeout, what="run_local's banner")

    def masters(self) -> list[int]:
        """The pids of the gunicorn masters it started."""
        return [int(line.split()[-1]) for line in list(self.lines) if "gunicorn pid" in line]

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        assert self._reader is not None
        self._reader.join(timeout=10)
        return code

    def stop(self, timeout: float = 60) -> int:
        """Ctrl-C (SIGINT), as a person stops it; return its exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        return self.wait_exit(timeout)


def test_run_local_serves_two_instances_on_one_database_and_stops_on_ctrl_c(
    fresh_database_url: str,
) -> None:
    ports = [free_port(), free_port()]
    env = {
        "DATABASE_URL": fresh_database_url,
        "PROCESSING_MIN_SECONDS": "0",
        "PROCESSING_MAX_SECONDS": "0",
    }
    with RunLocal(["--ports", ",".join(map(str, ports))], env=env) as launcher:
        launcher.wait_banner()
        masters = launcher.masters()
        assert len(masters) == 2
        for port in ports:
            assert any(line.startswith(f"[{port}] ") for line in launcher.lines), f"no [{port}]"
            health = requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
            assert health.json() == {"status": "healthy", "database": "ok"}

        created = requests.post(
            f"http://127.0.0.1:{ports[0]}/tasks/", json={"title": "across"}, timeout=10
        )
        assert created.status_code == 201, created.text
        task_id = created.json()["id"]
        read = requests.get(f"http://127.0.0.1:{ports[1]}/tasks/{task_id}", timeout=10)
        assert read.status_code == 200 and read.json()["title"] == "across"

        assert launcher.stop() == 0, launcher.text()
        for master in masters:
            assert _session_members(master) == [], f"gunicorn {master} left processes behind"
        assert all(port_is_free(port, "0.0.0.0") for port in ports)


def copy_checkout(destination: Path) -> Path:
    """What a fresh clone of this tree holds (its tracked and new files), without .venv."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # a file deleted in the work tree is not in a clone of it
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None


def test_a_second_run_sh_in_one_checkout_refuses_in_one_line_and_leaves_the_first_alone(
    tmp_path: Path,
) -> None:
    # A checkout of its own, so that its .pgdata/ is nobody else's; this tree's venv serves it.
    checkout = copy_checkout(tmp_path / "checkout")
    (checkout / ".venv").symlink_to(ROOT / ".venv")
    data_dir = checkout / ".pgdata"
    env: dict[str, str | None] = {
        "DATABASE_URL": None,  # the embedded PostgreSQL, as on a new user's machine
        "PROCESSING_MIN_SECONDS": "0",
        "PROCESSING_MAX_SECONDS": "0",
    }
    run_sh = [str(checkout / "run.sh")]

    def ports_args() -> tuple[list[int], list[str]]:
        ports = [free_port(), free_port()]
        return ports, ["--ports", ",".join(map(str, ports))]

    try:
        first_ports, first_args = ports_args()
        with RunLocal(first_args, env=env, command=run_sh, cwd=checkout) as first:
            first.wait_banner()
            assert first.proc is not None
            ready = [line for line in first.lines if "PostgreSQL ready: " in line]
            database_url = ready[0].split("PostgreSQL ready: ")[1].strip()
            postmaster = _postmaster_pid(data_dir)
            assert postmaster is not None
            created = requests.post(
                f"http://127.0.0.1:{first_ports[0]}/tasks/", json={"title": "first's"}, timeout=10
            )
            assert created.status_code == 201, created.text

            # Other ports, so that only the data directory is in the way.
            second_ports, second_args = ports_args()
            with RunLocal(second_args, env=env, command=run_sh, cwd=checkout) as second:
                assert second.wait_exit() == 1, second.text()
            assert len(second.lines) == 1, second.text()
            refusal = second.lines[0]
            assert refusal.startswith(f"run_local: {data_dir} is in use by another ./run.sh"), (
                refusal
            )
            assert f"pid {first.proc.pid}, ports {first_ports[0]},{first_ports[1]}" in refusal
            assert f"DATABASE_URL={database_url} ./run.sh --ports" in refusal
            assert all(port_is_free(port, "0.0.0.0") for port in second_ports)

            # The first run is untouched: the same server, its instances serving, its task done.
            assert _postmaster_pid(data_dir) == postmaster
            assert first.proc.poll() is None
            for port in first_ports:
                health = requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
                assert health.json() == {"status": "healthy", "database": "ok"}
            task_url = f"http://127.0.0.1:{first_ports[1]}/tasks/{created.json()['id']}"
            wait_for(
                lambda: requests.get(task_url, timeout=5).json()["status"] == "completed",
                what="the first run's task to complete",
            )
            assert not any("PostgreSQL stopped" in line for line in first.lines)

            # A run killed outright leaves its claim with it: the next one starts, on its data.
            first.proc.kill()
            first.wait_exit()
            third_ports, third_args = ports_args()
            with RunLocal(third_args, env=env, command=run_sh, cwd=checkout) as third:
                third.wait_banner()
                read = requests.get(
                    f"http://127.0.0.1:{third_ports[0]}/tasks/{created.json()['id']}", timeout=10
                )
                assert read.status_code == 200 and read.json()["title"] == "first's"
                assert third.stop() == 0, third.text()
            assert _postmaster_pid(data_dir) is None  # the third run stopped the server
    finally:
        EmbeddedPostgres(data_dir).stop()  # a leftover, had the test failed on the way
