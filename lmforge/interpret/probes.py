"""Linear probes on hidden states (X1): what each layer encodes, read by a logistic regression.

A probe is a deliberately weak classifier (here multinomial logistic regression with an
L2 penalty) trained on frozen hidden states of one layer. If it predicts a property (a
sentence's sentiment) well above chance, that property is linearly readable at that
layer. High accuracy alone proves little: with as many features as examples a linear
model can fit almost anything, so every probe is paired with a control, the same probe
trained on shuffled labels (no real signal; it measures how much the probe memorizes).
The selectivity, accuracy minus control, is the figure to read. A second control runs the
same probe, real labels, on an untrained model of the same architecture (`random_model_like`):
what it reaches comes from the token identities and the architecture alone, not from training.

Accuracy is k-fold cross-validated; features are standardized with the training folds'
statistics. Hidden states come from `Transformer.encode` on padded batches (a causal
model's states, padding masked), collected per layer with forward hooks and mean-pooled
over each sentence's real tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .capture import hooked


@dataclass
class ProbeResult:
    """Cross-validated accuracy per layer (0 = embeddings) of the real probe and of the control."""

    accuracy: torch.Tensor  # [n_layer + 1]
    control: torch.Tensor  # [n_layer + 1], shuffled labels
    majority: float  # accuracy of always answering the most frequent class
    examples: int
    folds: int
    random_model: torch.Tensor | None = None  # [n_layer + 1]: the real labels on an untrained model of the same shape

    @property
    def best_layer(self) -> int:
        return int((self.accuracy - self.control).argmax())


def polarity_sentences(limit: int | None = None, seed: int = 0) -> tuple[list[str], list[int]]:
    """gensim's Pang & Lee polarity sentences (installed offline with gensim): texts and labels
    (1 = positive, 0 = negative), shuffled; `limit` keeps a class-balanced subset."""
    from lmforge.data.corpora import gensim_data_file

    path = gensim_data_file("gensim/test/test_data/pang_lee_polarity.cor")
    by_label: dict[int, list[str]] = {0: [], 1: []}
    seen = set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        tag, _, text = line.strip().partition(" ")
        text = text.strip()
        if tag in ("__label__pos", "__label__neg") and text and text not in seen:
            seen.add(text)
            by_label[int(tag == "__label__pos")].append(text)
    rng = random.Random(seed)
    pairs: list[tuple[str, int]] = []
    for label, texts in by_label.items():
        rng.shuffle(texts)
        keep = len(texts) if limit is None else min(len(texts), limit // 2)
        pairs += [(t, label) for t in texts[:keep]]
    rng.shuffle(pairs)
    return [t for t, _ in pairs], [label for _, label in pairs]


def layer_features(model, tokenizer, texts: list[str], batch_size: int = 16, max_tokens: int = 128,
                   progress=None) -> torch.Tensor:
    """Mean-pooled hidden states of every layer: [n_layer + 1, N, D] (0 = embeddings, then each
    block's output; for pre-norm models the last is before the final norm)."""
    encoded = [tokenizer.encode(t, add_special_tokens=False)[:max_tokens] or [0] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    n_layers = len(model.layers) + 1
    features = torch.zeros(n_layers, len(texts), model.config.n_embd)
    states: list[torch.Tensor | None] = [None] * n_layers

    def first_input(module, args):
        states[0] = args[0]

    def output_of(index):
        def hook(module, args, out):
            states[index + 1] = out
        return hook

    registrations = [lambda: model.layers[0].register_forward_pre_hook(first_input)]
    registrations += [lambda i=i, b=b: b.register_forward_hook(output_of(i)) for i, b in enumerate(model.layers)]
    device = next(model.parameters()).device
    with hooked(registrations), torch.no_grad():
        for first in range(0, len(order), batch_size):
            rows = order[first:first + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, :len(encoded[i])] = 1
            model.encode(ids.to(device), attention_mask=mask.to(device))
            weights = (mask / mask.sum(1, keepdim=True)).unsqueeze(-1)  # mean over real tokens
            for layer, state in enumerate(states):
                features[layer, rows] = (state.float().cpu() * weights).sum(1)
            if progress is not None:
                progress(min(first + batch_size, len(order)), len(order))
    return features


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-2,
                 iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: weights [D, C] and bias [C] minimizing the mean
    cross-entropy + l2 * |W|^2, by Newton's method.

    The last class's logit is pinned at 0 (the reference-class parameterization), which
    leaves (C - 1)(D + 1) free parameters; the loss is convex and, with the L2 term,
    strictly so in the weights, so a few Newton steps (each one linear solve) reach the
    minimum far faster than first-order methods at these sizes.

    With more features than examples (hidden sizes in the hundreds, a few hundred
    sentences) the loss sees the weights only through x W, so the penalty makes the
    optimal W lie in the row space of x: the fit runs on the N coordinates of that space
    (from an SVD) and maps back, the same solution at a fraction of the cost.
    """
    n, d = x.shape
    if d > n:
        basis = torch.linalg.svd(x, full_matrices=False).Vh.T  # [D, N], orthonormal columns
        weight, bias = fit_logistic(x @ basis, y, classes, l2, iterations)
        return basis @ weight, bias
    free = classes - 1
    features = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)  # the bias as a constant feature
    onehot = F.one_hot(y, classes).to(x.dtype)[:, :free]
    theta = torch.zeros(d + 1, free, dtype=x.dtype)
    penalty = torch.full((d + 1,), 2 * l2, dtype=x.dtype)
    penalty[-1] = 0.0  # the bias is not penalized
    for _ in range(iterations):
        logits = torch.cat([features @ theta, torch.zeros(n, 1, dtype=x.dtype)], 1)
        p = logits.softmax(-1)[:, :free]
        grad = features.T @ (p - onehot) / n + penalty[:, None] * theta  # [d + 1, free]
        blocks = [[None] * free for _ in range(free)]
        for a in range(free):
            for b in range(free):
                w = p[:, a] * (float(a == b) - p[:, b])
                blocks[a][b] = (features.T * w) @ features / n
            blocks[a][a] = blocks[a][a] + torch.diag(penalty)
        hessian = torch.cat([torch.cat(row, 1) for row in blocks], 0)
        hessian += 1e-9 * torch.eye(hessian.shape[0], dtype=x.dtype)  # the unpenalized bias on separable data
        step = torch.linalg.solve(hessian, grad.T.reshape(-1)).reshape(free, d + 1).T
        theta = theta - step
        if float(step.abs().max()) < 1e-8:
            break
    weight = torch.cat([theta[:-1], torch.zeros(d, 1, dtype=x.dtype)], 1)
    bias = torch.cat([theta[-1], torch.zeros(1, dtype=x.dtype)])
    return weight, bias


def cross_validated_accuracy(x: torch.Tensor, y: torch.Tensor, folds: int = 5, l2: float = 1e-2,
                             seed: int = 0) -> float:
    """Mean held-out accuracy over `folds` stratified folds (features standardized on each training side)."""
    classes = int(y.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    fold_of = torch.empty(len(y), dtype=torch.long)
    for c in range(classes):  # stratified: each class dealt round-robin over the folds, in random order
        members = (y == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        fold_of[members] = torch.arange(len(members)) % folds
    correct = 0
    for k in range(folds):
        test, train = fold_of == k, fold_of != k
        mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
        weight, bias = fit_logistic((x[train] - mean) / std, y[train], classes, l2)
        predicted = (((x[test] - mean) / std) @ weight + bias).argmax(-1)
        correct += int((predicted == y[test]).sum())
    return correct / len(y)


def probe_layers(features: torch.Tensor, labels: list[int] | torch.Tensor, folds: int = 5, l2: float = 1e-2,
                 seed: int = 0, progress=None) -> ProbeResult:
    """A probe and a shuffled-label control for every layer of `features` [L, N, D]."""
    y = torch.as_tensor(labels, dtype=torch.long)
    if len(y) < 2 * folds:
        raise ValueError(f"{len(y)} examples are too few for {folds}-fold cross-validation")
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 1))]
    x = features.double()
    accuracy, control = [], []
    for layer in range(x.shape[0]):
        accuracy.append(cross_validated_accuracy(x[layer], y, folds, l2, seed))
        control.append(cross_validated_accuracy(x[layer], shuffled, folds, l2, seed))
        if progress is not None:
            progress(layer + 1, x.shape[0])
    majority = float(torch.bincount(y).max()) / len(y)
    return ProbeResult(torch.tensor(accuracy), torch.tensor(control), majority, len(y), folds)


def random_model_like(model, seed: int = 0):
    """An untrained Transformer with `model`'s configuration (lmforge's own initialization), same dtype and device."""
    from lmforge.model.transformer import Transformer

    parameter = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = Transformer(model.config)
    return fresh.to(device=parameter.device, dtype=parameter.dtype).eval()
