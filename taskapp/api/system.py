"""Health, status and metrics of this instance and of the queue it shares."""

from __future__ import annotations

import logging
import os
import socket

import psycopg
from flask import Blueprint, current_app, jsonify

from .. import metrics, queue, runtime
from ..database import get_database, schema_state

bp = Blueprint("system", __name__)
log = logging.getLogger(__name__)

# An instance that has not beaten for this many lease-renewal rounds is presumed dead.
STALE_AFTER_BEATS = 3


@bp.get("/health")
def health():
    try:
        get_database().fetch("ping")
    except psycopg.Error as exc:
        # /health is public: the error (host, port, user) goes to the log, not to the client.
        log.warning("health check: database unreachable (%s)", str(exc).split("\n")[0])
        return jsonify({"status": "unhealthy", "database": "unreachable"}), 503
    return jsonify({"status": "healthy", "database": "ok"})


@bp.get("/livez")
def livez():
    """Whether this instance's own threads run; never asks the database, so an outage does not
    get healthy instances restarted."""
    instance = runtime.current(current_app)
    threads = instance.liveness() if instance else {}
    alive = all(state == "ok" for state in threads.values())
    body = {"status": "alive" if alive else "dead", "threads": threads}
    return jsonify(body), 200 if alive else 503


@bp.get("/readyz")
def readyz():
    """Whether this instance should get requests: the database answers, the schema is not
    behind this code, and it is not draining after a SIGTERM."""
    instance = runtime.current(current_app)
    draining = bool(instance and instance.draining)
    try:
        schema = schema_state(get_database())
        database = "ok"
    except psycopg.Error as exc:
        log.warning("readiness: database unreachable (%s)", str(exc).split("\n")[0])
        schema, database = "unknown", "unreachable"
    ready = database == "ok" and schema != "behind" and not draining
    body = {
        "status": "ready" if ready else "not ready",
        "database": database,
        "schema": schema,
        "draining": draining,
    }
    return jsonify(body), 200 if ready else 503


@bp.get("/status")
def status():
    settings = current_app.config["TASKAPP"]
    instance = runtime.current(current_app)
    database = get_database()
    worker = instance.worker if instance else None
    current_ids = worker.current_task_ids if worker else []
    stale_after = STALE_AFTER_BEATS * settings.heartbeat_seconds
    known = queue.instances(database)
    return jsonify(
        {
            "instance_id": settings.instance_id,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "worker": {
                "enabled": settings.worker_enabled,
                "running": bool(worker and worker.running),
                "concurrency": sum(settings.served_queues.values())
                if settings.worker_enabled
                else 0,
                "queues": settings.served_queues if settings.worker_enabled else {},
                "current_task": current_ids[0] if current_ids else None,
                "current_tasks": current_ids,
                "processed": worker.processed_count if worker else 0,
                "failed": worker.failed_count if worker else 0,
                "started_at": worker.started_at.isoformat() if worker else None,
            },
            "queue": queue.queue_counts(database),
            "instances": [
                _instance_view(row)
                for row in known
                if row["stopped_at"] is None and row["heartbeat_age_seconds"] <= stale_after
            ],
            "event_streams": {
                "open": instance.broker.open_streams if instance else 0,
                "max": settings.max_event_streams,
            },
            # Requests wait for a connection when in_use reaches max, and get a 503 after 5 s.
            "database_connections": database.stats(),
        }
    )


@bp.get("/metrics")
def metrics_page():
    instance = runtime.current(current_app)
    settings = current_app.config["TASKAPP"]
    streams = (instance.broker.open_streams if instance else 0, settings.max_event_streams)
    return metrics.render(get_database(), streams)


def _instance_view(row: dict) -> dict:
    return {
        "instance_id": row["id"],
        "hostname": row["hostname"],
        "pid": row["pid"],
        "worker_running": row["worker_running"],
        "current_tasks": row["current_task_ids"],
        "processed": row["processed_count"],
        "failed": row["failed_count"],
        "started_at": row["started_at"].isoformat(),
        "last_heartbeat": row["heartbeat_at"].isoformat(),
        "heartbeat_age_seconds": round(float(row["heartbeat_age_seconds"]), 3),
    }
