"""Activation patching (causal tracing) between a clean and a corrupted prompt (X1).

Run the clean prompt ("The capital of France is") and keep its activations; run the
corrupted one ("The capital of Italy is"), but at one site (a layer and a position)
put back the clean activation, and see how much of the clean behaviour returns. The
behaviour is a logit difference at the last position,

    m = logit(clean answer) - logit(corrupted answer),

and the score of a patch is the share of the gap it restores:

    restored = (m_patched - m_corrupted) / (m_clean - m_corrupted)

1 means this one activation carries everything that distinguishes the prompts at that
point; 0 means it carries nothing. Sites: the residual stream entering each block
("resid"), and the outputs of each block's attention ("attn") and feed-forward ("mlp")
sublayers. One forward per layer and site patches every position at once, one row of
the batch per position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmforge.errors import LmforgeError

from .capture import check_language_model, hooked

SITES = ("resid", "attn", "mlp")


@dataclass
class PatchingResult:
    """restored[site] [n_layer, T]: the share of the logit difference each patch restores."""

    answer: int
    wrong: int
    clean_diff: float
    corrupted_diff: float
    restored: dict[str, torch.Tensor] = field(default_factory=dict)


def _module(block, site: str):
    return block if site == "resid" else getattr(block, site)


def _last_logit_diff(logits: torch.Tensor, answer: int, wrong: int) -> torch.Tensor:
    last = logits[:, -1].float()
    return last[:, answer] - last[:, wrong]


def activation_patching(model, clean_ids: torch.Tensor, corrupted_ids: torch.Tensor, answer: int, wrong: int,
                        sites: tuple[str, ...] = SITES, progress=None) -> PatchingResult:
    """Patch clean activations into the corrupted run at every (site, layer, position).

    `clean_ids` and `corrupted_ids` are [1, T] with the same T (positions must line up);
    `progress(done, total)` is called after each layer and site.
    """
    check_language_model(model)
    if clean_ids.shape != corrupted_ids.shape:
        raise LmforgeError(f"activation patching needs prompts of the same token length; the clean prompt has "
                           f"{clean_ids.shape[-1]} tokens and the corrupted one {corrupted_ids.shape[-1]} "
                           "(swap words that are one token each)")
    unknown = set(sites) - set(SITES)
    if unknown:
        raise ValueError(f"unknown patching sites {sorted(unknown)} (choose from {', '.join(SITES)})")
    if answer == wrong:
        raise LmforgeError("the two answers are the same token, so their logit difference is always 0; "
                           "give the competing answer explicitly")
    layers = list(model.layers)
    clean: dict[tuple[str, int], torch.Tensor] = {}

    def keep_input(site, index):
        def hook(module, args):
            clean[site, index] = args[0].detach()
        return hook

    def keep_output(site, index):
        def hook(module, args, out):
            clean[site, index] = out.detach()
        return hook

    registrations = []
    for i, block in enumerate(layers):
        for site in sites:
            if site == "resid":
                registrations.append(lambda b=block, i=i: b.register_forward_pre_hook(keep_input("resid", i)))
            else:
                registrations.append(lambda m=_module(block, site), s=site, i=i: m.register_forward_hook(keep_output(s, i)))
    with torch.no_grad():
        with hooked(registrations):
            clean_logits = model(clean_ids)
        corrupted_logits = model(corrupted_ids)
    clean_diff = float(_last_logit_diff(clean_logits, answer, wrong)[0])
    corrupted_diff = float(_last_logit_diff(corrupted_logits, answer, wrong)[0])
    gap = clean_diff - corrupted_diff
    if abs(gap) < 1e-6:
        raise LmforgeError("both prompts give the same logit difference between the answers, so there is "
                           "nothing for patching to restore; choose prompts the model answers differently")

    length = clean_ids.shape[1]
    rows = torch.arange(length)
    batch = corrupted_ids.expand(length, -1)

    def patched(value):
        out = value.clone()
        out[rows, rows] = clean_value[0, rows].to(out.dtype)  # row p takes the clean activation at position p
        return out

    restored = {site: torch.zeros(len(layers), length) for site in sites}
    total, done = len(layers) * len(sites), 0
    for site in sites:
        for i, block in enumerate(layers):
            clean_value = clean[site, i]
            if site == "resid":
                register = lambda b=block: b.register_forward_pre_hook(lambda m, args: (patched(args[0]),) + args[1:])
            else:
                register = lambda m=_module(block, site): m.register_forward_hook(lambda mod, args, out: patched(out))
            with hooked([register]), torch.no_grad():
                diffs = _last_logit_diff(model(batch, last_only=True), answer, wrong)
            restored[site][i] = (diffs - corrupted_diff) / gap
            done += 1
            if progress is not None:
                progress(done, total)
    return PatchingResult(answer, wrong, clean_diff, corrupted_diff, restored)
