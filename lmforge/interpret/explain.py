"""One prompt explained: attention maps, logit lens, attributions, and (given a second prompt)
activation patching and (if asked) per-layer probes. `lmforge explain` is this plus a report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.io.progress import Progress

from .attention import attention_patterns
from .attribution import (Attribution, baseline_embeddings, gradient_x_input, integrated_gradients, occlusion)
from .capture import check_language_model
from .lens import LogitLens, logit_lens
from .neurons import Activation, check_neuron, max_activating
from .options import ExplainOptions
from .patching import PatchingResult, activation_patching
from .probes import (ProbeResult, cross_validated_accuracy, layer_features, polarity_sentences, probe_layers,
                     random_model_like)


@dataclass
class Explanation:
    """Everything ``lmforge explain`` computed for one prompt (tensors on the CPU)."""

    model_name: str
    prompt: str
    ids: list[int]
    tokens: list[str]
    target: int
    target_text: str
    target_note: str
    attention: dict[int, torch.Tensor]  # layer -> probabilities [n_head, T, T]
    lens: LogitLens
    attributions: list[Attribution]
    compare: str | None = None
    compare_tokens: list[str] | None = None
    patching: PatchingResult | None = None
    wrong_text: str | None = None
    probe: ProbeResult | None = None
    neuron: tuple[int, int] | None = None
    activations: list[Activation] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)  # token id -> its label, for every id shown

    def label(self, token_id: int) -> str:
        return self.labels.get(int(token_id), f"#{int(token_id)}")


def token_label(tokenizer, token_id: int) -> str:
    """A token as it reads in a figure: its decoded text with a leading space shown as '␣'."""
    text = tokenizer.decode([int(token_id)])
    if text.startswith(" "):
        text = "␣" + text[1:]
    return text.replace("\n", "\\n") or f"#{int(token_id)}"


def resolve_token(tokenizer, text: str, vocab: int | None = None) -> tuple[int, str]:
    """The token id a --target text names, and a note when the text is more than one token.

    "Paris" and " Paris" are different tokens in most vocabularies; a word that follows
    a space in the running text takes the spaced form, so a text that is one token only
    with a leading space is taken that way (and said so).
    """
    token, note = _resolve_token(tokenizer, text)
    if vocab is not None and token >= vocab:
        raise LmforgeError(f"{text!r} is token {token}, outside the model's vocabulary of {vocab}")
    return token, note


def _resolve_token(tokenizer, text: str) -> tuple[int, str]:
    if not text:
        raise LmforgeError("the target token is empty")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) == 1:
        return ids[0], ""
    if not text.startswith(" "):
        spaced = tokenizer.encode(" " + text, add_special_tokens=False)
        if len(spaced) == 1:
            return spaced[0], f"{text!r} is {len(ids)} tokens; using the single token {' ' + text!r}"
    if not ids:
        raise LmforgeError(f"the target {text!r} encodes to no tokens")
    return ids[0], f"{text!r} is {len(ids)} tokens; explaining its first, {tokenizer.decode(ids[:1])!r}"


def encode_prompt(tokenizer, text: str, max_tokens: int, what: str = "prompt", vocab: int | None = None) -> list[int]:
    if not text.strip():
        raise LmforgeError(f"the {what} is empty")
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise LmforgeError(f"the {what} is a single token; attention and patching need at least two")
    if len(ids) > max_tokens:
        raise LmforgeError(f"the {what} is {len(ids)} tokens, more than --max-tokens {max_tokens} "
                           "(attention maps grow with its square); shorten it or raise the limit")
    if vocab is not None and max(ids) >= vocab:
        raise LmforgeError(f"the {what} has token {max(ids)}, outside the model's vocabulary of {vocab}: "
                           "the tokenizer does not belong to this model")
    return ids


def explain(model, tokenizer, prompt: str, options: ExplainOptions | None = None, model_name: str = "model",
            show_progress: bool = True) -> Explanation:
    """Run every analysis `options` asks for on `prompt` (and `options.compare`)."""
    options = options or ExplainOptions()
    check_language_model(model)
    n_layer = len(model.layers)
    layers = options.layers
    if layers is not None:
        bad = [layer for layer in layers if layer >= n_layer]
        if bad:
            raise LmforgeError(f"--layers {bad[0]} is past the model's last layer ({n_layer - 1})")
    if options.neuron is not None:
        check_neuron(model, *options.neuron_index())  # before the long work, not after it
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    # Everything a user can get wrong is checked before the long work starts.
    ids = encode_prompt(tokenizer, prompt, options.max_tokens, vocab=vocab)
    batch = torch.tensor([ids], device=device)
    corrupted = None
    if options.compare is not None:
        corrupted = encode_prompt(tokenizer, options.compare, options.max_tokens, "--compare prompt", vocab)
        if len(corrupted) != len(ids):
            raise LmforgeError(f"activation patching needs prompts of the same token length; the prompt has "
                               f"{len(ids)} tokens and the --compare prompt {len(corrupted)} "
                               "(swap words that are one token each)")
    target, note = (None, "") if options.target is None else resolve_token(tokenizer, options.target, vocab)
    contrast = None if options.contrast is None else resolve_token(tokenizer, options.contrast, vocab)[0]
    wrong = None if options.compare_target is None else resolve_token(tokenizer, options.compare_target, vocab)[0]
    seconds: dict[str, float] = {}

    def timed(name, started):
        seconds[name] = round(time.perf_counter() - started, 3)

    started = time.perf_counter()
    patterns = attention_patterns(model, batch, layers)
    attention = {layer: p.probs[0].cpu() for layer, p in patterns.items()}
    del patterns
    timed("attention", started)

    started = time.perf_counter()
    lens = logit_lens(model, batch, target, options.top_k)
    target = lens.target
    timed("logit_lens", started)

    started = time.perf_counter()
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    if options.baseline == "pad" and pad_id is None:
        raise LmforgeError("this tokenizer has no pad or end-of-text token for --baseline pad; use --baseline zero")
    base = baseline_embeddings(model, batch, options.baseline, pad_id, options.keep_first)
    progress = Progress("integrated gradients", unit="points", enabled=show_progress, log_every=5.0)
    if contrast is not None:
        if contrast == target:
            raise LmforgeError("--contrast names the target token itself; the difference would always be 0")
    attributions = [gradient_x_input(model, batch, target, contrast),
                    integrated_gradients(model, batch, target, options.ig_steps, options.ig_rule, base,
                                         progress=progress, contrast=contrast),
                    occlusion(model, batch, target, base, contrast)]
    progress.close()
    timed("attributions", started)

    result = Explanation(model_name, prompt, ids, [token_label(tokenizer, i) for i in ids], target,
                         tokenizer.decode([target]), note, attention, lens, attributions, seconds=seconds,
                         config={"n_layer": n_layer, "n_head": model.config.n_head,
                                 "n_kv_head": model.config.n_kv_head, "ig_steps": options.ig_steps,
                                 "ig_rule": options.ig_rule, "baseline": options.baseline,
                                 "keep_first": options.keep_first,
                                 "pad_id": pad_id if options.baseline == "pad" else None})
    if options.compare is not None:
        started = time.perf_counter()
        corrupted_batch = torch.tensor([corrupted], device=device)
        if wrong is None:
            with torch.no_grad():
                wrong = int(model(corrupted_batch, last_only=True)[0, 0].argmax())
        if wrong == target:
            raise LmforgeError(f"both prompts predict {tokenizer.decode([target])!r}, so there is no logit difference "
                               "to restore; name the competing answer with --compare-target")
        progress = Progress("activation patching", unit="layer-sites", enabled=show_progress, log_every=5.0)
        result.patching = activation_patching(model, batch, corrupted_batch, target, wrong, progress=progress)
        progress.close()
        result.compare = options.compare
        result.compare_tokens = [token_label(tokenizer, i) for i in corrupted]
        result.wrong_text = tokenizer.decode([wrong])
        timed("patching", started)
    if options.probe == "sentiment":
        started = time.perf_counter()
        texts, labels = polarity_sentences(options.probe_limit)
        progress = Progress("probe features", total=len(texts), unit="sentences", enabled=show_progress,
                            log_every=5.0)
        features = layer_features(model, tokenizer, texts, progress=progress)
        progress.close()
        progress = Progress("probes", total=features.shape[0], unit="layers", enabled=show_progress, log_every=5.0)
        result.probe = probe_layers(features, labels, progress=progress)
        progress.close()
        if options.probe_random:
            untrained = random_model_like(model)
            progress = Progress("untrained-model features", total=len(texts), unit="sentences",
                                enabled=show_progress, log_every=5.0)
            features = layer_features(untrained, tokenizer, texts, progress=progress)
            progress.close()
            del untrained
            y = torch.as_tensor(labels)
            result.probe.random_model = torch.tensor([cross_validated_accuracy(f.double(), y) for f in features])
        timed("probe", started)
    if options.neuron is not None:
        started = time.perf_counter()
        result.neuron = options.neuron_index()
        texts, _ = polarity_sentences()
        result.activations = max_activating(model, tokenizer, texts, *result.neuron)
        timed("neuron", started)
    shown = set(lens.top_ids.flatten().tolist()) | set(lens.final_ids.tolist()) | {target}
    if contrast is not None:
        shown.add(contrast)
    if result.patching is not None:
        shown.add(result.patching.wrong)
    result.labels = {i: token_label(tokenizer, i) for i in sorted(shown)}
    return result
