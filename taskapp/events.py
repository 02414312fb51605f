"""Change events: published inside the changing statement by taskapp_publish() (the one
definition of an event's JSON, migration 0004), fanned out by each instance's listener to its
Server-Sent Events and WebSocket clients."""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg

from .database import Database

log = logging.getLogger(__name__)

EVENTS_CHANNEL = "taskapp_events"
# Sent when a task becomes claimable, so an idle worker anywhere wakes at once.
WAKEUP_CHANNEL = "taskapp_wakeup"
# Sent (the task id) when a processing task is cancelled or deleted: its holder sets the
# processor's cancellation flag.
CANCEL_CHANNEL = "taskapp_cancel"
# "A stream is open here": every instance that hears it keeps events (listens, fills its
# ring) for LINGER_SECONDS, so a client of that stream may resume on any of them, and
# PostgreSQL sends events for as long (taskapp_publish() sends none while nobody watches,
# migration 0011). Sent by an instance with streams every ANNOUNCE_SECONDS, and at once when
# a listener that connects asks on STREAMS_QUERY_CHANNEL.
STREAMS_CHANNEL = "taskapp_streams"
STREAMS_QUERY_CHANNEL = "taskapp_streams_query"
ANNOUNCE_SECONDS = 10.0
LINGER_SECONDS = 60.0
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


# A stream's own event (not a change): the client can't be told what it missed, and should
# fetch the state it shows anew. Its `id` (when it has one) is where the stream is now.
RESET_TYPE = "stream.reset"

# The ring of recent events each instance keeps for resuming streams: the last this many, and
# at most this many bytes of them (live output chunks are up to 8 KB each). Ten times the lag
# that cuts a slow client off (Broker.queue_size), so a client cut off can always resume.
REPLAY_EVENTS = 10_000
REPLAY_BYTES = 8 * 1024 * 1024
# How long a resume waits for an id this instance has not heard yet (newer than any it has):
# the client comes from an instance whose listener was a few milliseconds ahead of ours.
RESUME_WAIT_SECONDS = 1.0

# The head taskapp_publish() gives every event (migration 0009): its id is read from the text
# without parsing the JSON, as every instance keeps every event, watched or not.
_ID_PREFIX = '{"id" : '


def event_time(at: datetime | None = None) -> str:
    """An event's `at`: RFC 3339 in UTC with six fractional digits, as taskapp_publish()
    writes it (`2026-12-02T19:30:00.000000+00:00`)."""
    return (at or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="microseconds")


class Event:
    """An event as the streams get it: its id and its JSON text, as taskapp_publish() wrote
    it, sent on unchanged (one text for every stream). Its type and task are read from the
    text only when a stream asks (a filter, a named event)."""

    __slots__ = ("_head", "id", "text")

    def __init__(self, id: int | None, text: str, head: tuple[object, object] | None = None):
        self.id = id
        self.text = text
        self._head = head

    @classmethod
    def from_payload(cls, payload: str) -> Event | None:
        """The event of a NOTIFY payload; None if it is not a JSON object."""
        if payload.startswith(_ID_PREFIX):
            end = payload.find(",", len(_ID_PREFIX))
            digits = payload[len(_ID_PREFIX) : end]
            if end > 0 and digits.isascii() and digits.isdigit():
                return cls(int(digits), payload)
        # Not made by taskapp_publish() (an older schema, a NOTIFY by hand): parse it, and
        # write it anew, since an SSE data line can't hold the newlines JSON may have.
        try:
            data = json.loads(payload)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        event_id = data.get("id")
        if not isinstance(event_id, int) or isinstance(event_id, bool) or event_id < 0:
            event_id = None
        return cls(event_id, json.dumps(data), (data.get("type"), data.get("task_id")))

    @classmethod
    def reset(cls, reason: str, position: int | None) -> Event:
        """A stream.reset: `reason` says why; `position`, the id the stream is now at."""
        data: dict[str, object] = {"type": RESET_TYPE, "reason": reason, "at": event_time()}
        if position is not None:
            data = {"id": position, **data}
        return cls(position, json.dumps(data), (RESET_TYPE, None))

    def _parsed(self) -> tuple[object, object]:
        if self._head is None:
            data = json.loads(self.text)
            self._head = (data.get("type"), data.get("task_id"))
        return self._head

    @property
    def type(self) -> str | None:
        value = self._parsed()[0]
        return value if isinstance(value, str) else None

    @property
    def task_id(self) -> object:
        return self._parsed()[1]


