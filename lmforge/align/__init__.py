"""Alignment (F6-F9): preference data, reward models, DPO and its relatives, GRPO.

- `dpo`: response log-probabilities and the preference losses (DPO, IPO, robust, hinge, SimPO).
- `preference_data`: generated preference pairs with checkable answers, and safety pairs.
- `reward`: a scalar-head reward model on the one Transformer, Bradley-Terry loss.
- `grpo`: group-relative advantages, the clipped surrogate with a KL penalty, group sampling
  through the generation engine, one update step.
- `batching`: chat-template rendering and right-padded pair batches.
- `config`: the run and loss configurations (every field a flag; no torch import).
- `train`: the training runs behind ``lmforge align``.
"""
