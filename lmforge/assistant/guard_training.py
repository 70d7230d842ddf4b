"""The guard's classifiers trained for this assistant's traffic: its customers' messages count as benign.

A classifier's threshold is set for a false-positive budget on the benign texts it is
calibrated on, and holds only for text like them. The guard's own benign set (questions
about orders and products, written as whole sentences) leaves out much of what customers
of a shop send: "human please", "hi", "bye", "tell me about flights to Lisbon". On the
held-out messages of lmforge/assistant/intents.py the classifiers trained on it alone
flagged 22% (injection) and 44% (moderation) of the benign ones.

`assistant_guard_data` adds the generated customer messages, split by template like
the rest (train -> train, validation -> calibration, test -> test): every benign intent is
benign for the injection classifier and ``safe`` for moderation, and abusive messages are
``harassment`` for moderation (they are not injections). `train_assistant_guard` trains
both classifiers with lmforge/guard/train.py on that data and scores the held-out splits:
attack success and false positives per layer (the guard's ablation), and the false
positives on the customers' held-out messages alone.
"""

from __future__ import annotations

from typing import Any

from .intents import make_intent_dataset

SPLIT_NAMES = {"train": "train", "validation": "calibration", "test": "test"}


def assistant_guard_data(config, seed: int = 0) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The guard's injection and moderation splits plus the customer messages (see the module)."""
    from ..guard.harm_data import SAFE
    from ..guard.train import datasets

    data = datasets(config)
    for split, rows in make_intent_dataset(seed).items():
        target = SPLIT_NAMES[split]
        for r in rows:
            template = f"shop/{r['template']}"
            data["injection"][target].append({"text": r["text"], "label": "benign", "family": f"shop_{r['label']}",
                                              "template": template, "channel": "user", "split": target})
            data["moderation"][target].append({"text": r["text"], "template": template,
                                               "label": "harassment" if r["label"] == "abuse" else SAFE})
    return data


def train_assistant_guard(config, progress: bool = True, seed: int = 0) -> dict[str, Any]:
    """Train both classifiers on `assistant_guard_data` into ``config.train.out``; held-out scores."""
    from ..guard.evaluate import ablation
    from ..guard.pipeline import GuardConfig, GuardPipeline
    from ..guard.train import train_guard

    data = assistant_guard_data(config, seed)
    report = train_guard(config, progress=progress, data=data)
    classifiers = report.pop("classifiers")
    pipeline = GuardPipeline(GuardConfig(models=config.train.out), classifiers["injection"], classifiers["moderation"])
    # abusive customer messages are moderation's business (harassment), not injection benchmarks' benign
    test = [r for r in data["injection"]["test"] if r["family"] != "shop_abuse"]
    scores = ablation(pipeline, test)
    customers = [r for r in test if r["family"].startswith("shop_")]
    flags = pipeline.input_flags([r["text"] for r in customers], "user")
    by_intent: dict[str, list[bool]] = {}
    for r, f in zip(customers, flags):
        if r["family"] != "shop_abuse":
            by_intent.setdefault(r["family"][5:], []).append(bool(f))
    flagged = [x for v in by_intent.values() for x in v]
    report["held_out"] = {"ablation": scores, "customer_messages": len(flagged),
                          "customer_false_positive": sum(flagged) / max(1, len(flagged)),
                          "customer_false_positive_by_intent": {k: sum(v) / len(v) for k, v in sorted(by_intent.items())}}
    return report
