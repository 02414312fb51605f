"""One `python -m gunicorn -c <config> <app>` master and its workers, for tools, tests and bench.

Standard library only: tools/run_local.py uses it before anything else may be installed.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Self

ROOT = Path(__file__).resolve().parent.parent
PR_SET_PDEATHSIG = 1
# gunicorn.conf.py binds 0.0.0.0, which is IPv4 only: "localhost" may resolve to ::1 first.
HOST = "127.0.0.1"
# Enough of a relayed process's output to explain why it did not start.
RELAY_KEPT_LINES = 200
FAILURE_LOG_LINES = 40

# A developer's HTTP(S)_PROXY must not take our requests to 127.0.0.1 elsewhere.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class GunicornError(RuntimeError):
    """The process exited, or did not answer, while it was being waited for."""


def free_port(host: str = HOST) -> int:
    """Return a TCP port that nothing listens on now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def gunicorn_command(
    config: str | Path = "gunicorn.conf.py",
    app: str = "wsgi:app",
    python: str | Path = sys.executable,
) -> list[str]:
    """Return the command line of a gunicorn master: this Python's gunicorn (or that of the
    venv `python` belongs to), not PATH's."""
    return [str(python), "-m", "gunicorn", "-c", str(config), app]


def children(pid: int) -> list[int]:
    """Return the pids of pid's direct children (a gunicorn master's workers); Linux /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):  # it exited while we looked
            # The command name, in parentheses, may itself hold spaces and parentheses.
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return sorted(found)


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, even by SIGKILL (Linux only)."""
    # Otherwise a killed launcher leaves gunicorns holding the ports, and the next run fails.
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class GunicornProcess:
    """A gunicorn master on a port, with its output in a log file or relayed line by line.

    `env` is added to this process's environment (PORT is set from `port`). With
    `own_session`, the master and its workers form a session (and process group) of their
    own: a terminal's Ctrl-C does not reach them, and kill() takes every one at once.
    """

    def __init__(
        self,
        port: int,
        env: Mapping[str, str],
        *,
        config: str | Path = "gunicorn.conf.py",
        app: str = "wsgi:app",
        cwd: Path = ROOT,
        log_path: Path | None = None,
        relay: Callable[[str], None] | None = None,
        own_session: bool = False,
        die_with_parent: bool = False,
        name: str | None = None,
        python: str | Path = sys.executable,
    ) -> None:
        if log_path is not None and relay is not None:
            raise ValueError("output goes to a log file or to relay, not both")
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.env = {**os.environ, **env, "PORT": str(port)}
        self.command = gunicorn_command(config, app, python)
        self.cwd = cwd
        self.log_path = log_path
        self.name = name or f"gunicorn on port {port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._relay = relay
        self._own_session = own_session
        self._die_with_parent = die_with_parent
        self._relay_thread: threading.Thread | None = None
        self._recent: collections.deque[str] = collections.deque(maxlen=RELAY_KEPT_LINES)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def returncode(self) -> int | None:
        """Return the master's exit status, or None while it runs (or before start)."""
        return None if self.proc is None else self.proc.poll()

    def start(self) -> Self:
        """Start the master. With relay, call relay_output() once every fork is done."""
        if self.log_path is not None:
            # The child keeps its own descriptor; ours is not needed past the fork.
            with open(self.log_path, "wb") as output:
                self.proc = self._popen(output)
        elif self._relay is not None:
            self.proc = self._popen(subprocess.PIPE)
        else:
            self.proc = self._popen(None)
        return self

    def _popen(self, stdout: int | IO[bytes] | None) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            start_new_session=self._own_session,
            # preexec_fn is unsafe once threads run, hence relay_output() as a separate step.
            preexec_fn=_die_with_parent if self._die_with_parent else None,
        )

    def relay_output(self) -> None:
        """Hand each output line to relay, in a thread, until the process closes its output."""
        assert self.proc is not None and self.proc.stdout is not None, "start() with relay first"
        stream, relay = self.proc.stdout, self._relay
        assert relay is not None

        def copy() -> None:
            with stream:
                for raw in stream:
                    line = raw.decode(errors="replace").rstrip("\n")
                    self._recent.append(line)
                    relay(line)

        self._relay_thread = threading.Thread(target=copy, name=f"relay-{self.port}", daemon=True)
        self._relay_thread.start()

    def finish_output(self, timeout: float = 5.0) -> None:
        """Wait (briefly) until an exited process's last lines are relayed."""
        if self._relay_thread is not None:
            self._relay_thread.join(timeout)

    def ready(self, paths: Iterable[str] = ("/health",)) -> bool:
        """Return whether one of the paths answers 200 now."""
        for path in paths:
            # HTTPError (a 503 while the database is unreachable) is an OSError too.
            # HOST, not self.url: a subclass may show another name for the same server.
            with (
                contextlib.suppress(OSError, http.client.HTTPException),
                _opener.open(f"http://{HOST}:{self.port}{path}", timeout=2) as response,
            ):
                if response.status == 200:
                    return True
        return False

    def wait_ready(
        self, paths: Iterable[str] = ("/health",), timeout: float = 30.0, interval: float = 0.05
    ) -> None:
        """Poll until one of the paths answers 200; raise GunicornError, with the log, if the
        process exits or time runs out first."""
        paths = tuple(paths)
        deadline = time.monotonic() + timeout
        while True:
            if self.returncode is not None:
                raise GunicornError(f"{self.name} exited with {self.returncode}:\n{self.tail()}")
            if self.ready(paths):
                return
            if time.monotonic() > deadline:
                raise GunicornError(f"{self.name} not ready after {timeout:g}s:\n{self.tail()}")
            time.sleep(interval)

    def signal(self, signum: int) -> None:
        """Send signum to the master (if it still runs)."""
        if self.returncode is None and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    def kill(self) -> None:
        """kill -9 the master and its workers at once, as a crash or an OOM kill would."""
        if self.proc is None:
            return
        if self._own_session:
            # The group outlives its leader: this also takes workers an exited master left.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        elif self.proc.poll() is None:
            # Listed before the master dies: its orphans would no longer be its children.
            for pid in [self.proc.pid, *children(self.proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to timeout, then kill -9 what is left; return the exit status."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        self.kill()
        self.finish_output()
        return self.proc.returncode

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the master to exit; return its exit status."""
        assert self.proc is not None, "not started"
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        """Return the output so far: the log file, or the last relayed lines."""
        if self.log_path is not None:
            return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(self._recent)

    def tail(self, lines: int = FAILURE_LOG_LINES) -> str:
        """Return the last lines of log()."""
        return "\n".join(self.log().splitlines()[-lines:])
