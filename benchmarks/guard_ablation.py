"""Guard ablation on held-out templates: each input layer alone and all together.

Trains the injection and moderation classifiers of a recipe (default guard-classifiers)
on its training templates, calibrates them on the calibration templates, and scores the
test templates, which neither step read: attack success (attacks no layer flags) and
false positives per layer combination, moderation precision/recall per category, PII
redaction on a generated set, the tool-call policy and the leakage check. With
``--features both,hashing,embedding`` the classifier is also trained on each feature
kind (the texts are embedded once) and its own figures are listed per kind.

    nice -n 10 python benchmarks/guard_ablation.py [--recipe guard-classifiers] [--out runs/guard-ablation]

Prints one JSON line; writes OUT/ablation.md (tables) and OUT/ablation.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


class Columns:
    """One feature kind's columns of the 'both' featurizer (embeddings first, then hashing)."""

    def __init__(self, featurizer, kind: str, dim: int) -> None:
        self.featurizer, self.kind, self.dim = featurizer, kind, dim

    def __call__(self, texts):
        x = self.featurizer(texts)
        return {"both": x, "embedding": x[:, :self.dim], "hashing": x[:, self.dim:]}[self.kind]


def main() -> None:
    from lmforge.cli.common import find_recipe
    from lmforge.guard.classifier import FeatureSpec, Featurizer, train_classifier
    from lmforge.guard.evaluate import ablation, evaluate_guard, format_markdown
    from lmforge.guard.harm_data import CATEGORIES, SAFE
    from lmforge.guard.pipeline import GuardConfig, GuardPipeline
    from lmforge.guard.train import datasets, load_guard_recipe
    from lmforge.io.atomic import write_json_atomic, write_text_atomic

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="guard-classifiers")
    parser.add_argument("--features", default="both", help="comma-separated feature kinds to compare")
    parser.add_argument("--out", default="runs/guard-ablation")
    args = parser.parse_args()

    config = load_guard_recipe(find_recipe(args.recipe))
    kinds = [k.strip() for k in args.features.split(",") if k.strip()]
    data = datasets(config)
    base = Featurizer(FeatureSpec(**{**config.features.__dict__, "kind": "both"}), progress=True)
    embed_dim = base.embedder.dim
    pairs = {name: {s: [(r["text"], r["label"]) for r in rs] for s, rs in splits.items()} for name, splits in data.items()}
    groups = {name: [r["template"] for s in ("train", "calibration") for r in splits[s]] for name, splits in data.items()}
    folds = config.calibration.folds
    started = time.perf_counter()
    results, tables = {}, []
    for kind in kinds:
        spec = FeatureSpec(**{**config.features.__dict__, "kind": kind})
        featurizer = Columns(base, kind, embed_dim)
        injection = train_classifier(pairs["injection"]["train"], pairs["injection"]["calibration"],
                                     ["benign", "attack"], ["attack"], config.calibration.injection_fpr, spec,
                                     config.head, featurizer, groups["injection"], folds)
        moderation = train_classifier(pairs["moderation"]["train"], pairs["moderation"]["calibration"],
                                      [SAFE, *CATEGORIES], list(CATEGORIES), config.calibration.moderation_fpr, spec,
                                      config.head, featurizer, groups["moderation"], folds, SAFE)
        pipeline = GuardPipeline(GuardConfig(), injection=injection, moderation=moderation)
        if kind == kinds[0]:
            result = evaluate_guard(pipeline, data, "test")
            result["calibration_split"] = {"injection": injection.info["calibration"],
                                           "moderation": moderation.info["calibration"]}
            results["main"] = result
            tables.append(format_markdown(result))
        results[kind] = {"ablation": ablation(pipeline, data["injection"]["test"])["layers"]}
    seconds = time.perf_counter() - started
    lines = ["", f"## Classifier features ({', '.join(kinds)}): the classifier layer alone and all layers", "",
             "| features | classifier: attack success | classifier: false positives | all: attack success | "
             "all: false positives |", "|---|---:|---:|---:|---:|"]
    for kind in kinds:
        layers = results[kind]["ablation"]
        lines.append(f"| {kind} | {100 * layers['classifier']['attack_success']:.1f}% | "
                     f"{100 * layers['classifier']['false_positive']:.1f}% | {100 * layers['all']['attack_success']:.1f}% | "
                     f"{100 * layers['all']['false_positive']:.1f}% |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "ablation.md", "".join(tables) + "\n".join(lines) + "\n")
    write_json_atomic(out / "ablation.json", results)
    main_layers = results["main"]["ablation"]["layers"]
    summary = {"benchmark": "guard_ablation", "recipe": args.recipe, "seconds": round(seconds, 1),
               "held_out": {name: {"attack_success": round(r["attack_success"], 4),
                                   "false_positive": round(r["false_positive"], 4)} for name, r in main_layers.items()},
               "moderation": {c: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                                  if k in ("precision", "recall")}
                              for c, r in results["main"].get("moderation", {}).get("per_category", {}).items()},
               "pii": {"recall": results["main"]["pii"]["recall"], "precision": results["main"]["pii"]["precision"]},
               "tool_policy": results["main"]["tool_policy"], "leakage": results["main"]["leakage"],
               "features": {k: {"classifier_attack_success": round(results[k]["ablation"]["classifier"]["attack_success"], 4),
                                "classifier_false_positive": round(results[k]["ablation"]["classifier"]["false_positive"], 4),
                                "all_attack_success": round(results[k]["ablation"]["all"]["attack_success"], 4),
                                "all_false_positive": round(results[k]["ablation"]["all"]["false_positive"], 4)}
                            for k in kinds},
               "table": str(out / "ablation.md")}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
