"""API keys: with API_KEYS set, every request but the probes and the API docs must carry one."""

from __future__ import annotations

import hmac

from flask import Flask, current_app, request

from .config import Settings
from .errors import Unauthorized

# The probes and the docs stay open so load balancers, the kubelet and people can reach them;
# so do the pages of the problem types, which every error's `type` points at.
PROBE_PATHS = ("/health", "/livez", "/readyz")
PUBLIC_PATHS = frozenset(
    {*PROBE_PATHS, *(p + "/" for p in PROBE_PATHS), "/apispec_1.json", "/oauth2-redirect.html"}
)
PUBLIC_PREFIXES = ("/apidocs/", "/flasgger_static/", "/problems/")


# A browser's EventSource, WebSocket and page loads can't send headers, so these GETs may carry
# the key as `?api_key=`. Only these: query strings end up in logs and browser history.
QUERY_KEY_PARAM = "api_key"
QUERY_KEY_PATHS = frozenset({"/events", "/events/", "/ws", "/ws/", "/dashboard"})
QUERY_KEY_PREFIXES = ("/dashboard/",)


def is_public(path: str) -> bool:
    """Whether a path is served without an API key."""
    return path in PUBLIC_PATHS or path == "/apidocs" or path.startswith(PUBLIC_PREFIXES)


def accepts_query_key(method: str, path: str) -> bool:
    """Whether this request may carry its key as `?api_key=` instead of a header."""
    return method == "GET" and (path in QUERY_KEY_PATHS or path.startswith(QUERY_KEY_PREFIXES))


def presented_key() -> str | None:
    """The key from `Authorization: Bearer KEY`, `X-API-Key: KEY` or (streams) `?api_key=`."""
    scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    if header := request.headers.get("X-API-Key"):
        return header
    if accepts_query_key(request.method, request.path):
        return request.args.get(QUERY_KEY_PARAM) or None
    return None


def key_is_valid(presented: str, keys: tuple[str, ...]) -> bool:
    """Compare against every key in constant time, so timing tells nothing about any of them."""
    given = presented.encode()
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]
    return any(matches)


def _require_key() -> None:
    settings: Settings = current_app.config["TASKAPP"]
    if not settings.api_keys or is_public(request.path):
        return
    presented = presented_key()
    if presented is None or not key_is_valid(presented, settings.api_keys):
        raise Unauthorized(
            "A valid API key is required: send `Authorization: Bearer KEY` or `X-API-Key: KEY`.",
            headers={"WWW-Authenticate": 'Bearer realm="taskapp"'},
        )


def init_app(app: Flask) -> None:
    """Check the API key before every request."""
    app.before_request(_require_key)
