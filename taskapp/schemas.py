"""Marshmallow schemas: what the API accepts (strictly) and what it returns.

Each rule that a field enforces in Python is also written into its JSON Schema (`pattern`,
`minimum`, …) so that the OpenAPI document promises exactly what the service accepts.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from marshmallow import INCLUDE, RAISE, Schema, ValidationError, fields, pre_load, validate

from .config import DEFAULT_QUEUE, QUEUE_NAME
from .models import CONCURRENCY_KEY_MAX_LENGTH, TITLE_MAX_LENGTH
from .states import CONVERSATION_STATUSES, TASK_STATUSES, TERMINAL

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
BIGINT_MAX = 2**63 - 1
MAX_ATTEMPTS_LIMIT = 100
# Conversations one create may carry: checked before any of them is validated, so a body of
# 65,000 tiny conversations costs a length check, not seconds of validation and a 6 MB 422.
MAX_CONVERSATIONS_PER_REQUEST = 1000
# Conversations one task may have, however they came (more through POST
# /tasks/{id}/conversations/ is a 409): a claim hands them all to the processor at once.
MAX_CONVERSATIONS_PER_TASK = 10_000
TIMEOUT_SECONDS_LIMIT = 7 * 24 * 3600
LIST_LIMIT_MAX = 1000
LIST_LIMIT_DEFAULT = 100
IDEMPOTENCY_KEY_MAX_LENGTH = 255
# Visible ASCII with inner spaces: HTTP would strip outer whitespace and mangle non-ASCII.
# No comma: a server joins a header sent twice with one (api.common.refuse_repeated_headers).
IDEMPOTENCY_KEY_PATTERN = r"^[!-+\--~]([ -+\--~]*[!-+\--~])?$"
QUEUE_NAME_PATTERN = f"^{QUEUE_NAME.pattern}$"
# Visible ASCII, no spaces: a tenant, an API key's name, a model ("openai/gpt-4o").
CONCURRENCY_KEY_PATTERN = rf"^[!-~]{{1,{CONCURRENCY_KEY_MAX_LENGTH}}}$"
# Limits one queue or key may be given.
LIMIT_MAX = 1_000_000
RATE_PERIOD_MIN_SECONDS = 0.001
RATE_PERIOD_MAX_SECONDS = 30 * 24 * 3600.0

# Exactly the characters for which str.isspace() is true, spelled as escapes that mean the same
# in Python's `re` and in the ECMA-262 regexes of JSON Schema, so both sides agree on "blank".
_WHITESPACE = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NO_NUL_PATTERN = r"^[^\x00]*$"
NOT_BLANK_PATTERN = rf"[^\x00{_WHITESPACE}]"
TITLE_PATTERN = rf"^[^\x00]*{NOT_BLANK_PATTERN}[^\x00]*$"
_NOT_BLANK = re.compile(NOT_BLANK_PATTERN)


class Text(fields.String):
    """A string PostgreSQL can store: no NUL character, no unpaired surrogate."""

    pattern = NO_NUL_PATTERN

    def __init__(self, **kwargs: Any) -> None:
        kwargs["metadata"] = {"pattern": self.pattern, **kwargs.get("metadata", {})}
        super().__init__(**kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in text:
            raise ValidationError("Must not contain the NUL character (\\u0000).")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError("Must be valid Unicode (no unpaired surrogates).") from None
        return text


class Title(Text):
    """A task title: 1..255 characters, not only whitespace."""

    pattern = TITLE_PATTERN

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(validate=validate.Length(min=1, max=TITLE_MAX_LENGTH), **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if text and not _NOT_BLANK.search(text):
            raise ValidationError("Must not be blank.")
        return text


class StrictInteger(fields.Integer):
    """A JSON integer in a range: booleans, floats and numeric strings are refused."""

    def __init__(self, minimum: int, maximum: int, **kwargs: Any) -> None:
        super().__init__(strict=True, validate=validate.Range(minimum, maximum), **kwargs)


class QueryInteger(fields.Integer):
    """An integer query parameter: plain ASCII digits only (int() would take '1_0' or ' 7')."""

    _DIGITS = re.compile(r"-?[0-9]+")

    def __init__(self, minimum: int, maximum: int, **kwargs: Any) -> None:
        super().__init__(validate=validate.Range(minimum, maximum), **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if not isinstance(value, str) or not self._DIGITS.fullmatch(value):
            raise self.make_error("invalid", input=value)
        return super()._deserialize(value, attr, data, **kwargs)


class Pattern(fields.String):
    """A string matching a pattern (written into its JSON Schema too)."""

    def __init__(self, pattern: str, message: str, **kwargs: Any) -> None:
        kwargs["metadata"] = {"pattern": pattern, **kwargs.get("metadata", {})}
        super().__init__(validate=validate.Regexp(pattern, error=message), **kwargs)


def queue_name(**kwargs: Any) -> Pattern:
    return Pattern(
        QUEUE_NAME_PATTERN,
        "Must be 1 to 64 letters, digits or _.:- starting with a letter or digit.",
        **kwargs,
    )


def concurrency_key(**kwargs: Any) -> Pattern:
    return Pattern(
        CONCURRENCY_KEY_PATTERN,
        f"Must be 1 to {CONCURRENCY_KEY_MAX_LENGTH} visible ASCII characters (no spaces).",
        **kwargs,
    )


class StrictNumber(fields.Float):
    """A JSON number in a range: booleans and numeric strings are refused."""

    def __init__(self, minimum: float, maximum: float, **kwargs: Any) -> None:
        super().__init__(validate=validate.Range(minimum, maximum), **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.make_error("invalid", input=value)
        return super()._deserialize(value, attr, data, **kwargs)


class Timestamp(fields.DateTime):
    """An ISO 8601 time with a UTC offset, read and written in UTC."""

    default_error_messages = {
        "invalid": "Not a valid ISO 8601 date-time.",
        "naive": "Must include a UTC offset, e.g. 2030-01-01T09:00:00Z.",
        "range": "Must be between years 1 and 9999 in UTC.",
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        moment = super()._deserialize(value, attr, data, **kwargs)
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise self.make_error("naive")
        try:
            return moment.astimezone(UTC)
        except OverflowError:
            raise self.make_error("range") from None

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        if value is None:
            return None
        return value.astimezone(UTC).isoformat()


# Unknown fields an input object may carry and still be validated field by field: each is an
# error of its own, and 80,000 of them in a 1 MiB body cost 0.3 s and a 2.4 MB 422.
MAX_UNKNOWN_FIELDS = 20


class _Input(Schema):
    class Meta:
        unknown = RAISE

    @pre_load
    def _bound_fields(self, data: Any, **kwargs: Any) -> Any:
        if isinstance(data, dict) and len(data) > len(self.load_fields) + MAX_UNKNOWN_FIELDS:
            raise ValidationError(
                f"{len(data)} fields, of which at most {len(self.load_fields)} are known: "
                "not validated one by one."
            )
        return data


class ConversationCreate(_Input):
    content = Text(required=True, validate=validate.Length(min=1))


class ConversationUpdate(_Input):
    content = Text(validate=validate.Length(min=1))
    status = fields.String(validate=validate.OneOf(CONVERSATION_STATUSES))


class TaskUpdate(_Input):
    """A partial update: only the fields sent change (`status` is not writable)."""

    title = Title()
    description = Text(allow_none=True)
    priority = StrictInteger(INT32_MIN, INT32_MAX, metadata={"description": "Higher runs first."})
    scheduled_for = Timestamp(
        allow_none=True, metadata={"description": "Not run before this time; null: run now."}
    )
    max_attempts = StrictInteger(1, MAX_ATTEMPTS_LIMIT)
    queue = queue_name(metadata={"description": "The queue it waits in (not while processing)."})
    concurrency_key = concurrency_key(
        allow_none=True,
        metadata={
            "description": "What it shares limits with (a tenant, an API key, a model); null: "
            "none. Not changeable while processing."
        },
    )
    timeout_seconds = StrictInteger(
        1,
        TIMEOUT_SECONDS_LIMIT,
        allow_none=True,
        metadata={
            "description": "An attempt's time limit; null: the TASK_TIMEOUT_SECONDS setting."
        },
    )


class TaskCreate(TaskUpdate):
    title = Title(required=True)
    queue = queue_name(metadata={"description": "The queue it waits in.", "default": DEFAULT_QUEUE})
    priority = StrictInteger(
        INT32_MIN, INT32_MAX, metadata={"description": "Higher runs first.", "default": 0}
    )
    max_attempts = StrictInteger(
        1,
        MAX_ATTEMPTS_LIMIT,
        metadata={"description": "Defaults to the service's MAX_ATTEMPTS setting."},
    )
    conversations = fields.List(
        fields.Nested(ConversationCreate),
        validate=validate.Length(max=MAX_CONVERSATIONS_PER_REQUEST),
        metadata={"maxItems": MAX_CONVERSATIONS_PER_REQUEST},
    )

    @pre_load
    def _bound_conversations(self, data: Any, **kwargs: Any) -> Any:
        conversations = data.get("conversations") if isinstance(data, dict) else None
        if isinstance(conversations, list) and len(conversations) > MAX_CONVERSATIONS_PER_REQUEST:
            raise ValidationError(
                f"At most {MAX_CONVERSATIONS_PER_REQUEST} conversations per request "
                f"(got {len(conversations)}); add more with POST /tasks/{{id}}/conversations/.",
                "conversations",
            )
        return data


class TaskListQuery(_Input):
    limit = QueryInteger(1, LIST_LIMIT_MAX, load_default=LIST_LIMIT_DEFAULT)
    offset = QueryInteger(0, BIGINT_MAX, load_default=0)
    status = fields.String(validate=validate.OneOf(TASK_STATUSES))
    queue = queue_name()


class RateLimit(_Input):
    """At most `limit` starts per `period_seconds`, spaced evenly, up to `burst` at once."""

    limit = StrictInteger(1, LIMIT_MAX, required=True)
    period_seconds = StrictNumber(RATE_PERIOD_MIN_SECONDS, RATE_PERIOD_MAX_SECONDS, required=True)
    burst = StrictInteger(
        1,
        LIMIT_MAX,
        load_default=1,
        metadata={
            "default": 1,
            "description": "Starts allowed at once; any period_seconds then holds at most "
            "limit + burst - 1.",
        },
    )


class QueueUpdate(_Input):
    """A partial update of a queue's limits: only the fields sent change; null removes one."""

    rate_limit = fields.Nested(
        RateLimit,
        allow_none=True,
        metadata={"description": "Starts of the whole queue, across the cluster."},
    )
    key_concurrency_limit = StrictInteger(
        1,
        LIMIT_MAX,
        allow_none=True,
        metadata={"description": "Running tasks per concurrency key, by default."},
    )
    key_rate_limit = fields.Nested(
        RateLimit,
        allow_none=True,
        metadata={"description": "Starts per concurrency key, by default."},
    )


