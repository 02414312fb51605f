"""OpenTelemetry tracing of requests, claim rounds and task runs, off unless configured.

It is on when the standard variables ask for an exporter (OTEL_TRACES_EXPORTER, or an
OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT; Settings.traces_exporters). Everything else is the SDK's
own reading of the standard OTEL_* variables: the endpoint, headers and timeout of the OTLP/HTTP
exporter, OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, the sampler, the batch processor's
delays, OTEL_PROPAGATORS (W3C `traceparent` by default) and OTEL_PYTHON_FLASK_EXCLUDED_URLS.

Off, nothing of OpenTelemetry is imported and each hook below is one check of a module global:
the work loop and the dispatcher call them for every task.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask
    from opentelemetry.trace import Span, Tracer

    from .config import Settings

SERVICE_NAME = "taskapp"
# Attribute names, in the service's own namespace (one concept, one name: the API's words).
TASK_ID = "taskapp.task.id"
TASK_QUEUE = "taskapp.task.queue"
TASK_ATTEMPT = "taskapp.task.attempt"
REQUEST_ID = "taskapp.request_id"

_tracer: Tracer | None = None
_provider: Any = None
_lock = threading.Lock()


def enabled() -> bool:
    """True once tracing has been started in this process."""
    return _tracer is not None


def start(settings: Settings) -> None:
    """Set up the tracer provider and its exporters for this process (once; idempotent)."""
    global _tracer, _provider
    if not settings.traces_exporters:
        return
    with _lock:
        if _tracer is not None:
            return
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override these.
        resource = Resource.create(
            {"service.name": SERVICE_NAME, "service.instance.id": settings.instance_id}
        )
        provider = TracerProvider(resource=resource)
        for name in settings.traces_exporters:
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )

                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            else:
                provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        trace.set_tracer_provider(provider)
        _provider = provider
        _tracer = trace.get_tracer("taskapp")


def shutdown() -> None:
    """Send the spans still buffered and stop the exporters (before the process leaves)."""
    global _tracer, _provider
    with _lock:
        provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def init_app(app: Flask) -> None:
    """With tracing configured: start it, and give every request a server span.

    Call it before any other before_request hook is registered: a hook that answers (a 401, a
    415) ends the chain, and the span is begun by one of them.
    """
    settings: Settings = app.config["TASKAPP"]
    if not settings.traces_exporters:
        return
    start(settings)
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    from .logs import request_id

    def tag_request(span: Span, environ: Mapping[str, Any]) -> None:
        if span.is_recording():
            span.set_attribute(REQUEST_ID, request_id())

    # enable_commenter: SQL comments are for instrumented SQLAlchemy; we instrument none.
    FlaskInstrumentor.instrument_app(app, request_hook=tag_request, enable_commenter=False)


def current_ids() -> tuple[str, str] | None:
    """The current span's trace and span ids, in hex, for log lines (None: no span)."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


class _NoSpan:
    """What task_span gives when tracing is off: a context manager that does nothing."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


NO_SPAN = _NoSpan()


def task_span(task_id: int, queue: str, attempt: int) -> AbstractContextManager[Any]:
    """The span of one run of a task's processor, current while the `with` block runs."""
    tracer = _tracer
    if tracer is None:
        return NO_SPAN
    attributes: dict[str, Any] = {TASK_ID: task_id, TASK_QUEUE: queue, TASK_ATTEMPT: attempt}
    return tracer.start_as_current_span("taskapp.process", attributes=attributes)


def failed(exc: BaseException) -> None:
    """The current span's work failed, though nothing was raised out of it (a processor's
    exception, recorded as a failed attempt)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    span.record_exception(exc)
    span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))


class _Round:
    """A claim round, timed as it runs and sent as a span only if it did something.

    The dispatcher comes round at every poll interval while idle; a span for each of those
    would bury the rounds that claimed or completed tasks.
    """

    def __init__(self, tracer: Tracer, completing: int, asked: Mapping[str, int]) -> None:
        self._tracer = tracer
        self._started = time.time_ns()
        self._attributes: dict[str, Any] = {
            "taskapp.claim.completing": completing,
            "taskapp.claim.asked": sum(asked.values()),
            "taskapp.claim.queues": sorted(asked),
        }
        self._claimed = 0

    def __enter__(self) -> _Round:
        return self

    def claimed(self, count: int) -> None:
        self._claimed = count

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None and not self._claimed and not self._attributes["taskapp.claim.completing"]:
            return
        self._attributes["taskapp.claim.claimed"] = self._claimed
        span = self._tracer.start_span(
            "taskapp.claim", attributes=self._attributes, start_time=self._started
        )
        if exc is not None:
            from opentelemetry import trace

            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
        span.end()


class _NoRound:
    def __enter__(self) -> _NoRound:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def claimed(self, count: int) -> None:
        return None


NO_ROUND = _NoRound()


def claim_round(completing: int, asked: Mapping[str, int]) -> _Round | _NoRound:
    """The span of one dispatcher round: completions written, tasks claimed (a `with` block)."""
    tracer = _tracer
    if tracer is None:
        return NO_ROUND
    return _Round(tracer, completing, asked)
