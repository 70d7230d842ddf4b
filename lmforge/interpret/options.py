"""Settings of ``lmforge explain`` (every field is a flag), kept free of PyTorch so that the
command line builds without importing it."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.options import int_list, option

IG_RULES = ("trapezoid", "midpoint", "left", "right")
BASELINES = ("zero", "pad")
PROBE_TASKS = ("none", "sentiment")


@dataclass
class ExplainOptions:
    """What the explanation report contains and how each part is computed."""

    out: str = option("explain.html", help="the HTML report to write (a JSON file of the figures' numbers is "
                                           "written beside it, same name with .json)")
    compare: str | None = option(None, help="a corrupted prompt of the same token length: adds activation "
                                            "patching from PROMPT (clean) into it")
    target: str | None = option(None, help="the token to explain (its first token if the text is several); "
                                           "default: the model's top prediction after PROMPT")
    contrast: str | None = option(None, help="attribute logit(target) - logit(CONTRAST) instead of the target's logit "
                                             "alone: why this answer rather than that one")
    compare_target: str | None = option(None, help="with --compare: the competing answer for the logit "
                                                    "difference (default: the top prediction after the corrupted "
                                                    "prompt)")
    layers: list[int] | None = option(None, parse=lambda text: int_list(text, "--layers"), metavar="L1,L2",
                                      help="layers whose attention maps are drawn (default: all)")
    top_k: int = option(5, help="logit lens: top tokens kept per layer and position")
    ig_steps: int = option(64, help="integrated gradients: interpolation steps")
    ig_rule: str = option("trapezoid", choices=IG_RULES, help="integrated gradients: quadrature rule over the path")
    baseline: str = option("pad", choices=BASELINES,
                           help="attribution baseline: the pad (else end-of-text) token's embedding at every "
                                "position, or zero embeddings (with RMSNorm a poor path start: see the handbook)")
    keep_first: bool = option(True, help="attributions: hold the first token at its own embedding in the baseline "
                                         "(it is the attention sink; moving it makes integrated gradients diverge)")
    max_tokens: int = option(64, help="longest prompt accepted (attention maps grow with its square)")
    probe: str = option("none", choices=PROBE_TASKS,
                        help="also train per-layer linear probes: sentiment (gensim's Pang & Lee polarity "
                             "sentences, shuffled-label control)")
    probe_random: bool = option(False, help="probe: also probe an untrained model of the same architecture "
                                            "(a second control)")
    probe_limit: int | None = option(None, help="probe on at most this many sentences (default: all 200)")
    neuron: str | None = option(None, metavar="LAYER:INDEX",
                                help="also list the tokens of the polarity sentences that most activate this "
                                     "feed-forward neuron (e.g. 12:345)")
    figures: str | None = option(None, help="also write every figure as a PNG into this folder")

    def __post_init__(self) -> None:
        if self.ig_steps < 1:
            raise LmforgeError("--ig-steps must be at least 1")
        if self.top_k < 1:
            raise LmforgeError("--top-k must be at least 1")
        if self.max_tokens < 2:
            raise LmforgeError("--max-tokens must be at least 2")
        if self.ig_rule not in IG_RULES:
            raise LmforgeError(f"unknown --ig-rule {self.ig_rule!r}; choose one of {', '.join(IG_RULES)}")
        if self.baseline not in BASELINES:
            raise LmforgeError(f"unknown --baseline {self.baseline!r}; choose one of {', '.join(BASELINES)}")
        if self.probe not in PROBE_TASKS:
            raise LmforgeError(f"unknown --probe {self.probe!r}; choose one of {', '.join(PROBE_TASKS)}")
        if self.probe_limit is not None and self.probe_limit < 10:
            raise LmforgeError("--probe-limit must be at least 10 sentences")
        if self.neuron is not None:
            self.neuron_index()
        if self.layers is not None and any(layer < 0 for layer in self.layers):
            raise LmforgeError("--layers takes layer numbers from 0")

    def neuron_index(self) -> tuple[int, int] | None:
        """--neuron as (layer, index)."""
        if self.neuron is None:
            return None
        layer, _, index = self.neuron.partition(":")
        try:
            return int(layer), int(index)
        except ValueError:
            raise LmforgeError(f"--neuron takes LAYER:INDEX (two numbers), got {self.neuron!r}") from None
