"""`GuardPipeline`: the guard layers together, each switched on or off on its own (G1-G3).

    input text  -> [rules] -> [injection classifier] -> [moderation]      -> allowed / refused
    data texts  -> [rules] -> [injection classifier] -> spotlighting wrap  -> prompt
    tool call   -> [tool-call policy]                                      -> run / blocked
    reply       -> [leakage] -> [PII] -> [moderation]                       -> shown / replaced
    logs        -> [PII redaction]

No layer is enough alone: rules are precise on what they know and blind to paraphrase;
the classifier generalises but has a false-positive rate; spotlighting and the
instruction hierarchy make a model less likely to obey injected text but detect
nothing; the tool policy stops the damage an injection aims for even when the text got
through; the output checks catch what came out anyway. A message is refused when any
switched-on layer flags it, so the layers' false positives add up: each layer's
threshold is set for a small share (lmforge/guard/classifier.py).

`GuardConfig`'s fields are the switches and thresholds (and `lmforge guard check`'s
flags). `Verdict` lists every flag with its layer, score and detail, and carries the
refusal to show instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lmforge.options import option

INJECTION_REFUSAL = ("I can't follow instructions that try to change how I work or what I may share. "
                     "I'm glad to help with your orders, refunds, shipping or product questions.")
HARM_REFUSAL = "I can't help with that. If there's something else you need from our shop, I'm happy to help."
SELF_HARM_REFUSAL = ("I'm really sorry you're feeling this way. I can't help with that, but you don't have to go "
                     "through it alone: please reach out to someone you trust or a local crisis line (in the US, "
                     "call or text 988; elsewhere, findahelpline.com lists free services).")
OUTPUT_REFUSAL = "Sorry, I can't share that. Is there anything else I can help you with?"


def refusal_for(category: str | None) -> str:
    """The safe message shown instead of an answer, by what was flagged."""
    if category == "self_harm":
        return SELF_HARM_REFUSAL
    if category in (None, "injection"):
        return INJECTION_REFUSAL
    if category == "output":
        return OUTPUT_REFUSAL
    return HARM_REFUSAL


@dataclass
class GuardConfig:
    rules: bool = option(True, help="layer on: pattern rules for known injection phrasings (--no-rules: off)")
    rules_threshold: float = option(0.5, help="rule weight at which a text is flagged")
    classifier: bool = option(True, help="layer on: the trained injection classifier (--no-classifier: off)")
    moderation: bool = option(True, help="layer on: the trained moderation classifier (harmful requests and replies) (--no-moderation: off)")
    models: str = option("runs/guard", help="directory with injection/ and moderation/ classifiers "
                                            "(`lmforge guard train`)")
    spotlight: bool = option(True, help="layer on: wrap retrieved documents and tool results as marked data (--no-spotlight: off)")
    spotlight_mode: str = option("delimit", choices=("delimit", "datamark", "base64"), help="how data is marked")
    tool_policy: bool = option(True, help="layer on: block tool calls whose name or arguments come only from data (--no-tool-policy: off)")
    output_checks: bool = option(True, help="layer on: check replies for system-prompt leakage and PII (--no-output-checks: off)")
    leak_overlap: float = option(0.2, help="share of the system prompt's 5-grams in a reply that counts as a leak")
    leak_run: int = option(12, help="consecutive system-prompt words in a reply that count as a leak")
    redact_mode: str = option("irreversible", choices=("irreversible", "reversible", "pseudonym"),
                              help="PII redaction for logs and stored conversations")


@dataclass
class Flag:
    layer: str  # rules | classifier | moderation | tool_policy | leakage | pii | output_moderation
    score: float
    detail: str
    category: str = "injection"


@dataclass
class Verdict:
    allowed: bool
    flags: list[Flag] = field(default_factory=list)
    refusal: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "refusal": self.refusal,
                "flags": [{"layer": f.layer, "category": f.category, "score": round(f.score, 4), "detail": f.detail}
                          for f in self.flags]}


def _verdict(flags: list[Flag], output: bool = False) -> Verdict:
    if not flags:
        return Verdict(True)
    if output:
        return Verdict(False, flags, refusal_for("output"))
    harm = [f for f in flags if f.category not in ("injection",)]
    category = max(harm, key=lambda f: f.score).category if harm else "injection"
    return Verdict(False, flags, refusal_for(category))


class GuardPipeline:
    """The layers of `GuardConfig`; classifiers are read from ``config.models`` when their
    switch is on (or passed in, as `lmforge guard eval` does with freshly trained ones)."""

    def __init__(self, config: GuardConfig | None = None, injection=None, moderation=None) -> None:
        from lmforge.errors import LmforgeError
        from lmforge.guard.classifier import TextClassifier

        self.config = config or GuardConfig()
        c = self.config
        self.injection, self.moderation = injection, moderation
        if c.classifier and self.injection is None:
            self.injection = TextClassifier.load(Path(c.models) / "injection")
        if c.moderation and self.moderation is None:
            self.moderation = TextClassifier.load(Path(c.models) / "moderation")
        if not 0.0 < c.rules_threshold <= 1.0 or not 0.0 < c.leak_overlap <= 1.0 or c.leak_run < 1:
            raise LmforgeError("rules_threshold and leak_overlap must be in (0, 1], leak_run positive")

    # -- inputs -------------------------------------------------------------------------------
    def input_flags(self, texts: Sequence[str], channel: str = "user") -> list[list[Flag]]:
        """Flags per text from the input layers that are switched on (classifiers run batched).
        Data texts (``channel="data"``) are not moderated: a review may quote rude words."""
        from lmforge.guard.rules import scan

        c = self.config
        out: list[list[Flag]] = [[] for _ in texts]
        if c.rules:
            for flags, text in zip(out, texts):
                result = scan(text)
                if result.flagged(c.rules_threshold):
                    flags.append(Flag("rules", result.score, ", ".join(dict.fromkeys(result.rules))))
        if c.classifier and self.injection is not None and texts:
            probs = self.injection.probabilities(list(texts))
            for flags, row in zip(out, self.injection.flags(probs)):
                if "attack" in row:
                    flags.append(Flag("classifier", row["attack"], f"p(attack) {row['attack']:.3f} >= "
                                                                   f"{self.injection.thresholds['attack']:.3f}"))
        if c.moderation and self.moderation is not None and texts and channel == "user":
            for flags, row in zip(out, self.moderate(texts)):
                for category, score in row.items():
                    flags.append(Flag("moderation", score, f"p({category}) {score:.3f}", category))
        return out

    def moderate(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """Per text, the harm categories whose calibrated threshold it reaches."""
        if self.moderation is None or not texts:
            return [{} for _ in texts]
        return self.moderation.flags(self.moderation.probabilities(list(texts)))

    def check_input(self, text: str, channel: str = "user") -> Verdict:
        return _verdict(self.input_flags([text], channel)[0])

    # -- data ---------------------------------------------------------------------------------
    def prepare_data(self, items: Sequence[tuple[str, str]]) -> tuple[str, list[Verdict]]:
        """(source, text) data items -> the prompt text (flagged items left out, the rest
        spotlighted when switched on) and a verdict per item."""
        from lmforge.guard.spotlight import wrap

        verdicts = [_verdict(f) for f in self.input_flags([t for _, t in items], "data")]
        kept = []
        for (source, text), verdict in zip(items, verdicts):
            if not verdict.allowed:
                kept.append(f"[{source}: withheld, it contained instructions]")
            elif self.config.spotlight:
                kept.append(wrap(text, source, self.config.spotlight_mode).text)
            else:
                kept.append(text)
        return "\n\n".join(kept), verdicts

    def system_prompt(self, base: str) -> str:
        from lmforge.guard.spotlight import system_prompt

        return system_prompt(base, self.config.spotlight_mode) if self.config.spotlight else base

    # -- tools --------------------------------------------------------------------------------
    def check_tool_call(self, call, user_turns: Sequence[str], data_texts: Sequence[str], policy=None) -> Verdict:
        from lmforge.guard.tool_policy import ToolCall, check_tool_call

        if not self.config.tool_policy:
            return Verdict(True)
        call = call if isinstance(call, ToolCall) else ToolCall.parse(call)
        decision = check_tool_call(call, list(user_turns), list(data_texts), policy)
        flags = [Flag("tool_policy", 1.0, reason) for reason in decision.reasons]
        return Verdict(decision.allowed, flags, None if decision.allowed else
                       f"I didn't run {call.name}: the request for it came from a document or tool result, "
                       "not from you.")

    # -- outputs ------------------------------------------------------------------------------
    def check_output(self, reply: str, system_prompt: str = "", user_turns: Sequence[str] = ()) -> Verdict:
        from lmforge.guard.output import leakage, pii_in_reply

        c = self.config
        flags: list[Flag] = []
        if c.output_checks and system_prompt:
            leak = leakage(reply, system_prompt, leak_overlap=c.leak_overlap, leak_run=c.leak_run)
            if leak.leaked:
                flags.append(Flag("leakage", leak.overlap, f"{100 * leak.overlap:.0f}% of the system prompt's "
                                                           f"5-grams, {leak.longest_run} words in a row", "output"))
        if c.output_checks:
            found = pii_in_reply(reply, list(user_turns))
            if found:
                flags.append(Flag("pii", 1.0, ", ".join(sorted({m.kind for m in found})), "output"))
        if c.moderation and self.moderation is not None:
            for category, score in self.moderate([reply])[0].items():
                flags.append(Flag("output_moderation", score, f"p({category}) {score:.3f}", category))
        return _verdict(flags, output=True)

    # -- logs ---------------------------------------------------------------------------------
    def redactor(self, key: bytes | str | None = None):
        from lmforge.guard.redact import Redactor

        return Redactor(self.config.redact_mode, key=key)
