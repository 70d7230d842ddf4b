"""The assistant's defense layers, switched by its ``guard`` configuration (lmforge/guard).

Input, in order (the first layer that blocks names the block in the metrics):

- ``rules``: injection patterns (lmforge/guard/rules.py), also inside encoded payloads;
- ``injection``: the trained injection classifier, at its calibrated threshold;
- ``moderation``: the trained moderation classifier, per category at its threshold.

Data (``spotlight``): tool results and retrieved text are data, never instructions; a
tool result field that reads as instructions (rules, injection classifier) is withheld
from the reply (`check_data`).

Output (model-written text and FAQ answers; order look-ups are written by code, from
checked data): system-prompt leakage, PII the customer did not give, and instructions
carried into the answer from a retrieved page (lmforge/guard/output.py, rules). Stored
text is redacted (lmforge/guard/redact.py) in the configured mode.
"""

from __future__ import annotations

from ..errors import LmforgeError
from .config import GuardSection
from .service import GuardVerdict


class AssistantGuard:
    def __init__(self, rules: bool = True, injection=None, moderation=None, output_checks: bool = True,
                 pii_mode: str = "irreversible", keep_original: bool = False, spotlight: bool = True) -> None:
        from ..guard.redact import Redactor

        self.rules, self.injection, self.moderation, self.spotlight = rules, injection, moderation, spotlight
        self.output_checks = output_checks
        self.redactor = Redactor(pii_mode) if pii_mode != "pseudonym" else None
        self.keep_original = keep_original

    @classmethod
    def from_config(cls, section: GuardSection, keep_original: bool = False) -> "AssistantGuard":
        from ..guard.classifier import TextClassifier

        def load(path: str | None, what: str):
            if not path:
                return None
            try:
                return TextClassifier.load(path)
            except LmforgeError as exc:
                raise LmforgeError(f"guard.{what}: {exc}") from None

        if section.pii_mode == "pseudonym":
            raise LmforgeError("guard.pii_mode pseudonym needs a secret key; the assistant supports irreversible "
                               "and reversible redaction")
        return cls(section.rules, load(section.injection_classifier, "injection_classifier"),
                   load(section.moderation_classifier, "moderation_classifier"), section.output_checks,
                   section.pii_mode, keep_original, section.spotlight)

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        if self.redactor is None:
            return text, {}
        done = self.redactor.redact(text)
        return done.text, done.counts

    def check_input(self, text: str) -> GuardVerdict:
        verdict = self._injection(text)
        if verdict.blocked or self.moderation is None:
            return verdict
        flags = self.moderation.flags(self.moderation.probabilities([text]))[0]
        if flags:
            category = max(flags, key=flags.get)
            return GuardVerdict(True, "moderation", f"{category} {flags[category]:.2f}", category)
        return GuardVerdict()

    def check_data(self, text: str) -> GuardVerdict:
        """Text from a tool or a document that reads as instructions (rules, injection classifier)."""
        if not self.spotlight:
            return GuardVerdict()
        return self._injection(text)

    def _injection(self, text: str) -> GuardVerdict:
        if self.rules:
            from ..guard.rules import scan

            found = scan(text)
            if found.flagged():
                return GuardVerdict(True, "rules", ", ".join(found.rules[:3]), "injection")
        if self.injection is not None:
            flags = self.injection.flags(self.injection.probabilities([text]))[0]
            if flags:
                category = max(flags, key=flags.get)
                return GuardVerdict(True, "injection", f"{category} {flags[category]:.2f}", category)
        return GuardVerdict()

    def check_output(self, reply: str, system_prompt: str, user_turns: list[str]) -> GuardVerdict:
        if not self.output_checks or not reply:
            return GuardVerdict()
        from ..guard.output import leakage, pii_in_reply

        if system_prompt and leakage(reply, system_prompt).leaked:
            return GuardVerdict(True, "output", "system prompt leakage", "leakage")
        if self.spotlight and self._injection(reply).blocked:  # instructions carried in from data
            return GuardVerdict(True, "output", "instructions from data in the reply", "injected_instruction")
        found = pii_in_reply(reply, user_turns)
        if found:
            return GuardVerdict(True, "output", "personal data in the reply: " + ", ".join(sorted({m.kind for m in found})),
                                "pii")
        return GuardVerdict()
