"""The named SQL statements of taskapp/sql/*.sql, loaded once: the only place SQL text lives.

Each statement starts with `-- name: NAME` and a one-line purpose. Parameters are written
`:name` and become psycopg's `%(name)s` (`::type` casts are left alone). Names are unique
across files. `{{ task_json(alias) }}`, `{{ task_list_item_json(alias) }}` and
`{{ conversation_json(alias) }}` stand for the JSON of a row as the API shows it, generated
from the output schemas (taskapp.representation), so statements and schemas can't disagree;
`{{ iso_now() }}` is the current time in the API's format. A statement whose comment holds
`-- plan: generic` runs on the plan its first preparation made (taskapp.database says why).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

SQL_DIR = Path(__file__).with_name("sql")

_NAME_MARKER = re.compile(r"^-- name: ", flags=re.MULTILINE)
_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")
_GENERIC_PLAN_MARKER = "\n-- plan: generic\n"
_FRAGMENT = re.compile(r"\{\{\s*(\w+)\(([^)]*)\)\s*\}\}")


def _fragments() -> Mapping[str, Callable[..., str]]:
    from . import representation

    return {
        "task_json": representation.task_json,
        "task_list_item_json": representation.task_list_item_json,
        "conversation_json": representation.conversation_json,
        "iso_now": lambda: representation.iso_time("now()"),
        "queue_json": representation.queue_json,
        "key_json": representation.key_json,
    }


def _expand(body: str, fragments: Mapping[str, Callable[..., str]]) -> str:
    def replace(match: re.Match[str]) -> str:
        args = [a.strip() for a in match.group(2).split(",") if a.strip()]
        return fragments[match.group(1)](*args)

    return _FRAGMENT.sub(replace, body)


def parse(text: str, fragments: Mapping[str, Callable[..., str]] | None = None) -> dict[str, str]:
    """Split one file's text into {name: statement with %(name)s placeholders}."""
    statements: dict[str, str] = {}
    for chunk in _NAME_MARKER.split(text)[1:]:
        name, _, body = chunk.partition("\n")
        body = body.strip().rstrip(";").replace("%", "%%")
        if fragments is not None:
            body = _expand(body, fragments)
        statements[name.strip()] = _PARAMETER.sub(r"%(\1)s", body)
    return statements


def load(directory: Path = SQL_DIR) -> dict[str, str]:
    """Every named statement of every .sql file in `directory`."""
    fragments = _fragments()
    statements: dict[str, str] = {}
    for path in sorted(directory.glob("*.sql")):
        for name, body in parse(path.read_text(), fragments).items():
            if name in statements:
                raise ValueError(f"statement {name!r} is defined twice ({path.name})")
            statements[name] = body
    return statements


_statements: dict[str, str] | None = None


def statement(name: str) -> str:
    """One named statement, ready for psycopg (loaded on first use)."""
    global _statements
    if _statements is None:
        _statements = load()
    return _statements[name]


def wants_generic_plan(name: str) -> bool:
    """Whether the statement asks to be run on its generic plan (`-- plan: generic`)."""
    return _GENERIC_PLAN_MARKER in statement(name)