class KeyUpdate(_Input):
    """A key's own limits, over its queue's defaults: only the fields sent change; null
    falls back to the queue's."""

    concurrency_limit = StrictInteger(1, LIMIT_MAX, allow_none=True)
    rate_limit = fields.Nested(RateLimit, allow_none=True)


class KeyListQuery(_Input):
    limit = QueryInteger(1, LIST_LIMIT_MAX, load_default=LIST_LIMIT_DEFAULT)


# The oldest a prune may look back: a century (an interval beyond ~178 million years would be
# out of PostgreSQL's range, a 500 instead of a 422).
PRUNE_OLDER_THAN_MAX_SECONDS = 100 * 365 * 24 * 3600
FINISHED_STATUSES = [status.value for status in TERMINAL]


class TaskPrune(_Input):
    """Which finished tasks a prune deletes: those of these statuses unchanged for so long."""

    older_than_seconds = StrictInteger(
        0,
        PRUNE_OLDER_THAN_MAX_SECONDS,
        required=True,
        metadata={"description": "Delete those not changed for at least this long; 0: all."},
    )
    statuses = fields.List(
        fields.String(validate=validate.OneOf(FINISHED_STATUSES)),
        validate=validate.Length(min=1),
        load_default=FINISHED_STATUSES,
        metadata={"description": "Finished statuses to prune; default all three."},
    )


