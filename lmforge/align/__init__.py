"""Alignment (F6-F9): preference data, reward models, DPO and its relatives.

- `dpo`: response log-probabilities and the preference losses (DPO, IPO, robust, hinge, SimPO).
- `preference_data`: generated preference pairs with checkable answers, and safety pairs.
- `reward`: a scalar-head reward model on the one Transformer, Bradley-Terry loss.
- `train`: the training runs behind ``lmforge align``.
"""
