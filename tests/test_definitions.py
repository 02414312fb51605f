"""Each concept is defined once: the statements, the schemas, the spec and the dashboard agree
with the one definition of states, event types and updatable fields."""

from __future__ import annotations

import re
from pathlib import Path

from flask.testing import FlaskClient

from taskapp import services, states
from taskapp.events import EVENT_TYPES
from taskapp.schemas import ConversationUpdate, TaskUpdate
from taskapp.statements import SQL_DIR, load

TASKAPP = Path(__file__).resolve().parent.parent / "taskapp"
SQL_WORDS = re.compile(r"\b(SELECT|INSERT INTO|UPDATE \w+ SET|DELETE FROM|pg_notify)\b")


def test_updatable_fields_are_the_update_schemas_fields() -> None:
    assert set(services.TASK_FIELDS) == set(TaskUpdate().fields)
    assert set(services.CONVERSATION_FIELDS) == set(ConversationUpdate().fields)


def test_every_published_event_type_is_a_known_one() -> None:
    published = set()
    for path in SQL_DIR.glob("*.sql"):
        published |= set(re.findall(r"'((?:task|conversation)\.[a-z]+)'", path.read_text()))
    assert published <= set(EVENT_TYPES)
    assert "task.completed" in published and "conversation.created" in published


def test_no_sql_outside_the_statement_files() -> None:
    rooms = [TASKAPP / "services.py", TASKAPP / "worker.py", TASKAPP / "events.py"]
    rooms += (TASKAPP / "api").glob("*.py")
    for path in rooms:
        code = "\n".join(
            line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
        )
        code = re.sub(r'""".*?"""', "", code, flags=re.DOTALL)  # docstrings are prose
        assert not SQL_WORDS.search(code), f"SQL text in {path.name}"


def test_statement_names_are_unique_and_documented() -> None:
    statements = load()
    for path in SQL_DIR.glob("*.sql"):
        for name, purpose in re.findall(r"^-- name: (\w+)\n(.*)$", path.read_text(), re.M):
            assert name in statements
            assert purpose.startswith("-- ") and len(purpose) > 10, name


def test_the_dashboard_and_the_spec_take_the_states_from_their_definition(
    client: FlaskClient,
) -> None:
    page = client.get("/dashboard/").get_data(as_text=True)
    assert '"statuses": ["pending", "processing", "completed", "failed", "cancelled"]' in page
    assert all(f'"{event_type}"' in page for event_type in EVENT_TYPES)
    spec = client.get("/apispec_1.json").get_json()
    task = spec["components"]["schemas"]["TaskOut"]["properties"]["status"]
    assert task["enum"] == states.TASK_STATUSES
    js = (TASKAPP / "dashboard" / "static" / "dashboard.js").read_text()
    assert '"pending"' not in js and "task.claimed" not in js
