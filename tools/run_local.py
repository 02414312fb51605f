"""Run two taskapp instances and a PostgreSQL without Docker: `python -m tools.run_local`.

Without DATABASE_URL, an embedded PostgreSQL is started with its data in .pgdata/ (kept across
runs). Ctrl-C or SIGTERM stops the instances gracefully, then PostgreSQL, and exits 0; an
instance that dies on its own stops everything with exit status 1. One run at a time owns
.pgdata/: a second one started in the same checkout says which run holds it and exits 1,
touching nothing (with DATABASE_URL pointing at the first one's database it can run alongside).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit, urlunsplit

from tools.embedded_pg import DataDirInUse, DataDirLock, EmbeddedPostgres, port_is_free
from tools.gunicorn_process import GunicornProcess, gunicorn_command

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = gunicorn_command()  # what Instance runs
DEFAULT_PORTS = (12000, 12001)
PG_DATA_DIR = ROOT / ".pgdata"
PG_PORT = 54329  # fixed, so the URL stays the same from run to run; 5432 is left to the system
DATABASE_NAME = "taskdb"
# An instance lets its current task run SHUTDOWN_GRACE_SECONDS (10) on SIGTERM; then some margin.
STOP_TIMEOUT_SECONDS = 30

_output_lock = threading.Lock()


def say(message: str) -> None:
    """Print a launcher line, never interleaved with an instance's line."""
    with _output_lock:
        print(f"run_local: {message}", flush=True)


class Instance(GunicornProcess):
    """One `gunicorn -c gunicorn.conf.py wsgi:app` on a port, its output prefixed with it."""

    def __init__(self, port: int, database_url: str) -> None:
        env = {
            "DATABASE_URL": database_url,
            "PYTHONUNBUFFERED": "1",  # so the app's own prints reach us line by line
        }
        # A session of its own, so that a terminal Ctrl-C reaches only us: we turn it into
        # SIGTERM (graceful) ourselves, as gunicorn takes SIGINT as quit-now.
        super().__init__(port, env, relay=self._print, own_session=True, die_with_parent=True)
        self.url = f"http://localhost:{port}"  # for people: the banner's links

    def _print(self, line: str) -> None:
        with _output_lock:
            print(f"[{self.port}] {line}", flush=True)

    def start(self) -> Instance:
        """Start gunicorn; its output is copied once relay_output() is called."""
        super().start()
        say(f"instance on port {self.port}: gunicorn pid {self.pid}")
        return self

    def healthy(self) -> bool:
        """Return whether GET /health answers 200 (not 503: the database is reachable)."""
        return self.ready(("/health",))


