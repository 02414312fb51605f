"""How the command line shows things to people: aligned tables and short times.

Scripts get `--json` instead (the API's own documents), so nothing here is meant to be parsed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

# Longer text in a table cell is cut with an ellipsis, so a row stays one line.
CELL_WIDTH = 48


def when(value: str | None) -> str:
    """An API time as `2026-11-28 14:53:00Z` (UTC, whole seconds), or `-`."""
    if not value:
        return "-"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def clock(value: str | None) -> str:
    """An API time as `14:53:00.123Z`: the time of day to the millisecond, in UTC."""
    if not value:
        return "-"
    try:
        moment = datetime.fromisoformat(value).astimezone(UTC)
    except ValueError:
        return value
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def cell(value: Any, width: int = CELL_WIDTH) -> str:
    """A value as one line of at most width characters; None as `-`."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict | list):
        value = json.dumps(value, ensure_ascii=False)
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Sequence[str] = ()) -> str:
    """Rows under headers in aligned columns; the columns named in `right` right-aligned."""
    texts = [[cell(value) for value in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in texts)]) for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), *texts]:
        parts = [
            text.rjust(width) if headers[i] in right else text.ljust(width)
            for i, (text, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def fields(pairs: Iterable[tuple[str, Any]]) -> str:
    """`name   value` lines, the values aligned."""
    items = [(name, value) for name, value in pairs]
    width = max(len(name) for name, _ in items)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in items)


def count(n: int, noun: str) -> str:
    """`1 task`, `1,234 tasks`."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")
