"""An example processor that does real work: the sentiment of each conversation, with VADER.

VADER (vaderSentiment on PyPI) is a rule-based sentiment model for short, informal English
text; it ships its lexicon, so nothing is downloaded at run time. Run the stack with it:

    TASK_PROCESSOR=examples.sentiment:process ./run.sh

Each conversation is scored sentence by sentence, each sentence's score sent as live output
(watch it on the dashboard's task page, or with `curl -N localhost:12000/events?task_id=1`),
then checkpointed at once with its scores (a crash or a retry then skips it), with the task's
progress reported after each. The task's result is a summary over all of its conversations,
including those an earlier attempt already checkpointed. A cancel, a timeout or the end of a
shutdown's grace stops it between sentences. SENTIMENT_SECONDS_PER_SENTENCE (default 0) makes
it pause after each sentence, slow enough to watch.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from taskapp.processor import Context, TaskSnapshot

# VADER's usual cut-offs on the compound score (-1 … 1).
POSITIVE, NEGATIVE = 0.05, -0.05
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

_analyzer: SentimentIntensityAnalyzer | None = None
_lock = threading.Lock()


def analyzer() -> SentimentIntensityAnalyzer:
    """One analyzer per process (loading the lexicon takes a moment); it is only read."""
    global _analyzer
    with _lock:
        if _analyzer is None:
            _analyzer = SentimentIntensityAnalyzer()
        return _analyzer


def label(compound: float) -> str:
    if compound >= POSITIVE:
        return "positive"
    if compound <= NEGATIVE:
        return "negative"
    return "neutral"


def score(text: str) -> dict[str, Any]:
    """A conversation's result: VADER's scores and their label."""
    scores = analyzer().polarity_scores(text)
    return {"sentiment": label(scores["compound"]), **scores}


def stream_sentences(context: Context, conversation_id: int, text: str, pause: float) -> None:
    """Send each sentence's score as live output, pausing `pause` s after each."""
    for sentence in _SENTENCE_END.split(text.strip()):
        context.raise_if_cancelled()
        compound = analyzer().polarity_scores(sentence)["compound"]
        context.emit(conversation_id, f"{compound:+.2f} {label(compound)}: {sentence}\n")
        if pause:
            context.wait(pause)


def process(task: TaskSnapshot, context: Context) -> dict[str, Any]:
    """Score and checkpoint each conversation still to do; return the task's summary."""
    pause = float(os.environ.get("SENTIMENT_SECONDS_PER_SENTENCE", "0") or 0)
    results: dict[int, Any] = {done.id: done.result for done in task.processed}
    total = len(task.conversations) + len(task.processed)
    for conversation in task.conversations:
        stream_sentences(context, conversation.id, conversation.content, pause)
        result = score(conversation.content)
        if context.checkpoint(conversation.id, result):
            results[conversation.id] = result
        context.progress(len(results), total, f"scored conversation {conversation.id}")
    scored = [r for r in results.values() if isinstance(r, dict) and "compound" in r]
    counts = {name: 0 for name in ("positive", "neutral", "negative")}
    for result in scored:
        counts[result["sentiment"]] += 1
    mean = sum(r["compound"] for r in scored) / len(scored) if scored else 0.0
    return {
        "conversations": len(scored),
        **counts,
        "mean_compound": round(mean, 4),
        "overall": label(mean) if scored else None,
    }
