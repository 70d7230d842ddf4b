"""Masked-language-model pretraining (P1): BERT's objective as a task of the one training loop.

A causal LM predicts each token from the ones before it. A masked LM (Devlin et al., 2019)
sees the whole text at once, so it cannot be asked for "the next" token; instead some tokens
are hidden and the encoder must restore them from both sides:

1. choose ``mask_probability`` (15%) of the ordinary tokens of a row (special tokens such as
   [CLS], [SEP], [PAD] are never chosen); with ``whole_word``, choose 15% of the *words* and
   take all of their pieces (guessing ``##ing`` when ``jump`` is visible is too easy);
2. of the chosen tokens, replace 80% by [MASK], 10% by a random ordinary token and leave 10%
   as they are: the model never sees [MASK] after pretraining, so it must also keep a useful
   representation of tokens that are not masked and check tokens that look fine;
3. the loss is the cross-entropy at the chosen positions only (labels -100 elsewhere)::

       L = -(1/|M|) sum_{i in M} log p(x_i | x with M corrupted)

The choice is exact, as in BERT's data preparation: round(p x candidates) tokens (or words)
per row, at least one, drawn without replacement.

How it plugs into lmforge/train/loop.py: `MaskedLMTask` is `PretrainTask` (the same packed
rows, stream and validation rows) with its own ``batch`` (rows -> corrupted inputs + labels,
the corruption a pure function of the stream position and the seed, so ``--resume`` is exact)
and its own ``loss`` (summed cross-entropy over the masked positions plus the number
predicted right; the loop averages both over the step's masked tokens, hence "masked
accuracy"). The vocabulary projection runs only at masked positions (15% of the tokens).
Each row's first token is replaced by [CLS] so that the encoder learns the position a
sequence classifier later pools. Validation masks the fixed validation rows once, with a
fixed seed, so the numbers are comparable between evaluations and runs.

A recipe selects it with ``objective: {name: mlm}`` and ``model: {family: bert}``; the data
needs a tokenizer with [MASK] (``data.tokenizer_algorithm: wordpiece`` trains one). At the
end of the run the model is also written as ``OUT/model`` in ``BertForMaskedLM`` layout
(lmforge/model/masked_lm.py), which lmforge's task heads and transformers both load.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.train.loop import PretrainTask
from lmforge.train.loss import IGNORE_INDEX

HEAD_FILE = "mlm_head.safetensors"  # the head's weights in a training checkpoint (BertModel has no names for them)
_VALIDATION_SALT = 7919  # validation masks come from their own seed, never from the training stream's


def word_start_table(tokenizer) -> np.ndarray:
    """Bool per token id: True where the token begins a word. WordPiece marks continuations
    with ``##``; byte-level BPE marks a word's first piece with a leading space (``Ġ``)."""
    starts = np.ones(tokenizer.vocab_size, dtype=bool)
    vocab = tokenizer.get_vocab()
    byte_level = any(token.startswith("Ġ") for token in vocab)
    for token, i in vocab.items():
        if i >= len(starts):
            continue
        if token.startswith("##"):
            starts[i] = False
        elif byte_level and token[:1].isalnum():
            starts[i] = False  # no leading space: it continues the previous piece
    return starts


