"""Run two taskapp instances and a PostgreSQL without Docker: `python -m tools.run_local`.

Without DATABASE_URL, an embedded PostgreSQL is started with its data in .pgdata/ (kept across
runs). Ctrl-C or SIGTERM stops the instances gracefully, then PostgreSQL, and exits 0; an
instance that dies on its own stops everything with exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit, urlunsplit

from tools.embedded_pg import EmbeddedPostgres, port_is_free

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
DEFAULT_PORTS = (12000, 12001)
PG_DATA_DIR = ROOT / ".pgdata"
PG_PORT = 54329  # fixed, so the URL stays the same from run to run; 5432 is left to the system
DATABASE_NAME = "taskdb"
# An instance lets its current task run SHUTDOWN_GRACE_SECONDS (10) on SIGTERM; then some margin.
STOP_TIMEOUT_SECONDS = 30
PR_SET_PDEATHSIG = 1

_output_lock = threading.Lock()


def say(message: str) -> None:
    """Print a launcher line, never interleaved with an instance's line."""
    with _output_lock:
        print(f"run_local: {message}", flush=True)


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the launcher dies, even by SIGKILL (Linux only)."""
    # Otherwise a killed launcher leaves gunicorns holding the ports, and the next run fails.
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Instance:
    """One `gunicorn -c gunicorn.conf.py wsgi:app` on a port, its output prefixed with it."""

    def __init__(self, port: int, database_url: str) -> None:
        self.port = port
        self.url = f"http://localhost:{port}"
        self._health_url = f"http://127.0.0.1:{port}/health"  # gunicorn binds IPv4 only
        self.env = {
            **os.environ,
            "PORT": str(port),
            "DATABASE_URL": database_url,
            "PYTHONUNBUFFERED": "1",  # so the app's own prints reach us line by line
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self._relay: threading.Thread | None = None

    def start(self) -> None:
        """Start gunicorn in a session of its own, so a terminal Ctrl-C reaches only us."""
        # We turn Ctrl-C into SIGTERM (graceful) ourselves: gunicorn takes SIGINT as quit-now.
        self.proc = subprocess.Popen(
            GUNICORN,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # safe: no thread runs yet (see Launcher.serve)
        )
        say(f"instance on port {self.port}: gunicorn pid {self.proc.pid}")

    def relay_output(self) -> None:
        """Copy the instance's output to ours, each line prefixed with its port, until EOF."""
        assert self.proc is not None and self.proc.stdout is not None
        stream = self.proc.stdout

        def relay() -> None:
            for raw in stream:
                line = raw.decode(errors="replace").rstrip("\n")
                with _output_lock:
                    print(f"[{self.port}] {line}", flush=True)

        self._relay = threading.Thread(target=relay, name=f"relay-{self.port}", daemon=True)
        self._relay.start()

    def finish_output(self) -> None:
        """Wait (briefly) until the exited instance's last lines are printed."""
        if self._relay is not None:
            self._relay.join(timeout=5)

    @property
    def returncode(self) -> int | None:
        """Return gunicorn's exit status, or None while it runs."""
        return None if self.proc is None else self.proc.poll()

    def healthy(self) -> bool:
        """Return whether GET /health answers 200."""
        try:
            with urllib.request.urlopen(self._health_url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False  # not listening yet, or 503 while the database is not reachable

    def terminate(self) -> None:
        """Ask gunicorn to stop gracefully (SIGTERM)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def kill(self) -> None:
        """Kill gunicorn and its workers at once."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session holds master and workers


class Launcher:
    """Starts PostgreSQL if needed and the instances, and stops them all on a signal."""

    def __init__(self, ports: Sequence[int], startup_timeout: float) -> None:
        self.ports = list(ports)
        self.startup_timeout = startup_timeout
        self.stopping = threading.Event()  # a stop was asked for (Ctrl-C, SIGTERM)
        self.hurry = threading.Event()  # a second one: kill now, don't wait
        self.postgres: EmbeddedPostgres | None = None
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
        if status == 0 and not clean:
            say("an instance did not stop cleanly")
            return 1
        return status

    def serve(self) -> int:
        """Start everything and wait for a signal or a death; return the exit status."""
        busy = [port for port in self.ports if not port_is_free(port, "0.0.0.0")]
        if busy:
            say(f"port(s) {busy} already in use (docker compose up?); choose others with --ports")
            return 1
        database_url = os.environ.get("DATABASE_URL")
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

    def start_postgres(self) -> str:
        """Start the embedded PostgreSQL in .pgdata/, create the database, return its URL."""
        postgres = EmbeddedPostgres(PG_DATA_DIR, port=PG_PORT)
        if postgres.running_port() != PG_PORT and not port_is_free(PG_PORT):
            postgres = EmbeddedPostgres(PG_DATA_DIR)  # something else holds it: take a free one
        say(f"starting PostgreSQL on port {postgres.port} (data in {PG_DATA_DIR})")
        self.postgres = postgres
        postgres.start()
        postgres.create_database(DATABASE_NAME)
        url = postgres.url(DATABASE_NAME)
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
            instance.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for instance in self.instances:
            assert instance.proc is not None
            while instance.proc.poll() is None:
                if self.hurry.is_set() or time.monotonic() > deadline:
                    say(f"killing instance on port {instance.port}")
                    instance.kill()
                    instance.proc.wait()
                    break
                self.hurry.wait(0.1)
            instance.kill()  # workers a master left behind, if any
            instance.finish_output()
        if self.instances:
            codes = ", ".join(f"{i.port}: {i.returncode}" for i in self.instances)
            say(f"instances stopped (exit status {codes})")
        return all(instance.returncode == 0 for instance in self.instances)


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
