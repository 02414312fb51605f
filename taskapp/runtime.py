"""An instance's background parts (worker, housekeeper, event listener, stream broker) and
their lifecycle.

gunicorn.conf.py drives it: post_fork starts it in each worker process, a SIGTERM begins
the graceful stop at once, and worker_exit finishes it. Nothing here runs on import or in
create_app, so `flask` commands and tests get a plain app.
"""

from __future__ import annotations

import logging
import threading
import time

from flask import Flask

from .config import Settings
from .database import Database, get_database
from .events import Broker, Listener
from .housekeeper import Housekeeper
from .processor import CancelReason, load_processor
from .worker import Worker

log = logging.getLogger(__name__)

EXTENSION_KEY = "taskapp.runtime"


class Runtime:
    def __init__(self, app: Flask) -> None:
        settings: Settings = app.config["TASKAPP"]
        self.database: Database = get_database(app)
        self.settings = settings
        self.broker = Broker(max_streams=settings.max_event_streams)
        self.worker = Worker(
            database=self.database,
            settings=settings,
            processor=load_processor(settings),
            processors={name: load_processor(settings, name) for name in settings.served_queues},
            instance_id=settings.instance_id,
        )
        self.housekeeper = Housekeeper(
            database=self.database,
            settings=settings,
            instance_id=settings.instance_id,
            worker=self.worker,
        )
        self.listener = Listener(
            self.database,
            self.broker,
            on_wakeup=self.worker.wake,
            on_cancel=lambda task_id: self.worker.revoke(task_id, CancelReason.CANCELLED),
        )
        self._stopper: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def draining(self) -> bool:
        """True from the first SIGTERM (or shutdown) on: stopping claiming, finishing tasks."""
        return self._stopper is not None

    def liveness(self) -> dict[str, str]:
        """Each background part of this instance: "ok", "dead" (its thread ended) or
        "stalled" (its loop has not come round for LIVENESS_STALL_SECONDS). Parts stop on
        purpose while draining, so then every one is "ok". Reads no database."""
        if self.draining:
            return {"listener": "ok", "housekeeper": "ok", "worker": "ok"}
        now, limit = time.monotonic(), self.settings.liveness_stall_seconds

        def loop(alive: bool, came_round_at: float) -> str:
            if not alive:
                return "dead"
            return "stalled" if now - came_round_at > limit else "ok"

        dead = self.worker.dead_threads()
        return {
            "listener": loop(self.listener.alive, self.listener.beat_at),
            "housekeeper": loop(self.housekeeper.alive, self.housekeeper.round_at),
            "worker": "dead: " + ", ".join(dead) if dead else "ok",
        }

    def start(self) -> None:
        self.listener.start()
        self.worker.start()
        self.housekeeper.start()

    def begin_shutdown(self, grace: float | None = None) -> None:
        """Stop claiming and end event streams now; finish the running tasks in the background."""
        with self._lock:
            if self._stopper is not None:
                return
            self.worker.begin_stop()
            self.broker.close()
            self._stopper = threading.Thread(
                target=self._stop, args=(grace,), name="taskapp-stopper", daemon=True
            )
            self._stopper.start()

    def _stop(self, grace: float | None) -> None:
        # The housekeeper keeps renewing leases while running tasks use their grace period.
        self.worker.stop(grace)
        self.housekeeper.stop()

    def shutdown(self, grace: float | None = None) -> None:
        """Complete the graceful stop (idempotent)."""
        self.begin_shutdown(grace)
        assert self._stopper is not None
        self._stopper.join()
        self.listener.stop()


def start(app: Flask) -> Runtime:
    """Start the instance's background parts once per process."""
    runtime = app.extensions.get(EXTENSION_KEY)
    if runtime is None:
        runtime = Runtime(app)
        app.extensions[EXTENSION_KEY] = runtime
        runtime.start()
    return runtime


def current(app: Flask) -> Runtime | None:
    return app.extensions.get(EXTENSION_KEY)


def start_in_gunicorn_worker(app: Flask, *, preloaded: bool) -> Runtime:
    """post_fork: give the child its own connections, then start."""
    if preloaded:
        # The parent's pooled connections must not be shared across fork.
        get_database(app).after_fork()
    return start(app)