class ConversationOut(Schema):
    id = fields.Integer(required=True)
    task_id = fields.Integer(required=True)
    content = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(CONVERSATION_STATUSES))
    created_at = Timestamp(required=True)
    updated_at = Timestamp(required=True)
    processed_at = Timestamp(
        required=True,
        allow_none=True,
        metadata={"description": "When it turned processed; null while active."},
    )
    result = fields.Raw(
        required=True,
        allow_none=True,
        metadata={"description": "The processor's checkpointed result (any JSON), or null."},
    )


class ProgressOut(Schema):
    """A progress report as stored (jsonb): `at` is already text in the API's time format."""

    done = fields.Integer(required=True)
    total = fields.Integer(required=True, allow_none=True)
    message = fields.String(required=True, allow_none=True)
    at = fields.String(required=True, metadata={"format": "date-time"})


class TaskErrorOut(Schema):
    attempt = fields.Integer(required=True)
    instance_id = fields.String(required=True, allow_none=True)
    error = fields.String(required=True)
    at = Timestamp(required=True)


class _TaskOutBase(Schema):
    id = fields.Integer(required=True)
    title = fields.String(required=True)
    description = fields.String(required=True, allow_none=True)
    status = fields.String(required=True, validate=validate.OneOf(TASK_STATUSES))
    priority = fields.Integer(required=True)
    scheduled_for = Timestamp(required=True, allow_none=True)
    attempts = fields.Integer(required=True)
    max_attempts = fields.Integer(required=True)
    last_error = fields.String(required=True, allow_none=True)
    created_at = Timestamp(required=True)
    updated_at = Timestamp(required=True)
    processed_at = Timestamp(required=True, allow_none=True)
    processing_instance_id = fields.String(required=True, allow_none=True)
    queue = fields.String(required=True)
    concurrency_key = fields.String(required=True, allow_none=True)
    started_at = Timestamp(
        required=True,
        allow_none=True,
        metadata={"description": "When its latest attempt was admitted to run; null: never."},
    )
    timeout_seconds = fields.Integer(
        required=True,
        allow_none=True,
        metadata={"description": "Its own time limit per attempt; null: the service default."},
    )
    deferrals = fields.Integer(
        required=True,
        metadata={"description": "How often its processor asked to run later (not attempts)."},
    )
    progress = fields.Nested(
        ProgressOut,
        required=True,
        allow_none=True,
        metadata={"description": "The processor's last progress report, or null."},
    )


