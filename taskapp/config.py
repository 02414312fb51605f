"""Settings from the environment, validated once, with the defaults of CONTRACT.md."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from . import affinity

DEFAULT_DATABASE_URL = "postgresql+psycopg://user:password@localhost:5432/taskdb"
DEFAULT_QUEUE = "default"
# A queue's name: what tasks, WORKER_QUEUES and the /queues API accept.
QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


class ConfigError(ValueError):
    """A setting in the environment is malformed; the message names it."""


def normalize_database_url(url: str) -> str:
    """Make every PostgreSQL URL spelling use the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{name} must be 0 or 1, got {raw!r}")


def _parse_number(name: str, raw: str, kind: type, minimum: float | None) -> float | int:
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a {kind.__name__}, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {raw!r}")
    return value


def _queue_name(setting: str, name: str) -> str:
    if not QUEUE_NAME.fullmatch(name):
        raise ConfigError(
            f"{setting}: {name!r} is not a queue name (letters, digits and _.:-, at most 64, "
            "starting with a letter or digit)"
        )
    return name


def _parse_worker_queues(raw: str, default_threads: int | None) -> tuple[tuple[str, int], ...]:
    """`default:4,llm:16` (a name alone gets WORKER_CONCURRENCY threads)."""
    queues: dict[str, int] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        name, colon, count = item.partition(":")
        name = _queue_name("WORKER_QUEUES", name.strip())
        if name in queues:
            raise ConfigError(f"WORKER_QUEUES names {name!r} twice")
        threads = (
            int(_parse_number(f"WORKER_QUEUES ({name})", count.strip(), int, 1))
            if colon
            else default_threads or 1
        )
        queues[name] = threads
    if not queues:
        raise ConfigError("WORKER_QUEUES names no queue")
    return tuple(queues.items())


def _parse_queue_processors(raw: str) -> tuple[tuple[str, str], ...]:
    """`llm=package.module:function,other=...`."""
    processors: dict[str, str] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        name, equals, spec = item.partition("=")
        if not equals:
            raise ConfigError(
                f"QUEUE_PROCESSORS entries look like queue=module:function, got {item!r}"
            )
        processors[_queue_name("QUEUE_PROCESSORS", name.strip())] = spec.strip()
    return tuple(processors.items())


# What OTEL_TRACES_EXPORTER may name: the exporters installed (requirements.txt).
TRACES_EXPORTERS = ("otlp", "console", "none")


def _parse_traces_exporters(get: Any) -> tuple[str, ...]:
    """The span exporters the standard OpenTelemetry variables ask for (empty: tracing off)."""
    if (get("OTEL_SDK_DISABLED") or "").lower() == "true":
        return ()
    raw = get("OTEL_TRACES_EXPORTER")
    if raw is None:
        endpoint = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or get("OTEL_EXPORTER_OTLP_ENDPOINT")
        names: tuple[str, ...] = ("otlp",) if endpoint else ()
    else:
        names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
        for name in names:
            if name not in TRACES_EXPORTERS:
                raise ConfigError(
                    f"OTEL_TRACES_EXPORTER: {name!r} is not one of {', '.join(TRACES_EXPORTERS)}"
                )
        names = tuple(n for n in names if n != "none")
    if "otlp" in names:
        for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = get(variable)
            if protocol is not None:
                if protocol != "http/protobuf":
                    raise ConfigError(
                        f"{variable} must be http/protobuf (the OTLP exporter installed), "
                        f"got {protocol!r}"
                    )
                break
    return names