class Masker:
    """BERT's corruption of token rows (see the module docstring)."""

    def __init__(self, mask_id: int, vocab_size: int, special_ids: Sequence[int], probability: float = 0.15,
                 mask_fraction: float = 0.8, random_fraction: float = 0.1,
                 word_starts: np.ndarray | None = None) -> None:
        if not 0 < probability < 1 or mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1:
            raise LmforgeError("masking: probability in (0, 1), mask and random fractions >= 0 summing to at most 1")
        self.mask_id, self.probability = mask_id, probability
        self.mask_fraction, self.random_fraction = mask_fraction, random_fraction
        self.special = np.zeros(vocab_size, dtype=bool)
        self.special[[i for i in special_ids if 0 <= i < vocab_size]] = True
        self.ordinary = np.flatnonzero(~self.special)  # what a random replacement may be
        self.word_starts = word_starts

    def chosen(self, row: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Bool [L]: the positions whose tokens become targets."""
        candidate = ~self.special[row]
        out = np.zeros(len(row), dtype=bool)
        if not candidate.any():
            return out
        if self.word_starts is None:
            where = np.flatnonzero(candidate)
            k = min(len(where), max(1, int(round(self.probability * len(where)))))
            out[rng.choice(where, size=k, replace=False)] = True
            return out
        # Whole words: a word starts at a word-start token or right after a non-candidate.
        previous = np.concatenate([[False], candidate[:-1]])
        start = candidate & (self.word_starts[row] | ~previous)
        word = np.cumsum(start) - 1  # word index of every position (valid where candidate)
        n_words = int(start.sum())
        k = min(n_words, max(1, int(round(self.probability * n_words))))
        picked = np.zeros(n_words, dtype=bool)
        picked[rng.choice(n_words, size=k, replace=False)] = True
        return candidate & picked[np.maximum(word, 0)]

    def __call__(self, rows: np.ndarray, rngs: Sequence[np.random.Generator]) -> tuple[np.ndarray, np.ndarray]:
        """(corrupted inputs, labels) of int64 rows [B, L]; labels are -100 where nothing is predicted."""
        inputs = rows.copy()
        labels = np.full_like(rows, IGNORE_INDEX)
        for r, rng in enumerate(rngs):
            where = np.flatnonzero(self.chosen(rows[r], rng))
            labels[r, where] = rows[r, where]
            u = rng.random(len(where))
            masked = where[u < self.mask_fraction]
            randomized = where[(u >= self.mask_fraction) & (u < self.mask_fraction + self.random_fraction)]
            inputs[r, masked] = self.mask_id
            inputs[r, randomized] = rng.choice(self.ordinary, size=len(randomized))
        return inputs, labels


def accuracy_by_corruption(model, input_ids: torch.Tensor, labels: torch.Tensor, mask_id: int) -> dict[str, Any]:
    """Argmax accuracy at the targets, split by what the input showed there: [MASK], the token
    itself (kept) or another token (random). Accuracy at [MASK] near the share of the most
    frequent token means the model guesses frequencies, not words from their context."""
    with torch.no_grad():
        chosen = labels != IGNORE_INDEX
        right = model.predict(model.encode(input_ids)[chosen]).argmax(-1) == labels[chosen]
    shown, target = input_ids[chosen], labels[chosen]
    kinds = {"mask": shown == mask_id, "kept": shown == target}
    kinds["random"] = ~kinds["mask"] & ~kinds["kept"]
    out: dict[str, Any] = {"targets": int(chosen.sum()), "accuracy": float(right.float().mean())}
    for kind, where in kinds.items():
        out[f"{kind}_share"] = float(where.float().mean())
        out[f"{kind}_accuracy"] = float(right[where].float().mean()) if where.any() else float("nan")
    return out


def masked_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over the labelled positions, how many of them the argmax gets right)."""
    hidden = model.encode(input_ids, attention_mask)
    chosen = labels != IGNORE_INDEX
    logits = model.predict(hidden[chosen])
    targets = labels[chosen]
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    right = (logits.detach().argmax(-1) == targets).sum().float()
    return loss, right


class MaskedLMTask(PretrainTask):
    """`PretrainTask` with BERT's objective (see the module docstring)."""

    title = "Masked-LM pretraining run"
    token_mean = True

    def setup(self, trainer) -> None:
        if self.config.train.sample_tokens:
            trainer.log("an encoder writes no text: no sample generations (train.sample_tokens 0)")
            self.config.train.sample_tokens = 0
        super().setup(trainer)
        tok, objective = self.tokenizer, self.config.objective
        self.mask_id = tok.token_to_id("[MASK]")
        if self.mask_id is None:
            raise LmforgeError("masked-LM pretraining needs a tokenizer with a [MASK] token: set "
                               "data.tokenizer_algorithm: wordpiece (and a new data.path) or name one in data.tokenizer")
        self.cls_id = tok.token_to_id("[CLS]")
        self.masker = Masker(self.mask_id, tok.vocab_size, sorted(tok.special_ids), objective.mask_probability,
                             objective.mask_fraction, objective.random_fraction,
                             word_start_table(tok) if objective.whole_word else None)
        self.seed = self.config.train.seed
        rows = self._with_cls(self.val_rows.numpy())
        rngs = [np.random.default_rng([self.seed, _VALIDATION_SALT, i]) for i in range(len(rows))]
        inputs, labels = self.masker(rows, rngs) if len(rows) else (rows, rows)
        self.val_inputs, self.val_labels = torch.from_numpy(inputs), torch.from_numpy(labels)

    def _with_cls(self, rows: np.ndarray) -> np.ndarray:
        rows = rows.astype(np.int64, copy=True)
        if self.cls_id is not None and rows.size:
            rows[:, 0] = self.cls_id
        return rows

    def build_model(self, trainer):
        from lmforge.model.masked_lm import MaskedLM, bert_config, load_masked_lm

        m = self.config.model
        vocab = self.tokenizer.vocab_size
        if m.init_from:
            model = load_masked_lm(m.init_from)
            if model.config.vocab_size < vocab:
                raise LmforgeError(f"model.init_from has {model.config.vocab_size} token ids, the data's tokenizer {vocab}")
            return model.float().train()
        if m.family != "bert":
            raise LmforgeError(f"objective mlm trains an encoder: set model.family: bert (got {m.family!r})")
        config = bert_config(m.vocab_size or vocab, m.n_layer, m.n_embd, m.n_head, m.intermediate_size,
                             m.max_position_embeddings or self.seq_len, self.tokenizer.pad_id)
        if config.max_position_embeddings < self.seq_len:
            raise LmforgeError(f"model.max_position_embeddings {config.max_position_embeddings} is below the data's "
                               f"sequence length {self.seq_len}")
        return MaskedLM(config)

    def batch(self, position: int, count: int):
        from lmforge.train.loop import Batch

        rows = self._with_cls(self.stream.rows(position, count).numpy())
        rngs = [np.random.default_rng([self.seed, position + k]) for k in range(count)]
        inputs, labels = self.masker(rows, rngs)
        labels_t = torch.from_numpy(labels)
        return Batch(torch.from_numpy(inputs), labels_t, tokens=rows.size,
                     count=int((labels_t != IGNORE_INDEX).sum()))

    def loss(self, model, batch):
        loss, right = masked_lm_loss(model, batch.input_ids, batch.labels)
        metrics = {"masked_accuracy": right}
        if batch.extra is not None and "count_at_mask" in batch.extra:  # evaluation: also right at [MASK] inputs
            with torch.no_grad():
                chosen = batch.labels != IGNORE_INDEX
                at_mask = batch.input_ids[chosen] == self.mask_id
                hits = model.predict(model.encode(batch.input_ids)[chosen]).argmax(-1) == batch.labels[chosen]
            metrics["right_at_mask"] = (hits & at_mask).sum().float()
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, trainer) -> dict[str, float] | None:
        from lmforge.train.distributed import sum_across
        from lmforge.train.loop import Batch

        if not len(self.val_inputs):
            return None
        runtime = trainer.runtime
        world, rank, size = runtime.world_size, runtime.rank, self.config.train.batch_size
        inputs, labels = self.val_inputs[rank::world], self.val_labels[rank::world]
        totals = torch.zeros(5, dtype=torch.float64, device=runtime.device)  # nats, right, targets, at [MASK]
        flag = {"count_at_mask": torch.ones(1)}
        for i in range(0, len(inputs), size):
            batch = Batch(inputs[i:i + size], labels[i:i + size], extra=flag).to(runtime.device)
            with trainer.autocast():
                loss, metrics = trainer.wrapped(batch)  # through the wrapper: works under FSDP too
            chosen = batch.labels != IGNORE_INDEX
            totals += torch.stack([loss.double(), metrics["masked_accuracy"].double(), chosen.sum().double(),
                                   metrics["right_at_mask"].double(),
                                   (batch.input_ids[chosen] == self.mask_id).sum().double()])
        nats, right, count, mask_right, mask_count = (float(v) for v in sum_across(totals, runtime))
        val_loss = nats / max(count, 1.0)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
                "masked_accuracy": right / max(count, 1.0), "accuracy_at_mask": mask_right / max(mask_count, 1.0),
                "masked_tokens": int(count)}

    def baseline(self, trainer) -> float | None:
        """The unigram model's loss on the masked validation targets (what guessing without context gets)."""
        if not len(self.val_inputs):
            return None
        n = min(len(self.stream.dataset), 4096)
        counts = np.bincount(np.concatenate([self.stream.dataset[i] for i in range(n)]).astype(np.int64),
                             minlength=trainer.model.config.vocab_size).astype(np.float64) + 1.0
        logp = np.log(counts / counts.sum())
        targets = self.val_labels[self.val_labels != IGNORE_INDEX].numpy()
        return float(-logp[targets].mean())

    # checkpoints: the HF files hold the encoder (BertModel names); the head goes beside them.
    def checkpoint_extra(self, trainer, model_state: dict) -> dict[str, dict[str, torch.Tensor]]:
        return {HEAD_FILE: {k: v for k, v in model_state.items() if k.startswith("mlm_head.")}}

    def restore_state(self, directory: Path, model_state: dict) -> dict:
        from safetensors.torch import load_file

        head = Path(directory) / HEAD_FILE
        if not head.is_file():
            raise LmforgeError(f"{directory} has no {HEAD_FILE}: it is not a masked-LM training checkpoint")
        return {**model_state, **load_file(head)}

    def report_extra(self, trainer) -> dict[str, Any]:
        """The run's figures; at the end of the run also OUT/model (BertForMaskedLM layout) and plots/mlm.png."""
        o = self.config.objective
        extra: dict[str, Any] = {"title": self.title, "objective": {
            "name": "mlm", "mask_probability": o.mask_probability, "mask_fraction": o.mask_fraction,
            "random_fraction": o.random_fraction, "whole_word": o.whole_word}}
        if trainer.step == self.config.train.max_steps and trainer.runtime.mode == "fsdp":
            # rank 0 holds only its shards here; the final checkpoint has the full weights
            trainer.log("under FSDP the BertForMaskedLM directory is not written: the final checkpoint "
                        f"(encoder files + {HEAD_FILE}) holds the model")
        elif trainer.step == self.config.train.max_steps:
            from lmforge.model.masked_lm import save_masked_lm

            extra["model_dir"] = str(save_masked_lm(trainer.model, trainer.out / "model", self.tokenizer,
                                                    overwrite=True))
        if self.config.train.plots:
            from lmforge.train.telemetry import read_log

            plot = plot_masked_lm(read_log(trainer.jsonl.path), trainer.out / "plots" / "mlm.png")
            extra["mlm_plot"] = str(plot) if plot else None
        return extra


def plot_masked_lm(records: list[dict[str, Any]], out: Path) -> Path | None:
    """Masked-token loss (train and held-out) and held-out masked accuracy against the step."""
    from lmforge.io.atomic import atomic_path
    from lmforge.io.plots import pyplot

    plt = pyplot()
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval" and "masked_accuracy" in r]
    if plt is None or not train:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train (masked tokens)")
    right.plot([r["step"] for r in train], [r.get("masked_accuracy", float("nan")) for r in train], lw=1,
               alpha=0.5, label="train")
    if evals:
        left.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="held-out")
        right.plot([r["step"] for r in evals], [r["masked_accuracy"] for r in evals], "o-", label="held-out")
    left.set(xlabel="step", ylabel="cross-entropy (nats/masked token)", title="masked-LM loss")
    right.set(xlabel="step", ylabel="accuracy", title="masked-token accuracy")
    left.legend()
    right.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out