class Launcher:
    """Starts PostgreSQL if needed and the instances, and stops them all on a signal."""

    def __init__(self, ports: Sequence[int], startup_timeout: float) -> None:
        self.ports = list(ports)
        self.startup_timeout = startup_timeout
        self.stopping = threading.Event()  # a stop was asked for (Ctrl-C, SIGTERM)
        self.hurry = threading.Event()  # a second one: kill now, don't wait
        self.postgres: EmbeddedPostgres | None = None
        self.lock: DataDirLock | None = None  # our claim on .pgdata/, while we use it
        self.instances: list[Instance] = []

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Turn the first Ctrl-C/SIGTERM into a graceful stop and a second one into a kill."""
        if self.stopping.is_set():
            self.hurry.set()
            return
        self.stopping.set()

    def run(self) -> int:
        """Run until a signal (exit status 0) or a failure (exit status 1)."""
        try:
            status = self.serve()
        finally:
            clean = self.stop_instances()
            if self.postgres is not None:
                self.postgres.stop()
                say("PostgreSQL stopped")
            if self.lock is not None:
                self.lock.release()
        if status == 0 and not clean:
            say("an instance did not stop cleanly")
            return 1
        return status

    def serve(self) -> int:
        """Start everything and wait for a signal or a death; return the exit status."""
        database_url = os.environ.get("DATABASE_URL")
        if not database_url:
            # Before the ports: a second run on the default ones is told whose they are.
            try:
                self.claim_data_dir()
            except DataDirInUse as exc:
                say(describe_holder(exc))
                return 1
            except (RuntimeError, OSError) as exc:
                say(f"PostgreSQL's data directory could not be prepared: {exc}")
                return 1
        busy = [port for port in self.ports if not port_is_free(port, "0.0.0.0")]
        if busy:
            say(f"port(s) {busy} already in use (docker compose up?); choose others with --ports")
            return 1
        if not database_url:
            try:
                database_url = self.start_postgres()
            except (RuntimeError, OSError) as exc:
                say(f"PostgreSQL did not start: {exc}")
                return 1
        if self.stopping.is_set():
            return 0
        self.instances = [Instance(port, database_url) for port in self.ports]
        # Every fork happens before any thread starts: preexec_fn is unsafe alongside threads.
        for instance in self.instances:
            instance.start()
        for instance in self.instances:
            instance.relay_output()
        if not self.wait_until_healthy():
            return 0 if self.stopping.is_set() else 1
        self.print_banner(database_url)
        while not self.stopping.wait(0.2):
            dead = [instance for instance in self.instances if instance.returncode is not None]
            if dead:
                codes = ", ".join(f"{i.port} exited with {i.returncode}" for i in dead)
                say(f"an instance died ({codes}); stopping everything")
                return 1
        say("stopping (Ctrl-C again to kill at once)")
        return 0

    def note(self, database_url: str | None = None) -> dict[str, object]:
        """What a second run is told about this one."""
        note: dict[str, object] = {"pid": os.getpid(), "ports": self.ports}
        if database_url:
            note["database_url"] = database_url
        return note

    def claim_data_dir(self) -> None:
        """Make .pgdata/ if new and claim it for this run; DataDirInUse if another run has it."""
        # The claim lives in the data directory, which initdb must find empty: make it first.
        EmbeddedPostgres(PG_DATA_DIR, port=PG_PORT).initialise()
        lock = DataDirLock(PG_DATA_DIR)
        lock.acquire(self.note())
        self.lock = lock

    def start_postgres(self) -> str:
        """Start the embedded PostgreSQL in .pgdata/, create the database, return its URL.

        A server already running on .pgdata/ is a leftover of a run that was killed (a live run
        would hold the claim): it is reused, and stopped when this run ends.
        """
        postgres = EmbeddedPostgres(PG_DATA_DIR, port=PG_PORT)
        if postgres.running_port() != PG_PORT and not port_is_free(PG_PORT):
            postgres = EmbeddedPostgres(PG_DATA_DIR)  # something else holds it: take a free one
        say(f"starting PostgreSQL on port {postgres.port} (data in {PG_DATA_DIR})")
        self.postgres = postgres
        postgres.start()
        postgres.create_database(DATABASE_NAME)
        url = postgres.url(DATABASE_NAME)
        if self.lock is not None:
            self.lock.update(self.note(url))
        say(f"PostgreSQL ready: {url}")
        return url

    def wait_until_healthy(self) -> bool:
        """Poll every instance's /health; False if one exits, time runs out or a stop comes."""
        deadline = time.monotonic() + self.startup_timeout
        waiting = list(self.instances)
        while waiting:
            waiting = [instance for instance in waiting if not instance.healthy()]
            for instance in waiting:
                if instance.returncode is not None:
                    say(f"instance on port {instance.port} exited during startup")
                    self._let_the_others_settle(instance)
                    return False
            if self.stopping.is_set():
                return False
            if time.monotonic() > deadline:
                ports = [instance.port for instance in waiting]
                say(f"no healthy /health on port(s) {ports} after {self.startup_timeout:g}s")
                return False
            if waiting:
                self.stopping.wait(0.2)
        return True

    def _let_the_others_settle(self, failed: Instance, seconds: float = 5.0) -> None:
        """Before they are stopped, give the other instances a few seconds to come up or to
        fail by themselves: one that fails the same way then says why too, instead of
        being stopped before it could."""
        deadline = time.monotonic() + seconds
        others = [instance for instance in self.instances if instance is not failed]
        while others and time.monotonic() < deadline and not self.stopping.is_set():
            others = [i for i in others if i.returncode is None and not i.healthy()]
            self.stopping.wait(0.1)

    def print_banner(self, database_url: str) -> None:
        """Say where everything is."""
        lines = ["", "taskapp is running:"]
        for instance in self.instances:
            lines.append(
                f"  {instance.url}/tasks/   API docs {instance.url}/apidocs/   "
                f"dashboard {instance.url}/dashboard/"
            )
        lines += [f"  database {_hide_password(database_url)}", "Ctrl-C stops everything.", ""]
        with _output_lock:
            print("\n".join(lines), flush=True)

    def stop_instances(self) -> bool:
        """SIGTERM every instance, wait for them (killing on timeout); True if all exited 0."""
        for instance in self.instances:
            instance.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for instance in self.instances:
            while instance.pid is not None and instance.returncode is None:
                if self.hurry.is_set() or time.monotonic() > deadline:
                    say(f"killing instance on port {instance.port}")
                    break
                self.hurry.wait(0.1)
            instance.kill()  # the master after a timeout, else workers it left behind, if any
            instance.finish_output()
        if self.instances:
            codes = ", ".join(f"{i.port}: {i.returncode}" for i in self.instances)
            say(f"instances stopped (exit status {codes})")
        return all(instance.returncode == 0 for instance in self.instances)


def describe_holder(exc: DataDirInUse) -> str:
    """One line: which run holds the data directory, and what to do instead."""
    holder = exc.holder
    ports = holder.get("ports")
    ports_text = ",".join(map(str, ports)) if isinstance(ports, list) else "?"
    line = (
        f"{exc.data_dir} is in use by another ./run.sh (pid {holder.get('pid', '?')}, "
        f"ports {ports_text}): stop that one first"
    )
    url = holder.get("database_url")
    if isinstance(url, str) and isinstance(ports, list):
        # Instances of this run, alongside the first one's, on its database.
        others = ",".join(str(p + 1000 if p + 1000 < 65536 else p - 1000) for p in ports)
        line += f", or share its database: DATABASE_URL={url} ./run.sh --ports {others}"
    return line


def _hide_password(url: str) -> str:
    """Return the URL with its password, if any, replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def parse_ports(text: str) -> list[int]:
    """Parse '12000,12001' into distinct ports."""
    try:
        ports = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ports: {text!r}") from None
    if not ports or len(set(ports)) != len(ports) or not all(0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"need distinct ports between 1 and 65535: {text!r}")
    return ports


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.run_local",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--ports",
        type=parse_ports,
        default=list(DEFAULT_PORTS),
        help="comma-separated ports, one instance each (default: 12000,12001)",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for every /health (default: 60)",
    )
    args = parser.parse_args(argv)
    launcher = Launcher(args.ports, args.startup_timeout)
    signal.signal(signal.SIGINT, launcher.on_signal)
    signal.signal(signal.SIGTERM, launcher.on_signal)
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
