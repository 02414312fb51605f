"""Logging, and request ids.

LOG_FORMAT=text (the default) is plain lines; LOG_FORMAT=json makes every line a process writes
one JSON object (python-json-logger): taskapp's records, everything that reaches the root
logger (Alembic's migrations at start, warnings, libraries), uncaught exceptions, and
gunicorn's error and access logs (GunicornLogger, gunicorn.conf.py's logger_class).

Every record carries the instance id (null in gunicorn's master, which is no instance);
worker records carry the task id, records written while a request is served its request id,
and, with tracing on, the trace and span ids.

A request's id is the client's `X-Request-ID` when it is a sane one (REQUEST_ID: at most 128
characters of a small set, so no header can put quotes, spaces or newlines in a log line or
make it long), else 32 new random hex digits; every response carries it back.
"""

from __future__ import annotations

import logging
import re
import secrets
import sys
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, has_request_context, request
from gunicorn import glogging
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

from . import tracing

if TYPE_CHECKING:
    from .config import Settings

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID = re.compile(r"[A-Za-z0-9._~:/+=@-]{1,128}")
_ENVIRON_KEY = "taskapp.request_id"
_HANDLER_NAME = "taskapp"
_TEXT_FORMAT = "%(asctime)s %(levelname)s [%(instance)s] %(name)s: %(message)s"

# The process's choice (LOG_FORMAT) and its instance, for every handler set up here.
_format = "text"
_instance_id: str | None = None


def request_id() -> str:
    """The current request's id: its sane X-Request-ID, else one made now (and kept)."""
    environ = request.environ
    value: str | None = environ.get(_ENVIRON_KEY)
    if value is None:
        sent = environ.get("HTTP_X_REQUEST_ID")
        value = sent if sent is not None and REQUEST_ID.fullmatch(sent) else secrets.token_hex(16)
        environ[_ENVIRON_KEY] = value
    return value


def _echo_request_id(response: Response) -> Response:
    response.headers[REQUEST_ID_HEADER] = request_id()
    return response


class _Context(logging.Filter):
    """Adds what a record's context knows: instance, request, trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "instance_id", None) is None:
            record.instance_id = _instance_id
        if not hasattr(record, "request_id") and has_request_context():
            record.request_id = request_id()
        if tracing.enabled() and not hasattr(record, "trace_id"):
            ids = tracing.current_ids()
            if ids is not None:
                record.trace_id, record.span_id = ids
        return True


_CONTEXT = _Context()


class JsonFormatter(_JsonFormatter):
    """One JSON object per record: time, level, logger, message, instance_id, pid, then the
    record's extras (task_id, request_id, an access line's fields) and any exception."""

    def __init__(self) -> None:
        super().__init__(rename_fields={"exc_info": "exception", "stack_info": "stack"})

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["time"] = datetime.fromtimestamp(record.created, UTC).isoformat()
        log_data["level"] = record.levelname.lower()
        log_data["logger"] = record.name
        log_data["message"] = record.message
        log_data["instance_id"] = getattr(record, "instance_id", None)
        log_data["pid"] = record.process
        super().add_fields(log_data, record, message_dict)


class TextFormatter(logging.Formatter):
    """`time LEVEL [instance] logger: message`, with `(request …)` on a request's lines."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        values = dict(record.__dict__)
        values["instance"] = (getattr(record, "instance_id", None) or "-")[:8]
        line = self._style._fmt % values if self._style._fmt else record.message
        rid = getattr(record, "request_id", None)
        return f"{line} (request {rid})" if rid else line


def formatter(log_format: str | None = None) -> logging.Formatter:
    """The formatter of LOG_FORMAT (this process's, by default)."""
    return JsonFormatter() if (log_format or _format) == "json" else TextFormatter()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when the record comes (a test's capture, a redirect)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _install(logger: logging.Logger) -> None:
    for handler in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(_CONTEXT)
    handler.setFormatter(formatter())
    logger.addHandler(handler)


def configure(settings: Settings, *, instance: bool = True) -> None:
    """Send every record to stderr in LOG_FORMAT (idempotent). `instance`: this process is
    the instance of `settings` (not gunicorn's master)."""
    global _format, _instance_id
    _format = settings.log_format
    if instance:
        _instance_id = settings.instance_id
    logger = logging.getLogger("taskapp")
    _install(logger)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # Everyone else's records; Alembic's and Flask-Migrate's at INFO, as alembic.ini has it
    # (migrations/env.py applies alembic.ini's logging only when nothing is configured).
    _install(logging.getLogger())
    for name in ("alembic", "flask_migrate"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # 7 lines a start
    json = settings.log_format == "json"
    # A warning or an uncaught exception would otherwise be printed as lines of text.
    logging.captureWarnings(json)
    sys.excepthook = _log_uncaught if json else sys.__excepthook__
    threading.excepthook = _log_uncaught_in_thread if json else threading.__excepthook__


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    logging.getLogger("taskapp").critical("uncaught %s", kind.__name__, exc_info=(kind, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("taskapp").critical(
        "uncaught %s in thread %s",
        args.exc_type.__name__,
        name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
    )


def init_app(app: Flask) -> None:
    configure(app.config["TASKAPP"])
    app.after_request(_echo_request_id)


class GunicornLogger(glogging.Logger):
    """gunicorn's error and access logs in this process's LOG_FORMAT.

    Text: gunicorn's own lines (gunicorn.conf.py adds the request id to the access line).
    JSON: the same records as JSON objects, and an access line whose fields are fields.
    """

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                if getattr(handler, "_gunicorn", False):
                    handler.addFilter(_CONTEXT)
                    if _format == "json":
                        handler.setFormatter(JsonFormatter())

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if _format != "json":
            super().access(resp, req, environ, request_time)
            return
        if not self.access_log_enabled:
            return
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        method, uri = environ.get("REQUEST_METHOD", "-"), environ.get("RAW_URI", "-")
        rid = environ.get(_ENVIRON_KEY) or next(
            (v for k, v in resp.headers if k.lower() == "x-request-id"), None
        )
        fields = {
            "remote_addr": environ.get("REMOTE_ADDR"),
            "method": method,
            "path": uri,
            "protocol": environ.get("SERVER_PROTOCOL"),
            "status": int(status) if str(status).isdigit() else status,
            "bytes": getattr(resp, "sent", None),
            "duration_ms": round(request_time.total_seconds() * 1000, 3),
            "referer": environ.get("HTTP_REFERER"),
            "user_agent": environ.get("HTTP_USER_AGENT"),
            "request_id": rid,
        }
        self.access_log.info("%s %s %s", method, uri, status, extra=fields)
