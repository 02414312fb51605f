"""A PgBouncer (Debian's `pgbouncer`) in front of a PostgreSQL server, for tests and benchmarks.

It listens on 127.0.0.1 and sends every database to the same name on the upstream server, in
transaction mode by default: a server connection is lent to a client for one transaction, so
nothing of a session (prepared statements, LISTEN, SET, session advisory locks) outlives it.
PgBouncer refuses to run as root; as root it runs as the embedded PostgreSQL's system user,
which gets its own copy of the configuration.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psycopg

from tools.embedded_pg import SYSTEM_USER, _chown_tree, _ensure_system_user
from tools.gunicorn_process import free_port

HOST = "127.0.0.1"
START_TIMEOUT_SECONDS = 15


def pgbouncer_binary() -> str:
    """The pgbouncer executable (Debian puts it in /usr/sbin), or an error naming the package."""
    found = shutil.which("pgbouncer", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        raise RuntimeError("pgbouncer is not installed: apt-get install pgbouncer")
    return found


class PgBouncer:
    """One pgbouncer process; start() waits until it lends connections, stop() ends it."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        pool_mode: str = "transaction",
        pool_size: int = 10,
        max_client_conn: int = 400,
        port: int | None = None,
        ignore_startup_parameters: str = "",
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.port = port or free_port(HOST)
        # e.g. "options": accept and drop libpq's session options instead of refusing them.
        self.ignore_startup_parameters = ignore_startup_parameters
        self.user = "postgres"
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def in_front_of(cls, server_url: str, **options: object) -> PgBouncer:
        """A PgBouncer for the server of a postgresql:// URL (its host and port)."""
        info = psycopg.conninfo.conninfo_to_dict(server_url)
        return cls(str(info.get("host", HOST)), int(info.get("port", 5432)), **options)  # type: ignore[arg-type]

    def url(self, dbname: str) -> str:
        """The postgresql:// URL of a database, through this PgBouncer."""
        return f"postgresql://{self.user}@{HOST}:{self.port}/{dbname}"

    @property
    def log_file(self) -> Path:
        assert self._dir is not None
        return self._dir / "pgbouncer.log"

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> PgBouncer:
        self._dir = Path(tempfile.mkdtemp(prefix="taskapp-pgbouncer-"))
        (self._dir / "users.txt").write_text(f'"{self.user}" ""\n')
        (self._dir / "pgbouncer.ini").write_text(self._config())
        command = [pgbouncer_binary()]
        if os.geteuid() == 0:
            uid, gid = _ensure_system_user(SYSTEM_USER)
            os.chmod(self._dir, 0o755)
            _chown_tree(self._dir, uid, gid)
            command += ["-u", SYSTEM_USER]
        command.append(str(self._dir / "pgbouncer.ini"))
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_until_serving()
        return self

    def stop(self) -> None:
        """Shut down at once (SIGTERM: clients are cut); no-op when not running."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _config(self) -> str:
        assert self._dir is not None
        return f"""\
[databases]
* = host={self.upstream_host} port={self.upstream_port}

[pgbouncer]
listen_addr = {HOST}
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self._dir / "users.txt"}
admin_users = {self.user}
pool_mode = {self.pool_mode}
default_pool_size = {self.pool_size}
max_client_conn = {self.max_client_conn}
logfile = {self.log_file}
pidfile = {self._dir / "pgbouncer.pid"}
ignore_startup_parameters = {self.ignore_startup_parameters}
"""

    def _wait_until_serving(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited ({self._process.returncode}):\n{self.log()}")
            try:
                # The admin console answers without reaching the upstream server.
                with psycopg.connect(self.url("pgbouncer"), autocommit=True, connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                last = exc
            time.sleep(0.05)
        raise RuntimeError(f"pgbouncer did not start: {last}\n{self.log()}")
