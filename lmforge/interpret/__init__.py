"""Interpretability (X1, X2): what a Transformer computes on a prompt, read from its real modules.

- `capture`: forward hooks on lmforge's own blocks (residual streams, attention inputs).
- `attention`: attention probabilities per layer and head, recomputed from each layer's
  q/k (RoPE, grouped-query sharing, causal or sliding-window mask), since the model's
  fused attention never materializes them.
- `lens`: the logit lens, every layer's residual stream read through the final norm and head.
- `attribution`: gradient x input, integrated gradients (with the completeness check) and
  occlusion for one predicted token (or the difference of two logits).
- `probes`: logistic-regression probes on each layer's hidden states, with shuffled-label and
  untrained-model controls.
- `patching`: activation patching from a clean prompt into a corrupted one.
- `neurons`: max-activating examples of a feed-forward neuron.
- `explain`: all of the above for one prompt (what ``lmforge explain`` runs).
- `report`: the figures and the self-contained HTML report of ``lmforge explain``.

Nothing here is imported by ``import lmforge``; option dataclasses live in `options` (no torch).
"""
