"""Change events: published inside the changing statement by taskapp_publish() (the one
definition of an event's JSON, migration 0004), fanned out by each instance's listener to its
Server-Sent Events and WebSocket clients."""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import psycopg

from .database import Database

log = logging.getLogger(__name__)

EVENTS_CHANNEL = "taskapp_events"
# Sent when a task becomes claimable, so an idle worker anywhere wakes at once.
WAKEUP_CHANNEL = "taskapp_wakeup"
# Sent (the task id) when a processing task is cancelled or deleted: its holder sets the
# processor's cancellation flag.
CANCEL_CHANNEL = "taskapp_cancel"
# How long a new LISTEN connection waits to hear its own NOTIFY before it says it hears nothing.
DELIVERY_CHECK_SECONDS = 3.0

# Every event type, in the order the docs list them (the OpenAPI spec and the dashboard read
# this tuple; the statements in taskapp/sql/ name them when they publish).
EVENT_TYPES = (
    "task.created",
    "task.updated",
    "task.claimed",
    "task.progress",
    "task.completed",
    "task.retrying",
    "task.deferred",
    "task.failed",
    "task.cancelled",
    "task.deleted",
    "conversation.created",
    "conversation.updated",
    "conversation.output",
)


class TooManyStreams(Exception):
    """The instance already serves MAX_EVENT_STREAMS event streams."""


class Event(NamedTuple):
    """An event as the streams get it: its fields, and its JSON, written once for all of
    them (with hundreds of streams, a dumps() per stream was most of the instance's CPU)."""

    data: dict[str, object]
    text: str


