"""Training the guard's two classifiers from a recipe (``lmforge guard train [RECIPE]``).

The injection classifier (labels benign / attack) trains on lmforge/guard/attack_data.py's
training templates; the moderation classifier (safe + the categories of
lmforge/guard/harm_data.py) on that set's training frames. Each gets its thresholds for the
recipe's target false-positive rate, by default from out-of-fold scores over the training
and calibration templates (lmforge/guard/classifier.py); the test splits are not read here (`lmforge guard eval` scores them). Output: ``OUT/injection/``,
``OUT/moderation/`` (lmforge/guard/classifier.py directories), ``OUT/guard.yaml`` (the
recipe as run) and ``OUT/train.json`` (sizes, losses, calibration figures).
"""

from __future__ import annotations

import dataclasses
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.guard.config import FeatureSpec, HeadSpec


@dataclass
class GuardDataSection:
    seed: int = 0
    injection_train: int = 1200  # records per split, half benign, half attacks
    injection_calibration: int = 400
    injection_test: int = 600
    harm_train: int = 60  # harmful records per category and split
    harm_calibration: int = 20
    harm_test: int = 40
    safe_train: int = 420  # safe records per split
    safe_calibration: int = 140
    safe_test: int = 280


@dataclass
class GuardCalibrationSection:
    injection_fpr: float = 0.01  # target share of benign calibration texts flagged as attacks
    moderation_fpr: float = 0.01  # target share of safe texts flagged under any category (split among them)
    folds: int = 5  # > 1: thresholds from out-of-fold scores over train + calibration templates; 0: the split alone


@dataclass
class GuardOutSection:
    out: str = "runs/guard"


@dataclass
class GuardTrainConfig:
    data: GuardDataSection = field(default_factory=GuardDataSection)
    features: FeatureSpec = field(default_factory=FeatureSpec)
    head: HeadSpec = field(default_factory=HeadSpec)
    calibration: GuardCalibrationSection = field(default_factory=GuardCalibrationSection)
    train: GuardOutSection = field(default_factory=GuardOutSection)

    def validate(self) -> None:
        self.features.validate()
        d = self.data
        if min(d.injection_train, d.injection_calibration, d.harm_train, d.harm_calibration, d.safe_train,
               d.safe_calibration) < 2:
            raise LmforgeError("data: every training and calibration size must be at least 2")
        if min(d.injection_test, d.harm_test, d.safe_test) < 0:
            raise LmforgeError("data: test sizes cannot be negative")
        if self.head.epochs < 1 or self.head.lr <= 0 or self.head.weight_decay < 0:
            raise LmforgeError("head: epochs and lr must be positive, weight_decay not negative")
        if self.calibration.folds == 1 or self.calibration.folds < 0:
            raise LmforgeError("calibration.folds must be 0 (use the calibration split) or at least 2")
        for name in ("injection_fpr", "moderation_fpr"):
            if not 0.0 <= getattr(self.calibration, name) < 1.0:
                raise LmforgeError(f"calibration.{name} must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}


SECTIONS = {"data": GuardDataSection, "features": FeatureSpec, "head": HeadSpec,
            "calibration": GuardCalibrationSection, "train": GuardOutSection}


def option_names() -> list[str]:
    return [f"{name}.{f}" for name, cls in SECTIONS.items() for f in typing.get_type_hints(cls)]


def load_guard_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> GuardTrainConfig:
    """A YAML recipe (None: defaults) with ``{"section.field": value}`` overrides."""
    from lmforge.train.recipe import build_sections, read_recipe

    data, source = read_recipe(path, overrides, SECTIONS)
    config = GuardTrainConfig(**build_sections(data, SECTIONS, source))
    config.validate()
    return config


def to_yaml(config: GuardTrainConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)


def datasets(config: GuardTrainConfig) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The injection and moderation splits the recipe describes."""
    from lmforge.guard.attack_data import injection_splits
    from lmforge.guard.harm_data import moderation_splits

    d = config.data
    return {"injection": injection_splits(d.seed, {"train": d.injection_train, "calibration": d.injection_calibration,
                                                   "test": d.injection_test}),
            "moderation": moderation_splits(d.seed, {"train": d.harm_train, "calibration": d.harm_calibration,
                                                     "test": d.harm_test},
                                            {"train": d.safe_train, "calibration": d.safe_calibration,
                                             "test": d.safe_test})}


def train_guard(config: GuardTrainConfig, progress: bool = True, featurizer=None,
                data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, calibrate and save both classifiers; returns the report (also OUT/train.json)."""
    from lmforge.guard.classifier import Featurizer, train_classifier
    from lmforge.guard.harm_data import CATEGORIES, SAFE
    from lmforge.io.atomic import write_json_atomic, write_text_atomic
    from lmforge.io.progress import Progress

    out = Path(config.train.out)
    out.mkdir(parents=True, exist_ok=True)
    data = data or datasets(config)
    featurizer = featurizer or Featurizer(config.features, progress=progress)
    started = time.perf_counter()
    bar = Progress("guard train", 2, "classifiers", enabled=progress)
    pairs = {name: {s: [(r["text"], r["label"]) for r in rs] for s, rs in splits.items()} for name, splits in data.items()}
    groups = {name: [r["template"] for s in ("train", "calibration") for r in splits[s]] for name, splits in data.items()}
    folds = config.calibration.folds
    injection = train_classifier(pairs["injection"]["train"], pairs["injection"]["calibration"], ["benign", "attack"],
                                 ["attack"], config.calibration.injection_fpr, config.features, config.head, featurizer,
                                 groups["injection"], folds)
    injection.save(out / "injection")
    bar.update(1)
    moderation = train_classifier(pairs["moderation"]["train"], pairs["moderation"]["calibration"],
                                  [SAFE, *CATEGORIES], list(CATEGORIES), config.calibration.moderation_fpr,
                                  config.features, config.head, featurizer, groups["moderation"], folds, SAFE)
    moderation.save(out / "moderation")
    bar.update(2)
    seconds = time.perf_counter() - started
    bar.close(f"guard train: 2 classifiers in {seconds:.0f} s")
    report = {"output": str(out), "seconds": seconds, "features": dataclasses.asdict(config.features),
              "injection": injection.info, "moderation": moderation.info}
    write_json_atomic(out / "train.json", report)
    write_text_atomic(out / "guard.yaml", to_yaml(config))
    return {**report, "classifiers": {"injection": injection, "moderation": moderation}}