class Subscription:
    """One client's stream: the events it missed (a resume), then a bounded queue of live
    events; a client that falls behind is cut off, and can resume.

    Two things end separately: the events (close(): a cut-off, a shutdown, the client gone)
    and the stream's slot, held until the request that serves the stream returns (release(),
    on leaving the `with` block), since until then it holds one of the instance's threads.
    """

    def __init__(self, broker: Broker, task_id: int | None, maxsize: int) -> None:
        self._broker = broker
        self.task_id = task_id
        self.queue: queue.Queue[Event | None] = queue.Queue(maxsize=maxsize)
        # A resume's events from the ring, sent before the live ones (filled before the
        # subscription gets any live event, read only by the stream's thread).
        self.backlog: collections.deque[Event] = collections.deque()
        self.closed = False
        # Why the events stopped, for the client's close frame and the log.
        self.cut_off = False
        # A resume from an id not heard here yet: live events are skipped (the client had
        # them) until that id comes, or a reset is sent after RESUME_WAIT_SECONDS.
        self._lock = threading.Lock()
        self._awaiting: int | None = None
        self._await_until = 0.0
        self._skipped_to: int | None = None

    def matches(self, event: Event) -> bool:
        return self.task_id is None or event.type == RESET_TYPE or event.task_id == self.task_id

    def offer(self, event: Event) -> None:
        if self._awaiting is not None:
            with self._lock:
                if self._awaiting is not None:
                    if event.id is not None:
                        self._skipped_to = event.id
                    if event.id == self._awaiting:
                        self._awaiting = None
                    return
        if not self.matches(event):
            return
        try:
            self.queue.put_nowait(event)
        except queue.Full:
            # A slow client must not hold anyone up: drop it; it can reconnect and resume.
            self.cut_off = True
            self.close()

    def await_id(self, event_id: int) -> None:
        """Skip live events up to `event_id`, which this instance has not heard yet."""
        self._awaiting = event_id
        self._await_until = time.monotonic() + RESUME_WAIT_SECONDS

    def get(self, timeout: float) -> Event | None:
        """The next event, or None on timeout or when the stream was closed."""
        if self.backlog:
            return self.backlog.popleft()
        if self._awaiting is not None:
            left = self._await_until - time.monotonic()
            if left > 0:
                # Only a close, or the events after the awaited id once it came, arrive here.
                with contextlib.suppress(queue.Empty):
                    return self.queue.get(timeout=min(timeout, left))
            with self._lock:
                if self._awaiting is None or time.monotonic() < self._await_until:
                    return None
                self._awaiting = None
                return Event.reset("unknown event id", self._skipped_to)
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
    """Fans events from the listener out to this instance's stream clients, and keeps the
    most recent ones (every event, watched or not) to replay to a client that resumes.

    Every instance hears every event in the same order (PostgreSQL's one notification queue,
    in commit order), so an id means the same place in the stream on all of them: a client
    may resume on any instance. Ids come from one sequence but may arrive out of numeric
    order (a transaction that took its id first can commit last), so a resume looks the id
    up and replays what arrived after it, never "the ids above it".

    `open_streams` counts the streams whose requests still run, cut off or not: each holds a
    thread, so that is what MAX_EVENT_STREAMS bounds.
    """

    def __init__(
        self,
        max_streams: int,
        queue_size: int = 1000,
        replay_events: int = REPLAY_EVENTS,
        replay_bytes: int = REPLAY_BYTES,
    ) -> None:
        self.max_streams = max_streams
        self.queue_size = queue_size
        self.replay_events = replay_events
        self.replay_bytes = replay_bytes
        self._lock = threading.Lock()
        self._subscriptions: set[Subscription] = set()  # those still getting events
        self._streams: set[Subscription] = set()  # those holding a slot
        self._closed = False
        self._ring: collections.deque[Event] = collections.deque()
        self._ring_bytes = 0
        # The highest id heard since start (kept over a reconnect's gap): an id above it is
        # one this instance has yet to hear, not one it has forgotten.
        self._highest_id: int | None = None

    @property
    def open_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    @property
    def receiving(self) -> int:
        """How many streams still get events."""
        with self._lock:
            return len(self._subscriptions)

    @property
    def replayable(self) -> int:
        """How many events a resume can be sent now."""
        with self._lock:
            return len(self._ring)

    def subscribe(
        self, task_id: int | None = None, last_event_id: int | None = None
    ) -> Subscription:
        """A new stream; with `last_event_id`, one that first gets what came after that event
        (or a stream.reset, when that is no longer known here)."""
        with self._lock:
            if self._closed or len(self._streams) >= self.max_streams:
                raise TooManyStreams
            subscription = Subscription(self, task_id, self.queue_size)
            if last_event_id is not None:
                # Under the lock: an event is either in the replay or offered live, never both.
                self._resume(subscription, last_event_id)
            self._subscriptions.add(subscription)
            self._streams.add(subscription)
            return subscription

    def _resume(self, subscription: Subscription, last_event_id: int) -> None:
        ring = self._ring
        # Newest first: a client that resumes is usually only a little behind.
        for back, event in enumerate(reversed(ring)):
            if event.id == last_event_id:
                missed = itertools.islice(ring, len(ring) - back, None)
                subscription.backlog.extend(e for e in missed if subscription.matches(e))
                return
        if self._highest_id is None or last_event_id > self._highest_id:
            subscription.await_id(last_event_id)
            return
        position = next((e.id for e in reversed(ring) if e.id is not None), None)
        subscription.backlog.append(Event.reset("event id too old", position))

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscriptions.discard(subscription)

    def release(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscriptions.discard(subscription)
            self._streams.discard(subscription)

    def publish(self, event: Event) -> None:
        """An event heard from the database: keep it for resumes, offer it to every stream."""
        with self._lock:
            ring = self._ring
            ring.append(event)
            self._ring_bytes += len(event.text)
            while len(ring) > self.replay_events or self._ring_bytes > self.replay_bytes:
                self._ring_bytes -= len(ring.popleft().text)
            if event.id is not None and (self._highest_id is None or event.id > self._highest_id):
                self._highest_id = event.id
            if not self._subscriptions:
                return
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription.offer(event)

    def lost_events(self, tell_streams: bool = True) -> None:
        """The listener was not listening for a while: what happened meanwhile is unknown,
        so nothing before now can be replayed, and (after a lost connection) every open
        stream is told so with a stream.reset."""
        with self._lock:
            self._ring.clear()
            self._ring_bytes = 0
            subscriptions = list(self._subscriptions) if tell_streams else []
        if subscriptions:
            reset = Event.reset("events may have been missed: the instance reconnected", None)
            for subscription in subscriptions:
                subscription.offer(reset)

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

    Events are listened to only while a stream is open somewhere in the cluster, and for
    LINGER_SECONDS after the last one closed: taking every change of every instance off the
    wire costs each instance CPU (drain: ~9 us an event), for nothing when nobody watches.
    But while someone watches, every instance listens, so each keeps the ring of recent
    events a client may resume from wherever it reconnects (a load balancer sends it
    anywhere). An instance with streams says so on STREAMS_CHANNEL; one that connects asks.
    The first stream here asks for events (events_wanted) and waits until the LISTEN is in
    place, so it misses nothing after it starts.
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
        # Events are listened to until then (a stream here or elsewhere, LINGER_SECONDS on).
        self._keep_until = 0.0
        self._announced_at = -ANNOUNCE_SECONDS
        # The connection was lost while events were listened to: the streams missed some.
        self._interrupted = False

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
            # Listening while another instance's streams last: this one says so now, before
            # the gate that instance opened closes on this stream.
            self._announce_if_due()
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
                    self.database.listen(conn, STREAMS_CHANNEL)
                    self.database.listen(conn, STREAMS_QUERY_CHANNEL)
                    self.connected.set()
                    delay = 0.1
                    self._check_delivery(conn)
                    self._notify(STREAMS_QUERY_CHANNEL)  # is anyone watching?
                    self.on_wakeup()
                    while not self._stop.is_set():
                        self.beat_at = time.monotonic()
                        self._listen_to_events_if_wanted(conn)
                        for notify in conn.notifies(timeout=1.0):
                            if self._dispatch(notify.channel, notify.payload):
                                break  # events wanted or asked about: come round now
                        # An idle connection can die silently; a cheap query finds out.
                        self.database.fetch("ping", conn=conn)
            except Exception as exc:
                self.connected.clear()
                if self.listening_to_events.is_set():
                    self._interrupted = True
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
        now = time.monotonic()
        if self.broker.receiving > 0:
            self._keep_until = now + LINGER_SECONDS
            self._announce_if_due()
        wanted = now < self._keep_until
        if wanted and not self.listening_to_events.is_set():
            self.database.listen(conn, EVENTS_CHANNEL)
            # What happened before this LISTEN is unknown here: no resume may reach past
            # it, and after a lost connection the streams still open are told. (A stream
            # that asked for this LISTEN starts only now: it misses nothing.)
            self.broker.lost_events(tell_streams=self._interrupted)
            self._interrupted = False
            self.listening_to_events.set()
        elif not wanted and self.listening_to_events.is_set():
            self.database.listen(conn, EVENTS_CHANNEL, listening=False)
            self.listening_to_events.clear()
            self.broker.lost_events(tell_streams=False)

    def _announce_if_due(self) -> None:
        """Say, unless said within ANNOUNCE_SECONDS, that a stream is open here: events flow,
        and every instance keeps them, for LINGER_SECONDS more. Done before a first stream
        starts, so it misses nothing."""
        now = time.monotonic()
        if now - self._announced_at < ANNOUNCE_SECONDS:
            return
        self._announced_at = now
        try:
            self.database.fetch(
                "announce_streams", {"seconds": LINGER_SECONDS, "channel": STREAMS_CHANNEL}
            )
        except Exception as exc:
            self._announced_at = -ANNOUNCE_SECONDS  # again at the next round
            log.warning("could not announce this instance's event streams: %s", exc)

    def _notify(self, channel: str) -> None:
        # Through the pool, not this connection: a failure here is not the listener's.
        try:
            self.database.notify(channel)
        except Exception as exc:
            log.warning("could not notify %s: %s", channel, exc)

    def _dispatch(self, channel: str, payload: str) -> bool:
        """Act on one notification; True when the loop should come round at once."""
        if channel == EVENTS_CHANNEL:
            event = Event.from_payload(payload)
            if event is None:
                log.warning("ignored a malformed event: %r", payload[:200])
            else:
                self.broker.publish(event)
            return False
        if channel == WAKEUP_CHANNEL:
            self.on_wakeup()
        elif channel == CANCEL_CHANNEL:
            if payload.isascii() and payload.isdigit():
                self.on_cancel(int(payload))
        elif channel == STREAMS_CHANNEL:
            self._keep_until = max(self._keep_until, time.monotonic() + LINGER_SECONDS)
            return not self.listening_to_events.is_set()
        elif channel == STREAMS_QUERY_CHANNEL:
            self._announced_at = -ANNOUNCE_SECONDS  # answer at the next round, if streaming
            return self.broker.receiving > 0
        elif channel == self.control_channel:
            return True  # a stream wants events: listen for them now
        return False
