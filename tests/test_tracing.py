"""OpenTelemetry tracing: off unless the OTEL_* variables ask for it; on, real gunicorn
instances send a span per request (continuing a W3C traceparent), per claim round and per
task run to a real OTLP/HTTP receiver (a small HTTP server decoding the protobuf)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from taskapp.config import ConfigError, Settings
from tests.support import ROOT, create_task, get_task, wait_for


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1: POST /v1/traces, protobuf in and out."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.received(self.path, ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def received(self, path: str, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        {
                            "name": span.name,
                            "kind": span.kind,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                            "status": span.status.code,
                            "events": [event.name for event in span.events],
                            "resource": resource,
                        }
                    )
        with self._lock:
            self.paths.append(path)
            self.spans.extend(found)

    def find(self, name: str, **attributes: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [
                span
                for span in self.spans
                if span["name"] == name
                and all(span["attributes"].get(k) == v for k, v in attributes.items())
            ]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    # Asked for before `instances`, so it outlives them: an instance stopped after it would
    # spend its stop retrying its last export against a closed port (7 s of teardown).
    server = Receiver()
    yield server
    server.close()


def _traced(receiver: Receiver, **env: object) -> dict[str, object]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: spans leave promptly, for the test
        **env,
    }


def test_requests_claims_and_task_runs_are_traced(receiver: Receiver, instances) -> None:
    instance = instances(
        **_traced(
            receiver, TASK_PROCESSOR="tests.processors:fail_when_titled_fail", LOG_FORMAT="json"
        )
    )
    instance_id = instance.status()["instance_id"]
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    response = requests.post(
        f"{instance.url}/tasks/",
        json={"title": "traced", "conversations": [{"content": "c"}]},
        headers={"traceparent": f"00-{trace_id}-{parent_id}-01", "X-Request-ID": "traced-1"},
        timeout=10,
    )
    assert response.status_code == 201
    task = response.json()
    wait_for(lambda: get_task(instance.url, task["id"])["status"] == "completed")
    failing = create_task(instance.url, "fail me", max_attempts=1)
    wait_for(lambda: get_task(instance.url, failing["id"])["status"] == "failed")

    # The request's span continues the caller's trace, and names the route and request id.
    (http,) = wait_for(
        lambda: [s for s in receiver.find("POST /tasks/") if s["trace_id"] == trace_id],
        what="the request's span",
    )
    assert http["parent_span_id"] == parent_id
    assert http["kind"] == Span.SPAN_KIND_SERVER
    assert http["attributes"]["taskapp.request_id"] == "traced-1"
    assert http["resource"]["service.name"] == "taskapp"
    assert http["resource"]["service.instance.id"] == instance_id

    # The task's run: its id, queue and attempt; a failed one is an error.
    (run,) = wait_for(
        lambda: receiver.find("taskapp.process", **{"taskapp.task.id": task["id"]}),
        what="the task's processing span",
    )
    assert run["attributes"]["taskapp.task.queue"] == "default"
    assert run["attributes"]["taskapp.task.attempt"] == 1
    assert run["status"] != Status.STATUS_CODE_ERROR
    (failed,) = wait_for(
        lambda: receiver.find("taskapp.process", **{"taskapp.task.id": failing["id"]}),
        what="the failed task's processing span",
    )
    assert failed["status"] == Status.STATUS_CODE_ERROR and "exception" in failed["events"]
    # What the run logged names its span.
    (logged,) = [
        entry
        for entry in map(json.loads, instance.log().splitlines())
        if entry.get("task_id") == failing["id"] and "failed" in entry["message"]
    ]
    assert (logged["trace_id"], logged["span_id"]) == (failed["trace_id"], failed["span_id"])

    # The claim rounds that claimed them (idle polls send no span) and wrote the completion.
    rounds = wait_for(
        lambda: [
            s for s in receiver.find("taskapp.claim") if s["attributes"]["taskapp.claim.claimed"]
        ],
        what="a claim round's span",
    )
    assert sum(s["attributes"]["taskapp.claim.claimed"] for s in rounds) >= 2
    assert all(s["attributes"]["taskapp.claim.queues"] == ["default"] for s in rounds)
    wait_for(
        lambda: any(
            s["attributes"]["taskapp.claim.completing"] for s in receiver.find("taskapp.claim")
        ),
        what="the round that wrote the completion",
    )
    assert set(receiver.paths) == {"/v1/traces"}


def test_spans_still_buffered_are_sent_at_a_clean_stop(receiver: Receiver, instances) -> None:
    # A batch delay far longer than the test: only the flush at worker_exit can send them.
    instance = instances(**_traced(receiver, OTEL_BSP_SCHEDULE_DELAY="600000"))
    requests.get(f"{instance.url}/tasks/", timeout=5)
    assert not receiver.find("GET /tasks/")
    assert instance.stop() == 0
    assert receiver.find("GET /tasks/")


def test_tracing_is_off_unless_asked_for_and_imports_nothing_then() -> None:
    # A process of its own: this one has imported opentelemetry (the receiver above).
    probe = """
import sys
from taskapp import create_app, tracing
from taskapp.config import Settings
app = create_app(Settings(database_url="postgresql://x@127.0.0.1:1/x", auto_migrate=False))
assert app.test_client().get("/livez").status_code == 200
with tracing.task_span(1, "default", 1):
    tracing.failed(ValueError("x"))
with tracing.claim_round(1, {"default": 1}) as traced:
    traced.claimed(1)
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    env = {"PATH": "/usr/bin:/bin", "OTEL_SERVICE_NAME": "taskapp"}  # no exporter asked for
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize(
    ("env", "exporters"),
    [
        ({}, ()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "console"}, ("console",)),
        ({"OTEL_TRACES_EXPORTER": "otlp, console"}, ("otlp", "console")),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ()),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, ()),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            ("otlp",),
        ),
    ],
)
def test_the_standard_variables_turn_tracing_on(env: dict[str, str], exporters: tuple) -> None:
    assert Settings.from_env(env).traces_exporters == exporters


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ),
    ],
)
def test_an_exporter_that_is_not_installed_is_refused_by_name(env: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env)
