"""Quality signals read from what other parts of lmforge already keep.

- Ratings: the web chat's `FeedbackStore` (lmforge/serve/feedback.py) holds one thumbs up
  or down per rated answer. `FeedbackCollector` counts them at scrape time through its own
  read-only SQLite connection (WAL lets it read while the server writes), so the numbers
  are never stale and the store's code is not touched.
- Refusals: `is_refusal` from the alignment's preference data (a declining phrase in the
  opening of the answer), the same judge the safety evaluation uses.
- Groundedness of an answer from the knowledge base: the share of its generated sentences
  the support check kept (the `Answerer` drops the ones the sources do not support).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from ..align.preference_data import is_refusal

__all__ = ["FeedbackCollector", "answer_groundedness", "feedback_counts", "is_refusal"]


def feedback_counts(path: str | Path) -> dict[str, int]:
    """{"up": n, "down": n} of a feedback database (zeros when it cannot be read)."""
    counts = {"up": 0, "down": 0}
    try:
        # as_uri() percent-encodes the path, so a "?" or "#" in a folder name stays part of it.
        db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return counts
    try:
        for rating, n in db.execute("SELECT rating, count(*) FROM feedback GROUP BY rating"):
            counts["up" if rating > 0 else "down"] += int(n)
    except sqlite3.Error:
        pass
    finally:
        db.close()
    return counts


class FeedbackCollector:
    """A Prometheus collector: `lmforge_feedback_ratings_total{rating}` and the thumbs-up share."""

    def __init__(self, path: str | Path) -> None:
        self.path = path

    def describe(self):
        return []  # no fixed description: the values are read at collect time only

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counts = feedback_counts(self.path)
        ratings = CounterMetricFamily("lmforge_feedback_ratings", "Answers rated in the web chat, by rating",
                                      labels=["rating"])
        for rating, n in counts.items():
            ratings.add_metric([rating], n)
        yield ratings
        total = counts["up"] + counts["down"]
        yield GaugeMetricFamily("lmforge_feedback_thumbs_up_ratio", "Share of rated answers rated thumbs up",
                                value=counts["up"] / total if total else float("nan"))


def answer_groundedness(answer: Any) -> float | None:
    """Share of a generated knowledge-base answer's sentences that its sources support
    (None for extractive or refused answers, which quote the sources or say nothing)."""
    if getattr(answer, "mode", None) != "generated":
        return None
    from ..rag.groundedness import answer_sentences

    kept = len(answer_sentences(answer.text or ""))
    dropped = len(getattr(answer, "dropped", []) or [])
    return kept / (kept + dropped) if kept + dropped else None
