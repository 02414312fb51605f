"""The processor's contract: what a processor is given, and how TASK_PROCESSOR is loaded.

A processor is `function(task)`: it gets a read-only TaskSnapshot taken at claim time and runs
outside any database transaction. Returning completes the task; raising fails the attempt
(retried with backoff while attempts remain). The built-in processor simulates work.
"""

from __future__ import annotations

import importlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from .config import ConfigError, Settings


@dataclass(frozen=True)
class ConversationSnapshot:
    id: int
    content: str


@dataclass(frozen=True)
class TaskSnapshot:
    """What a processor sees of a task: a read-only copy taken at claim time."""

    id: int
    title: str
    description: str | None
    priority: int
    attempts: int
    conversations: tuple[ConversationSnapshot, ...]


Processor = Callable[[TaskSnapshot], object]


def simulate_work(
    task: TaskSnapshot, *, min_seconds: float = 6.0, max_seconds: float = 7.0
) -> None:
    """The seed's stand-in for real work: sleep a while, uniformly in [min, max] seconds."""
    if max_seconds > 0:
        time.sleep(random.uniform(min_seconds, max_seconds))


def load_processor(settings: Settings) -> Processor:
    """Resolve TASK_PROCESSOR ('package.module:function') to the function to call."""
    module_name, _, attr = settings.task_processor.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"TASK_PROCESSOR {settings.task_processor!r} cannot be loaded: {exc}"
        ) from exc
    if function is simulate_work:
        low, high = settings.processing_min_seconds, settings.processing_max_seconds
        return lambda task: simulate_work(task, min_seconds=low, max_seconds=high)
    processor: Processor = function
    return processor
