"""Fixtures: a real PostgreSQL database per test session, apps, clients and gunicorn instances.

TEST_DATABASE_URL names a server to use (a database is created on it for the session and
dropped afterwards); without it, an embedded PostgreSQL is started in .pgdata-test/.

Every test is put in one tier at collection (pytest_collection_modifyitems below), so a new
test lands in the right one without being marked by hand: `slow` (browser, benchmarks, real
gunicorn processes, PostgreSQL restarts), `soak` (only when asked for), `fast` (the rest).
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from psycopg import sql

from taskapp import create_app
from taskapp.config import Settings
from taskapp.database import Database, upgrade_schema
from taskapp.housekeeper import Housekeeper
from taskapp.processor import Processor
from taskapp.worker import Worker
from tests.support import ROOT, Instance
from tools.pgbouncer import PgBouncer

TABLES = "tasks, conversations, task_errors, instances, idempotency_keys, queues, concurrency_keys"

# Whole modules in the slow tier: headless Chromium, the benchmarks, faults, outages and shutdowns
# on several gunicorn processes, PostgreSQL restarts, run_local.py's stack.
SLOW_MODULES = frozenset(
    {
        "test_bench",
        "test_dashboard",
        "test_faults",
        "test_outages",
        "test_run_local",
        "test_shutdown",
        "test_soak",
    }
)


def _is_slow(item: pytest.Item) -> bool:
    if item.get_closest_marker("slow") or item.get_closest_marker("browser"):
        return True
    module = getattr(item, "module", None)
    if module is not None and module.__name__.rpartition(".")[2] in SLOW_MODULES:
        return True
    # `instances` starts gunicorn processes; `private_postgres` a PostgreSQL server to stop.
    if {"instances", "private_postgres"} & set(item.fixturenames):
        return True
    # A test asking for the server itself, not the session's database, makes its own databases,
    # servers or instances. server_url is in every database test's closure through database_url,
    # so only the test's own arguments and its other fixtures' count.
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    asked = set(info.argnames)
    for name, fixturedefs in info.name2fixturedefs.items():
        if name != "database_url":
            for fixturedef in fixturedefs:
                asked.update(fixturedef.argnames)
    return "server_url" in asked


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put each test in the `slow` or the `fast` tier; soak tests are in neither."""
    for item in items:
        if not item.get_closest_marker("soak"):
            item.add_marker(pytest.mark.slow if _is_slow(item) else pytest.mark.fast)


def _server_url() -> Iterator[str]:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    from tools.embedded_pg import EmbeddedPostgres

    with EmbeddedPostgres(Path(ROOT) / ".pgdata-test") as server:
        yield server.url("postgres")


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    yield from _server_url()


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    """A fresh database with the schema at head, dropped when the session ends."""
    name = f"taskapp_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _with_database(server_url, name)
    upgrade_schema(create_app(Settings(database_url=url, auto_migrate=False).validated()))
    yield url
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def db_conn(database_url: str) -> Iterator[psycopg.Connection]:
    """A direct autocommit connection, for checking what the service wrote."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(autouse=True)
def _clean_tables(request: pytest.FixtureRequest) -> None:
    # Committed rows cross connections (worker threads, gunicorn): truncate, not roll back.
    if "database_url" not in request.fixturenames:
        return
    url = request.getfixturevalue("database_url")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        auto_migrate=False,
        processing_min_seconds=0,
        processing_max_seconds=0,
        poll_interval_seconds=0.2,
        retry_base_seconds=0,
    ).validated()


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    app = create_app(settings)
    app.config["TESTING"] = True
    yield app
    from taskapp.database import get_database

    get_database(app).close()  # the app's pool: its connections must not outlive the test


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def instances(database_url: str) -> Iterator[Callable[..., Instance]]:
    """Start gunicorn instances against the test database; all are stopped afterwards."""
    started: list[Instance] = []

    def start(wait: bool = True, port: int | None = None, **env: object) -> Instance:
        instance = Instance(database_url, port=port, **env)
        started.append(instance)
        return instance.start(wait=wait)

    yield start
    # All at once: each stop is a SIGTERM and a wait of up to a second or more for the
    # instance's drain and hand-back, which the instances do side by side as in a deployment.
    with ThreadPoolExecutor(max(1, len(started))) as pool:
        list(pool.map(lambda instance: instance.stop(timeout=20), started))


# -- the worker in-process (tests/test_worker.py, tests/test_results.py) ----------------------


@pytest.fixture
def gateway(settings: Settings) -> Iterator[Database]:
    gateway = Database(settings.database_url, pool_size=5)
    yield gateway
    gateway.close()


@pytest.fixture
def run_worker(
    gateway: Database, settings: Settings
) -> Iterator[Callable[..., tuple[Worker, Housekeeper]]]:
    """Start a worker (and its housekeeper) with a processor; both are stopped afterwards."""
    started: list[tuple[Worker, Housekeeper]] = []

    def start(processor: Processor, **changes: object) -> tuple[Worker, Housekeeper]:
        config = settings.with_changes(**changes)
        worker = Worker(
            database=gateway, settings=config, processor=processor, instance_id="in-process"
        )
        housekeeper = Housekeeper(
            database=gateway, settings=config, instance_id="in-process", worker=worker
        )
        worker.start()
        housekeeper.start()
        started.append((worker, housekeeper))
        return worker, housekeeper

    yield start
    for worker, housekeeper in started:
        worker.stop(grace=0)
        housekeeper.stop()


def _port_outside_ephemeral_range() -> int | None:
    """A free port the kernel never hands out as a client's source port (None: any port).

    While the server is down the service keeps connecting to its port; were that port in the
    ephemeral range, one of those attempts (or any other client on the machine) could end up
    holding it, and the server could not listen on it again.
    """
    from tools.embedded_pg import port_is_free

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    candidates = list(range(max(1024, low - 10000), low))
    random.shuffle(candidates)
    return next((port for port in candidates[:200] if port_is_free(port)), None)


@pytest.fixture
def private_postgres(tmp_path):
    """A PostgreSQL server of this test's own, which it may stop and start at will.

    The shared server must never be restarted by a test, so this one always runs on the
    embedded PostgreSQL that requirements-dev.txt installs; if it can't start, the test fails.
    """
    from tools.embedded_pg import EmbeddedPostgres

    server = EmbeddedPostgres(tmp_path / "pgdata", port=_port_outside_ephemeral_range())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pgbouncer(server_url: str) -> Iterator[PgBouncer]:
    """A real PgBouncer in transaction mode in front of the test server (10 server connections
    per database); the test's instances reach it with `pgbouncer.url(dbname)`."""
    with PgBouncer.in_front_of(server_url, pool_size=10) as bouncer:
        yield bouncer
