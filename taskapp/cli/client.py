"""The command line's HTTP client: JSON requests and the /events stream, over the standard
library only (urllib), so the console script needs nothing the service doesn't already pin.

Every failure becomes a CliError whose message is one line: what the service said for an
HTTP error (a problem+json body's detail and fields), why the service couldn't be reached
otherwise.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from typing import Any

# How long the stream may stay silent before it counts as gone: the service writes a
# keep-alive comment every EVENT_KEEPALIVE_SECONDS (15 by default), so four of them missed.
STREAM_IDLE_SECONDS = 60.0
# The fields of a 422 that one error line names; the rest are counted.
SHOWN_FIELDS = 5


class CliError(Exception):
    """A failure to report as one line on stderr, with a non-zero exit."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever the server wrote
        self.status = status


@dataclass(frozen=True)
class Answer:
    """A successful response: its status, headers and body parsed as JSON (None if empty)."""

    status: int
    headers: Message
    body: Any


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event: its `event:` name, its data (JSON text) and its `id:`, if any."""

    type: str
    data: str
    id: str | None


def problem_message(status: int, content_type: str, raw: bytes) -> str:
    """One line for an error response: a problem's fields or detail, then the status."""
    phrase = _phrase(status)
    body: Any = None
    if "json" in content_type:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
    if not isinstance(body, dict):
        return f"the service answered {status} {phrase}"
    title = body.get("title") or phrase
    errors = body.get("errors")
    if isinstance(errors, dict) and errors:
        named = [
            f"{field}: {_texts(texts)}" for field, texts in list(errors.items())[:SHOWN_FIELDS]
        ]
        if len(errors) > SHOWN_FIELDS:
            named.append(f"and {len(errors) - SHOWN_FIELDS} more")
        what = "; ".join(named)
    else:
        what = str(body.get("detail") or title).rstrip(".")
    return f"{what} ({status} {title})"


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


def _texts(texts: Any) -> str:
    if isinstance(texts, list):
        return " ".join(str(text).rstrip(".") for text in texts)
    return str(texts)


def unreachable_reason(reason: object, timeout: float) -> str:
    """Why a connection failed, as a person would say it."""
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError | socket.timeout):
        return f"no answer within {timeout:g} s"
    if isinstance(reason, socket.gaierror):
        return "no such host"
    if isinstance(reason, ssl.SSLError):
        return f"TLS failed ({reason.reason or reason})"
    if isinstance(reason, ConnectionResetError | http.client.RemoteDisconnected):
        return "the connection was closed before an answer came"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[:1].lower() + reason.strerror[1:]
    return str(reason) or type(reason).__name__


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Client:
    """A taskapp service at `base_url`, with an API key if it needs one."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 10.0):
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise CliError(f"not an http:// or https:// URL: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        # HTTP(S)_PROXY as curl honours it, but never for this machine's own addresses: a
        # proxy would look for 127.0.0.1 on its own machine.
        proxies = {} if _is_loopback(parsed.hostname) else urllib.request.getproxies()
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))

    def url(self, path: str, query: Mapping[str, Any] | None = None) -> str:
        """The absolute URL of a path, with the query's non-None values."""
        params = {key: value for key, value in (query or {}).items() if value is not None}
        return self.base_url + path + (f"?{urllib.parse.urlencode(params)}" if params else "")

    def _headers(self, accept: str) -> dict[str, str]:
        headers = {"Accept": accept, "User-Agent": "taskapp-cli"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _open(self, request: urllib.request.Request, timeout: float) -> http.client.HTTPResponse:
        try:
            response: http.client.HTTPResponse = self._opener.open(request, timeout=timeout)
            return response
        except urllib.error.HTTPError as error:
            with error:
                raw = _read(error, self.base_url, timeout)
            raise CliError(
                problem_message(error.code, error.headers.get("Content-Type", ""), raw),
                status=error.code,
            ) from None
        except urllib.error.URLError as error:
            reason = unreachable_reason(error.reason, timeout)
            raise CliError(f"cannot reach {self.base_url}: {reason}") from None
        except (OSError, http.client.HTTPException) as error:
            reason = unreachable_reason(error, timeout)
            raise CliError(f"cannot reach {self.base_url}: {reason}") from None

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """Send one request; its JSON answer, or a CliError saying why there is none."""
        data = None if body is None else json.dumps(body).encode()
        all_headers = {**self._headers("application/json"), **(headers or {})}
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            self.url(path, query), data=data, method=method, headers=all_headers
        )
        with self._open(request, self.timeout) as response:
            raw = _read(response, self.base_url, self.timeout)
            if not raw:
                return Answer(response.status, response.headers, None)
            if "json" not in response.headers.get("Content-Type", ""):
                raise CliError(
                    f"{self.base_url} is not a taskapp service: {method} {path} answered "
                    f"{response.headers.get_content_type()}, not JSON"
                )
            try:
                return Answer(response.status, response.headers, json.loads(raw))
            except ValueError:
                raise CliError(f"{method} {path} answered malformed JSON") from None

    def events(self, *, task_id: int | None = None, last_event_id: str | None = None) -> Stream:
        """Open GET /events (one task's with task_id); a CliError if it can't be opened."""
        headers = self._headers("text/event-stream")
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        request = urllib.request.Request(self.url("/events", {"task_id": task_id}), headers=headers)
        response = self._open(request, STREAM_IDLE_SECONDS)
        if response.headers.get_content_type() != "text/event-stream":
            response.close()
            raise CliError(f"{self.base_url}/events is not an event stream")
        return Stream(response)


def _read(response: Any, base_url: str, timeout: float) -> bytes:
    try:
        raw: bytes = response.read()
        return raw
    except (OSError, http.client.HTTPException) as error:
        reason = unreachable_reason(error, timeout)
        raise CliError(f"lost the connection to {base_url}: {reason}") from None


class Stream:
    """An open event stream: iterate it for its events, until the service ends it.

    Parsed as the HTML standard's event-stream format: `event:`, `data:` (several lines
    joined), `id:`, `retry:`, comments (keep-alives) skipped, an event dispatched at the blank
    line that ends it.
    """

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self._response = response
        self.retry_seconds: float | None = None

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Event]:
        name, event_id = "", None
        data: list[str] = []
        for raw in self._lines():
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if not line:
                if data:
                    yield Event(name or "message", "\n".join(data), event_id)
                name, data = "", []
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
            elif field == "id" and "\0" not in value:
                event_id = value
            elif field == "retry" and value.isdigit():
                self.retry_seconds = int(value) / 1000

    def _lines(self) -> Iterator[bytes]:
        """The stream's lines until it ends; a silent, reset or broken stream ends too."""
        while True:
            try:
                line = self._response.readline()
            except (OSError, http.client.HTTPException):
                return
            if not line:
                return
            yield line
