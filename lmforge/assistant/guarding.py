"""The assistant's defense layers: lmforge/guard's `GuardPipeline`, switched by the ``guard`` section.

Input (the first flag names the layer in the metrics; the refusal fits the category, e.g.
a crisis line for self-harm): injection rules, the trained injection classifier, the
trained moderation classifier.

Data (``spotlight``): tool results and retrieved text are data, never instructions; a
tool-result field that reads as instructions is withheld from the reply (`check_data`).

Output (model-written text and FAQ answers; order look-ups are written by code, from
checked data): system-prompt leakage, PII the customer did not give, moderation of the
reply, and instructions carried into an answer from a retrieved page. Stored text is
redacted in the configured mode.

The classifiers are read from ``guard.models`` (``lmforge guard train`` writes them) when
``guard.classifier`` / ``guard.moderation`` switch them on.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LmforgeError
from .config import GuardSection
from .service import GuardVerdict


def _verdict(verdict, data_layer: str | None = None) -> GuardVerdict:
    """lmforge/guard's `Verdict` -> the assistant's `GuardVerdict`."""
    if verdict.allowed:
        return GuardVerdict()
    first = verdict.flags[0]
    worst = max(verdict.flags, key=lambda f: f.score)
    return GuardVerdict(True, data_layer or first.layer, "; ".join(f"{f.layer}: {f.detail}" for f in verdict.flags),
                        worst.category, verdict.refusal)


class AssistantGuard:
    def __init__(self, pipeline=None, keep_original: bool = False, classify_data: bool = False) -> None:
        from ..guard.pipeline import GuardConfig, GuardPipeline

        self.pipeline = pipeline or GuardPipeline(GuardConfig(classifier=False, moderation=False))
        self.classify_data = classify_data
        self.redactor = self.pipeline.redactor() if self.pipeline.config.redact_mode != "pseudonym" else None
        self.keep_original = keep_original

    @classmethod
    def from_config(cls, section: GuardSection, keep_original: bool = False) -> "AssistantGuard":
        from ..guard.pipeline import GuardPipeline

        for switched, name, flag in ((section.classifier, "injection", "classifier"),
                                     (section.moderation, "moderation", "moderation")):
            if switched and not (Path(section.models) / name / "classifier.json").is_file():
                raise LmforgeError(f"guard: no {name} classifier in {section.models}; train them with `lmforge "
                                   f"assistant train-guard` or switch the layer off (--guard.{flag} false)")
        if section.redact_mode == "pseudonym":
            raise LmforgeError("guard.redact_mode pseudonym needs a secret key; the assistant supports irreversible "
                               "and reversible redaction")
        return cls(GuardPipeline(section), keep_original, section.classify_data)

    @property
    def spotlight(self) -> bool:
        return self.pipeline.config.spotlight

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        if self.redactor is None:
            return text, {}
        done = self.redactor.redact(text)
        return done.text, done.counts

    def check_input(self, text: str) -> GuardVerdict:
        return _verdict(self.pipeline.check_input(text, "user"))

    def check_data(self, text: str) -> GuardVerdict:
        """Text from a tool or a document that reads as instructions: the rules, and the injection
        classifier only with ``classify_data`` (on the store's own help pages it flagged 3 of 40
        paragraphs: a page's "you can unsubscribe with the link..." reads like an instruction)."""
        if not self.spotlight:
            return GuardVerdict()
        flags = [f for f in self.pipeline.input_flags([text], "data")[0]
                 if self.classify_data or f.layer == "rules"]
        if not flags:
            return GuardVerdict()
        return GuardVerdict(True, flags[0].layer, "; ".join(f"{f.layer}: {f.detail}" for f in flags), "injection")

    def check_output(self, reply: str, system_prompt: str, user_turns: list[str]) -> GuardVerdict:
        if not reply:
            return GuardVerdict()
        verdict = _verdict(self.pipeline.check_output(reply, system_prompt, user_turns))
        if verdict.blocked:
            verdict.layer = "output"
            return verdict
        if self.spotlight and self.check_data(reply).blocked:  # instructions carried in from a page
            return GuardVerdict(True, "output", "instructions from data in the reply", "injected_instruction")
        return GuardVerdict()
