"""The operator's dashboard: server-rendered page shells whose plain JavaScript reads the API.

The pages hold no data of their own: dashboard.js fetches /status, /metrics and /tasks/ with the
`X-API-Key` header and listens to /events. EventSource cannot send headers, so it passes the key
as `?api_key=`; so do links between dashboard pages when the pages themselves need a key.
Only a task's page asks the database anything itself: whether the task exists (else a 404).
"""

from __future__ import annotations

import psycopg
from flask import Blueprint, current_app, render_template, request
from flask.typing import ResponseReturnValue

from .. import auth, services, states
from ..config import Settings
from ..database import get_database
from ..errors import NotFound, Unauthorized, problem
from ..events import EVENT_TYPES

bp = Blueprint(
    "dashboard",
    __name__,
    url_prefix="/dashboard",
    template_folder="templates",
    static_folder="static",
)

# Query parameter that carries the API key where a header can't (EventSource, a typed-in URL).
KEY_PARAM = "api_key"

# A database that can't be reached now (as errors.py counts it: its API answers are 503s).
UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError)


def _event_type(name: str) -> str:
    """An event type the page reacts to by name; one that no longer exists fails at import."""
    if name not in EVENT_TYPES:
        raise LookupError(f"no event type {name!r} in taskapp.events.EVENT_TYPES")
    return name


# What the page must know of the state machine and the events, from their one definitions.
VOCABULARY = {
    "statuses": states.TASK_STATUSES,
    "event_types": list(EVENT_TYPES),
    "actions": {name: action.from_values for name, action in states.ACTIONS.items()},
    # Which instance runs a task, as the instances panel learns it from the events: the
    # claim's instance from a claim, none once the task is deleted or no longer running.
    "running": states.TaskStatus.PROCESSING.value,
    "claimed_event": _event_type("task.claimed"),
    "deleted_event": _event_type("task.deleted"),
}


def _page_context() -> dict[str, object]:
    settings: Settings = current_app.config["TASKAPP"]
    guarded = bool(settings.api_keys) and not auth.is_public(request.path)
    return {
        # The pages themselves need the key: links and assets carry it as a query parameter.
        "key_in_links": guarded,
        "asset_key": request.args.get(KEY_PARAM) if guarded else None,
        "keys_required": bool(settings.api_keys),
        # The page judges an instance's liveness by how often it should beat.
        "heartbeat_seconds": settings.heartbeat_seconds,
        "vocabulary": VOCABULARY,
    }


@bp.get("/")
def overview() -> ResponseReturnValue:
    return render_template("dashboard/overview.html", **_page_context())


@bp.get("/tasks/<id:task_id>")
def task_page(task_id: int) -> ResponseReturnValue:
    """The task's page; for an id with no task, a 404 page that says so, with nothing to do."""
    try:
        services.get_task(database=get_database(), task_id=task_id)
    except NotFound:
        html = render_template(
            "dashboard/task.html", task_id=task_id, missing=True, **_page_context()
        )
        return html, 404
    except UNAVAILABLE:
        pass  # the page still loads: its script says the service can't be reached, and retries
    return render_template("dashboard/task.html", task_id=task_id, missing=False, **_page_context())


@bp.errorhandler(Unauthorized)
def ask_for_key(error: Unauthorized) -> ResponseReturnValue:
    """A browser opening a page without a valid key gets a form asking for one, not bare JSON.

    Anything else (assets, API clients, `curl`) gets the usual problem+json.
    """
    wanted = request.accept_mimetypes.best_match(["application/problem+json", "text/html"])
    if request.endpoint == "dashboard.static" or wanted != "text/html":
        return problem(error.status, error.detail, headers=error.headers)
    rejected = request.args.get(KEY_PARAM) is not None
    html = render_template("dashboard/key.html", rejected=rejected, key_param=KEY_PARAM)
    return html, 401, {**error.headers, "Cache-Control": "no-store"}