class TaskOut(_TaskOutBase):
    result = fields.Raw(
        required=True,
        allow_none=True,
        metadata={"description": "What the processor returned (any JSON), or null."},
    )
    conversations = fields.List(fields.Nested(ConversationOut), required=True)
    errors = fields.List(
        fields.Nested(TaskErrorOut),
        required=True,
        metadata={"description": "Failed attempts, oldest first (the newest 20 are kept)."},
    )


class TaskListItem(_TaskOutBase):
    conversation_count = fields.Integer(required=True)


class RateLimitOut(Schema):
    limit = fields.Integer(required=True)
    period_seconds = fields.Float(required=True)
    burst = fields.Integer(required=True)


class QueueOut(Schema):
    name = fields.String(required=True)
    paused = fields.Boolean(required=True)
    rate_limit = fields.Nested(RateLimitOut, required=True, allow_none=True)
    key_concurrency_limit = fields.Integer(required=True, allow_none=True)
    key_rate_limit = fields.Nested(RateLimitOut, required=True, allow_none=True)
    throttled_until = Timestamp(
        required=True,
        allow_none=True,
        metadata={"description": "A processor throttled the queue until then (throttle())."},
    )
    counts = fields.Dict(
        keys=fields.String(),
        values=fields.Integer(),
        required=True,
        metadata={"description": "Its tasks by status."},
    )
    throttled_keys = fields.Integer(
        required=True,
        metadata={"description": "Keys that can start nothing now: out of rate or throttled."},
    )
    updated_at = Timestamp(
        required=True, allow_none=True, metadata={"description": "null: never configured."}
    )


class KeyOut(Schema):
    queue = fields.String(required=True)
    key = fields.String(required=True)
    concurrency_limit = fields.Integer(
        required=True, allow_none=True, metadata={"description": "Its own; null: the queue's."}
    )
    rate_limit = fields.Nested(
        RateLimitOut,
        required=True,
        allow_none=True,
        metadata={"description": "Its own; null: the queue's."},
    )
    effective_concurrency_limit = fields.Integer(
        required=True, allow_none=True, metadata={"description": "What holds; null: none."}
    )
    effective_rate_limit = fields.Nested(RateLimitOut, required=True, allow_none=True)
    running = fields.Integer(required=True)
    throttled_until = Timestamp(required=True, allow_none=True)
    rate_ready_at = Timestamp(
        required=True,
        allow_none=True,
        metadata={"description": "When its rate allows the next start."},
    )


class Problem(Schema):
    """An RFC 9457 problem detail."""

    class Meta:
        unknown = INCLUDE  # RFC 9457 lets a problem carry extension members

    type = fields.String(required=True, metadata={"example": "about:blank"})
    title = fields.String(required=True)
    status = fields.Integer(required=True)
    detail = fields.String(required=True)


class ValidationProblem(Problem):
    """A problem detail naming each invalid field."""

    errors = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.String()),
        required=True,
        metadata={"example": {"title": ["Missing data for required field."]}},
    )