@dataclass(frozen=True)
class Settings:
    """Everything an instance can be told through its environment."""

    database_url: str = DEFAULT_DATABASE_URL
    # The LISTEN connection's database, when statements go through a pooler in transaction
    # mode (PgBouncer) that can't keep a LISTEN: the same database, reached directly. None:
    # DATABASE_URL.
    listen_database_url: str | None = None
    processing_min_seconds: float = 6.0
    processing_max_seconds: float = 7.0
    task_processor: str = "taskapp.processor:simulate_work"
    worker_enabled: bool = True
    worker_concurrency: int = 1
    # The queues this instance serves, with their work threads: WORKER_QUEUES=default:4,llm:16
    # (empty: `default` with WORKER_CONCURRENCY threads).
    worker_queues: tuple[tuple[str, int], ...] = ()
    # A queue's own processor: QUEUE_PROCESSORS=llm=package.module:function (else
    # TASK_PROCESSOR).
    queue_processors: tuple[tuple[str, str], ...] = ()
    poll_interval_seconds: float = 1.0
    lease_seconds: float = 30.0
    max_attempts: int = 3
    retry_base_seconds: float = 2.0
    shutdown_grace_seconds: float = 10.0
    # After SIGTERM, how long the instance goes on serving requests (/readyz: draining) before
    # it stops accepting them, so a load balancer can take it out of rotation first.
    drain_seconds: float = 0.0
    api_keys: tuple[str, ...] = ()
    log_format: str = "text"
    auto_migrate: bool = True
    max_content_length: int = 1024 * 1024
    # The largest JSON a processor may return (or checkpoint) as a result, in bytes.
    result_max_bytes: int = 1024 * 1024
    # An attempt's time limit when its task names none (0: none); past it the processor's
    # cancellation flag is set, and TIMEOUT_GRACE_SECONDS later the attempt fails.
    task_timeout_seconds: int = 3600
    timeout_grace_seconds: float = 1.0
    # How often one task may ask to run later (processor.Defer) before that costs an attempt.
    max_deferrals: int = 20
    # How long finished tasks are kept, per status, in seconds (0: for ever); the housekeeper
    # deletes older ones in small batches.
    retention_completed_seconds: float = 0.0
    retention_failed_seconds: float = 0.0
    retention_cancelled_seconds: float = 0.0
    max_event_streams: int = 100
    # Every statement of an instance shares this pool (database.Database.max_connections).
    db_pool_size: int = 20
    # psycopg prepares a statement run five times; off behind PgBouncer in transaction mode
    # (before 1.21, or without max_prepared_statements), where that fails.
    db_prepared_statements: bool = True
    event_keepalive_seconds: float = 15.0
    # How long a write to an event stream's client may wait for room in its socket buffer
    # before the client counts as stalled and is disconnected.
    event_send_timeout_seconds: float = 5.0
    # /livez fails when a background loop of this instance has not come round for this long:
    # longer than any wait on an unreachable database (5 s to connect, 5 s for a pooled
    # connection), so an outage alone never fails it.
    liveness_stall_seconds: float = 60.0
    # OpenTelemetry span exporters ("otlp", "console"), from the standard OTEL_* variables;
    # empty: no tracing (taskapp.tracing imports nothing of OpenTelemetry then).
    traces_exporters: tuple[str, ...] = ()
    # CPU_AFFINITY: the CPUs gunicorn's worker processes are pinned to, one each in turn
    # (taskapp.affinity); empty: the OS places them.
    cpu_affinity: tuple[int, ...] = ()
    instance_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate the settings; raise ConfigError naming the bad variable."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            raw = env.get(name)
            return None if raw is None or raw.strip() == "" else raw.strip()

        values: dict[str, Any] = {}
        if (url := get("DATABASE_URL")) is not None:
            values["database_url"] = url
        if (url := get("LISTEN_DATABASE_URL")) is not None:
            values["listen_database_url"] = url
        numbers = {
            "PROCESSING_MIN_SECONDS": ("processing_min_seconds", float, 0),
            "PROCESSING_MAX_SECONDS": ("processing_max_seconds", float, 0),
            "WORKER_CONCURRENCY": ("worker_concurrency", int, 1),
            "POLL_INTERVAL_SECONDS": ("poll_interval_seconds", float, 0.01),
            "LEASE_SECONDS": ("lease_seconds", float, 1),
            "MAX_ATTEMPTS": ("max_attempts", int, 1),
            "RETRY_BASE_SECONDS": ("retry_base_seconds", float, 0),
            "SHUTDOWN_GRACE_SECONDS": ("shutdown_grace_seconds", float, 0),
            "DRAIN_SECONDS": ("drain_seconds", float, 0),
            "MAX_CONTENT_LENGTH": ("max_content_length", int, 1),
            "RESULT_MAX_BYTES": ("result_max_bytes", int, 1),
            "TASK_TIMEOUT_SECONDS": ("task_timeout_seconds", int, 0),
            "TIMEOUT_GRACE_SECONDS": ("timeout_grace_seconds", float, 0),
            "MAX_DEFERRALS": ("max_deferrals", int, 0),
            "RETENTION_COMPLETED_SECONDS": ("retention_completed_seconds", float, 0),
            "RETENTION_FAILED_SECONDS": ("retention_failed_seconds", float, 0),
            "RETENTION_CANCELLED_SECONDS": ("retention_cancelled_seconds", float, 0),
            "MAX_EVENT_STREAMS": ("max_event_streams", int, 0),
            "DB_POOL_SIZE": ("db_pool_size", int, 1),
            "EVENT_KEEPALIVE_SECONDS": ("event_keepalive_seconds", float, 0.1),
            "EVENT_SEND_TIMEOUT_SECONDS": ("event_send_timeout_seconds", float, 0.1),
            "LIVENESS_STALL_SECONDS": ("liveness_stall_seconds", float, 1),
        }
        for name, (attr, kind, minimum) in numbers.items():
            if (raw := get(name)) is not None:
                values[attr] = _parse_number(name, raw, kind, minimum)
        flags = (
            ("WORKER_ENABLED", "worker_enabled"),
            ("AUTO_MIGRATE", "auto_migrate"),
            ("DB_PREPARED_STATEMENTS", "db_prepared_statements"),
        )
        for name, attr in flags:
            if (raw := get(name)) is not None:
                values[attr] = _parse_bool(name, raw)
        if (processor := get("TASK_PROCESSOR")) is not None:
            values["task_processor"] = processor
        if (raw := get("WORKER_QUEUES")) is not None:
            values["worker_queues"] = _parse_worker_queues(raw, values.get("worker_concurrency"))
        if (raw := get("QUEUE_PROCESSORS")) is not None:
            values["queue_processors"] = _parse_queue_processors(raw)
        if (keys := get("API_KEYS")) is not None:
            values["api_keys"] = tuple(k.strip() for k in keys.split(",") if k.strip())
        if (log_format := get("LOG_FORMAT")) is not None:
            if log_format not in {"text", "json"}:
                raise ConfigError(f"LOG_FORMAT must be text or json, got {log_format!r}")
            values["log_format"] = log_format
        if (raw := get("CPU_AFFINITY")) is not None:
            try:
                values["cpu_affinity"] = affinity.parse(raw)
            except affinity.AffinityError as exc:
                raise ConfigError(str(exc)) from None
        values["traces_exporters"] = _parse_traces_exporters(get)
        return cls(**values).validated()

    def validated(self) -> Settings:
        """Check the cross-field rules and normalise the database URL."""
        if self.processing_max_seconds < self.processing_min_seconds:
            raise ConfigError("PROCESSING_MAX_SECONDS must be >= PROCESSING_MIN_SECONDS")
        if ":" not in self.task_processor:
            raise ConfigError("TASK_PROCESSOR must look like package.module:function")
        for name, spec in self.queue_processors:
            if ":" not in spec:
                raise ConfigError(
                    f"QUEUE_PROCESSORS: {name}'s processor must look like "
                    f"package.module:function, got {spec!r}"
                )
        url = normalize_database_url(self.database_url)
        if not url.startswith("postgresql+psycopg://"):
            raise ConfigError("DATABASE_URL must be a postgresql:// URL")
        listen_url = self.listen_database_url
        if listen_url is not None:
            listen_url = normalize_database_url(listen_url)
            if not listen_url.startswith("postgresql+psycopg://"):
                raise ConfigError("LISTEN_DATABASE_URL must be a postgresql:// URL")
        if (url, listen_url) == (self.database_url, self.listen_database_url):
            return self
        return replace(self, database_url=url, listen_database_url=listen_url)

    @property
    def listen_url(self) -> str:
        """The LISTEN connection's database: LISTEN_DATABASE_URL, else DATABASE_URL."""
        return self.listen_database_url or self.database_url

    @property
    def served_queues(self) -> dict[str, int]:
        """The queues this instance's worker serves, with their work threads."""
        return dict(self.worker_queues) or {DEFAULT_QUEUE: self.worker_concurrency}

    def processor_for(self, queue_name: str) -> str:
        """The processor ('package.module:function') that runs this queue's tasks."""
        return dict(self.queue_processors).get(queue_name, self.task_processor)

    @property
    def retention(self) -> dict[str, float]:
        """How long finished tasks of each status are kept, for the statuses with a limit."""
        kept = {
            "completed": self.retention_completed_seconds,
            "failed": self.retention_failed_seconds,
            "cancelled": self.retention_cancelled_seconds,
        }
        return {status: seconds for status, seconds in kept.items() if seconds > 0}

    @property
    def heartbeat_seconds(self) -> float:
        """How often an instance renews its leases and beats: several times a lease."""
        return min(self.lease_seconds / 3, 5.0)

    def with_changes(self, **changes: Any) -> Settings:
        """A copy with some settings changed (for tests and tools)."""
        return replace(self, **changes).validated()
