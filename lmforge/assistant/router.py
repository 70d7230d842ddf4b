"""The intent router: a trained classifier in front of the assistant, with a confidence floor.

    router = IntentRouter.load("runs/classify-intents-minilm")
    route = router.route("yo where's my stuff, order A10233")
    route.intent, route.confidence, route.confident        # "order_status", 0.97, True

The classifier is a sequence classifier lmforge trained (``lmforge finetune classify
classify-intents-minilm``: all-MiniLM-L6-v2 with a classification head, on the generated
messages of lmforge/assistant/intents.py). A router must also know when it does not know:
a message below the confidence floor is not sent to a handler on a guess; the assistant
asks the customer to say more, and hands the conversation to a person when that happens
again.

The floor is calibrated (`calibrate`) on the validation split, which training never saw:
the lowest confidence t at which the messages the router accepts (confidence >= t) are
wrong at most ``max_error`` of the time. What that costs is the *coverage*, the share of
messages accepted; both are stored in ``router.json`` beside the classifier and reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import LmforgeError

ROUTER_FILE = "router.json"


@dataclass
class Route:
    intent: str
    confidence: float
    confident: bool
    scores: dict[str, float]


def calibrate(probabilities: np.ndarray, truth: Sequence[int], max_error: float = 0.05) -> dict[str, float]:
    """The lowest confidence floor at which accepted predictions err at most ``max_error``.

    Candidates are the observed top confidences; accepting everything (floor 0) is chosen
    when the router is already that accurate.
    """
    if len(probabilities) == 0 or len(probabilities) != len(truth):
        raise LmforgeError("calibration needs one label per probability row, and at least one row")
    top = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == np.asarray(truth)
    order = np.argsort(-top, kind="stable")
    wrong_so_far = np.cumsum(~right[order])
    accepted = np.arange(1, len(order) + 1)
    error = wrong_so_far / accepted
    ok = np.nonzero(error <= max_error)[0]
    if len(ok) == 0:
        floor, n = float(np.nextafter(np.float32(top.max()), np.float32(np.inf))), 0
    else:
        last = int(ok[-1])
        floor, n = float(top[order[last]]), last + 1
        if n == len(order):
            floor = 0.0
    chosen = top >= floor
    return {"threshold": floor, "max_error": max_error, "coverage": n / len(order),
            "accepted_accuracy": float(right[chosen].mean()) if chosen.any() else None,
            "accuracy": float(right.mean()), "examples": len(order)}


class IntentRouter:
    """A trained sequence classifier and its calibrated confidence floor."""

    def __init__(self, classifier, threshold: float = 0.0, info: dict[str, Any] | None = None) -> None:
        self.classifier = classifier
        self.labels = list(classifier.labels)
        self.threshold = float(threshold)
        self.info = info or {}

    @classmethod
    def load(cls, run_dir: str | Path) -> "IntentRouter":
        """A classify run directory (``OUT`` with ``model/``) or the model directory itself."""
        from lmforge.tune.classify import SequenceClassifier

        run_dir = Path(run_dir)
        model_dir = run_dir / "model" if (run_dir / "model").is_dir() else run_dir
        if not (model_dir / "config.json").is_file():
            raise LmforgeError(f"{run_dir} holds no trained router (train one: lmforge assistant train-router)")
        settings = run_dir / ROUTER_FILE
        info = json.loads(settings.read_text(encoding="utf-8")) if settings.is_file() else {}
        return cls(SequenceClassifier(model_dir), info.get("threshold", 0.0), info)

    def route_many(self, texts: Sequence[str]) -> list[Route]:
        probs = self.classifier.probabilities(list(texts))
        out = []
        for row in probs:
            best = int(row.argmax())
            out.append(Route(self.labels[best], float(row[best]), bool(row[best] >= self.threshold),
                             {lab: float(p) for lab, p in zip(self.labels, row)}))
        return out

    def route(self, text: str) -> Route:
        return self.route_many([text])[0]

    def calibrate(self, records: Sequence[dict[str, Any]], max_error: float = 0.05) -> dict[str, float]:
        """Set the floor from labelled ``{"text", "label"}`` records (the validation split)."""
        index = {lab: i for i, lab in enumerate(self.labels)}
        unknown = sorted({r["label"] for r in records} - set(index))
        if unknown:
            raise LmforgeError(f"calibration labels {unknown} are not the router's labels {self.labels}")
        probs = self.classifier.probabilities([r["text"] for r in records])
        result = calibrate(probs, [index[r["label"]] for r in records], max_error)
        self.threshold, self.info = result["threshold"], result
        return result

    def save_settings(self, run_dir: str | Path) -> Path:
        from lmforge.io.atomic import write_json_atomic

        path = Path(run_dir) / ROUTER_FILE
        write_json_atomic(path, {**self.info, "threshold": self.threshold, "labels": self.labels})
        return path
