"""Guardrails (G1-G3): prompt-injection defense in layers, moderation and PII redaction.

- rules.py: patterns for known injection phrasings (and their encoded forms);
- attack_data.py / harm_data.py: generated web-shop injection and moderation sets, split by template;
- classifier.py: frozen features + a trained linear head + thresholds calibrated for a false-positive rate;
- spotlight.py: untrusted data wrapped and marked, the instruction hierarchy for the system prompt;
- tool_policy.py: tool calls steered by data are blocked;
- output.py: system-prompt leakage, PII in replies;
- redact.py: reversible, irreversible and pseudonymous PII redaction (lmforge/data/pii.py finds it);
- pipeline.py: `GuardPipeline`, the layers together with a switch each;
- train.py / evaluate.py: `lmforge guard train` and `lmforge guard eval`.

Nothing heavy is imported here.
"""
