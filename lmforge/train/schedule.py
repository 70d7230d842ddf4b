"""Learning-rate schedules (P3): a pure function of the optimizer step.

All schedules start with a linear warmup from ~0 to the peak rate over `warmup_steps`
(Adam's second-moment estimates are noisy in the first steps; a small rate keeps those
steps from throwing the weights far off). After warmup:

- cosine:   half a cosine from the peak down to ``min_lr_ratio x peak`` at the last step.
- wsd:      warmup-stable-decay: hold the peak, then decay linearly to the floor over the
            final ``decay_fraction`` of the steps. The stable phase can be extended
            without knowing the final step count in advance, which is why it suits
            continued training and scaling sweeps.
- linear:   straight line from the peak to the floor.
- constant: the peak.

Being stateless, the schedule needs no checkpoint of its own: resuming at step s gives
the same rate as an uninterrupted run.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "linear", "constant")


def lr_factor(step: int, total_steps: int, name: str = "cosine", warmup_steps: int = 0,
              min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Multiplier of the peak rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: use {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    floor = min_lr_ratio
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if name == "linear":
        return 1 - (1 - floor) * progress
    decay_steps = max(1, round(decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    return 1 - (1 - floor) * min(1.0, (step - decay_start + 1) / decay_steps)