class Subscription:
    """One client's bounded queue of events; a client that falls behind is cut off.

    Two things end separately: the events (close(): a cut-off, a shutdown, the client gone)
    and the stream's slot, held until the request that serves the stream returns (release(),
    on leaving the `with` block), since until then it holds one of the instance's threads.
    """

    def __init__(self, broker: Broker, task_id: int | None, maxsize: int) -> None:
        self._broker = broker
        self.task_id = task_id
        self.queue: queue.Queue[Event | None] = queue.Queue(maxsize=maxsize)
        self.closed = False
        # Why the events stopped, for the client's close frame and the log.
        self.cut_off = False

    def offer(self, event: Event) -> None:
        if self.task_id is not None and event.data.get("task_id") != self.task_id:
            return
        try:
            self.queue.put_nowait(event)
        except queue.Full:
            # A slow client must not hold anyone up: drop it; it can reconnect.
            self.cut_off = True
            self.close()

    def get(self, timeout: float) -> Event | None:
        """The next event, or None on timeout or when the stream was closed."""
        if self.closed and self.queue.empty():
            return None
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        """No more events for this stream (its slot stays held until release())."""
        if not self.closed:
            self.closed = True
            self._broker.unsubscribe(self)
            # Wakes a reader blocked in get(); a full queue will wake it anyway.
            with contextlib.suppress(queue.Full):
                self.queue.put_nowait(None)

    def release(self) -> None:
        """The request serving this stream is done: its slot is free."""
        self.close()
        self._broker.release(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Broker:
    """Fans events from the listener out to this instance's stream clients.

    `open_streams` counts the streams whose requests still run, cut off or not: each holds a
    thread, so that is what MAX_EVENT_STREAMS bounds.
    """

    def __init__(self, max_streams: int, queue_size: int = 1000) -> None:
        self.max_streams = max_streams
        self.queue_size = queue_size
        self._lock = threading.Lock()
        self._subscriptions: set[Subscription] = set()  # those still getting events
        self._streams: set[Subscription] = set()  # those holding a slot
        self._closed = False

    @property
    def open_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    @property
    def receiving(self) -> int:
        """How many streams still get events."""
        with self._lock:
            return len(self._subscriptions)

    def subscribe(self, task_id: int | None = None) -> Subscription:
        with self._lock:
            if self._closed or len(self._streams) >= self.max_streams:
                raise TooManyStreams
            subscription = Subscription(self, task_id, self.queue_size)
            self._subscriptions.add(subscription)
            self._streams.add(subscription)
            return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscriptions.discard(subscription)

    def release(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscriptions.discard(subscription)
            self._streams.discard(subscription)

    def publish(self, event: dict[str, object]) -> None:
        with self._lock:
            subscriptions = list(self._subscriptions)
        if not subscriptions:
            return
        shared = Event(event, json.dumps(event))
        for subscription in subscriptions:
            subscription.offer(shared)

    def close(self) -> None:
        """End every stream (shutdown): their requests return and free their threads."""
        with self._lock:
            self._closed = True
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription.close()


class Listener:
    """One dedicated LISTEN connection per instance, reconnecting by itself.

    Wake-ups go to the worker, cancellations to on_cancel, events to the broker. After a
    reconnect the worker is woken too, since notifications sent while the connection was down
    are lost (a cancellation missed then is still found by the next lease renewal).

    Events are listened to only while this instance serves a stream: every change of every
    instance is an event, and taking each off the wire costs the instance CPU for nothing
    when no one watches (a tenth of a busy worker's time). The first stream asks for them
    (events_wanted) and waits until the LISTEN is in place, so it misses nothing after it
    starts; after the last one ends the listener stops listening.
    """

    def __init__(
        self,
        database: Database,
        broker: Broker,
        on_wakeup: Callable[[], None],
        on_cancel: Callable[[int], object] = lambda task_id: None,
    ) -> None:
        self.database = database
        self.broker = broker
        self.on_wakeup = on_wakeup
        self.on_cancel = on_cancel
        # This listener's own channel: a NOTIFY on it wakes the loop to listen for events.
        self.control_channel = f"taskapp_listener_{uuid.uuid4().hex}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()
        self.listening_to_events = threading.Event()
        # Whether this connection hears NOTIFYs (None: not checked yet). Through PgBouncer in
        # transaction mode LISTEN succeeds and then hears nothing: the worker wakes by polling.
        self.delivering: bool | None = None
        # When the loop last came round (time.monotonic()), for the instance's liveness.
        self.beat_at = time.monotonic()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="taskapp-listener", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def events_wanted(self, timeout: float = 5.0) -> bool:
        """A stream has subscribed: make sure events are being listened to, waiting up to
        `timeout` for it; False if the listener could not (it is reconnecting)."""
        if self.listening_to_events.is_set():
            return True
        try:
            self.database.notify(self.control_channel)
        except Exception as exc:
            log.warning("could not wake the event listener: %s", exc)
        return self.listening_to_events.wait(timeout)

    def _run(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            self.beat_at = time.monotonic()
            try:
                with self.database.listen_connection() as conn:
                    self.database.listen(conn, WAKEUP_CHANNEL)
                    self.database.listen(conn, CANCEL_CHANNEL)
                    self.database.listen(conn, self.control_channel)
                    self.connected.set()
                    delay = 0.1
                    self._check_delivery(conn)
                    self.on_wakeup()
                    while not self._stop.is_set():
                        self.beat_at = time.monotonic()
                        self._listen_to_events_if_wanted(conn)
                        for notify in conn.notifies(timeout=1.0):
                            if notify.channel == self.control_channel:
                                break  # a stream wants events: listen for them now
                            self._dispatch(notify.channel, notify.payload)
                        # An idle connection can die silently; a cheap query finds out.
                        self.database.fetch("ping", conn=conn)
            except Exception as exc:
                self.connected.clear()
                self.listening_to_events.clear()
                if self._stop.is_set():
                    return
                log.warning("event listener disconnected (%s); reconnecting in %.1fs", exc, delay)
                self._back_off(delay)
                delay = min(delay * 2, 5.0)

    def _back_off(self, seconds: float) -> None:
        """Wait before reconnecting, still coming round every second (it is not stalled)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0 and not self._stop.wait(min(left, 1.0)):
            self.beat_at = time.monotonic()

    def _check_delivery(self, conn: psycopg.Connection[Any]) -> None:
        """NOTIFY our own channel through the pool and wait to hear it: a LISTEN through a
        pooler in transaction mode is accepted and never hears anything. Said once, not
        silently: the worker then wakes only by polling, and streams get no events."""
        try:
            self.database.notify(self.control_channel)
        except psycopg.Error as exc:
            log.warning("could not check that LISTEN hears notifications: %s", exc)
            return
        heard = False
        deadline = time.monotonic() + DELIVERY_CHECK_SECONDS
        while not heard and (remaining := deadline - time.monotonic()) > 0:
            for notify in conn.notifies(timeout=remaining):
                if notify.channel == self.control_channel:
                    heard = True
                    break
                self._dispatch(notify.channel, notify.payload)
        if heard and self.delivering is False:
            log.info("LISTEN hears notifications again: workers wake at once")
        elif not heard and self.delivering is not False:
            log.warning(
                "LISTEN hears no notifications (LISTEN_DATABASE_URL through PgBouncer in"
                " transaction mode?): workers wake only by polling (POLL_INTERVAL_SECONDS) and"
                " event streams get no events; point LISTEN_DATABASE_URL at PostgreSQL itself"
            )
        self.delivering = heard

    def _listen_to_events_if_wanted(self, conn: psycopg.Connection[Any]) -> None:
        wanted = self.broker.receiving > 0
        if wanted and not self.listening_to_events.is_set():
            self.database.listen(conn, EVENTS_CHANNEL)
            self.listening_to_events.set()
        elif not wanted and self.listening_to_events.is_set():
            self.database.listen(conn, EVENTS_CHANNEL, listening=False)
            self.listening_to_events.clear()

    def _dispatch(self, channel: str, payload: str) -> None:
        if channel == WAKEUP_CHANNEL:
            self.on_wakeup()
            return
        if channel == CANCEL_CHANNEL:
            if payload.isascii() and payload.isdigit():
                self.on_cancel(int(payload))
            return
        if channel != EVENTS_CHANNEL or self.broker.receiving == 0:
            return  # nobody listens here (any more): skip the parsing
        try:
            event = json.loads(payload)
        except ValueError:
            log.warning("ignored a malformed event: %r", payload[:200])
            return
        self.broker.publish(event)
