"""Schemathesis hooks for tests/test_openapi.py (loaded through SCHEMATHESIS_HOOKS)."""

from __future__ import annotations

import re
import uuid
from typing import Any

import schemathesis

from taskapp.schemas import IDEMPOTENCY_KEY_MAX_LENGTH, IDEMPOTENCY_KEY_PATTERN


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Give every valid Idempotency-Key a fresh value, and every If-Match the tag `*`.

    Generated keys repeat ("0", "a"…) with different bodies, and reusing a key with another
    body is a documented 422 that positive_data_acceptance would report as a rejection of
    valid data. Invalid keys are left alone: the service must still reject them. Likewise
    any generated entity tag is stale (a documented 412); `*` still goes through the
    conditional write (tests/test_http_conventions.py tests the tags themselves).
    """
    headers = case.headers or {}
    if "If-Match" in headers:
        headers["If-Match"] = "*"
    key = headers.get("Idempotency-Key")
    if (
        isinstance(key, str)
        and len(key) <= IDEMPOTENCY_KEY_MAX_LENGTH
        and re.fullmatch(IDEMPOTENCY_KEY_PATTERN, key)
    ):
        headers["Idempotency-Key"] = f"st-{uuid.uuid4()}"
