"""Training the cross-encoder (`lmforge rag train-reranker`): generated pairs, a few minutes on a CPU.

The steps:

1. **Data** (`rerank_data.generate`): relevance and support pairs from the knowledge
   base's chunks, hard negatives from the hybrid retriever. The pages are split: a tenth
   of them (and of the out-of-scope queries) form a development set the model never
   trains on, so the figures printed at the end measure pages it has not seen.
2. **Model** (`CrossEncoder.from_encoder`): the encoder and pooler of all-MiniLM-L6-v2, a
   new two-output head.
3. **Frozen lower layers, computed once.** Only the top `train_layers` layers and the head
   learn; the embeddings and the layers below do not change, so their output for every
   pair is computed once (inference speed, no autograd) and kept (float16, a few hundred
   MB). Each epoch then runs only the top layers, and of the last layer only the [CLS]
   row (`rerank._cls_block`). On 2 CPU cores this is what makes training take minutes
   instead of an hour: the full model forward and backward reads ~250 tokens per
   relevance pair, over thousands of pairs.
4. **Loss**: binary cross-entropy of each pair's own output (relevant or supported) against
   its 0/1 label; AdamW, linear warmup then cosine decay (`lmforge.train.schedule`), the
   head at a 10x higher rate than the pretrained layers (it starts from random).

Why not lmforge's pretraining loop (`lmforge.train.loop`): it streams packed token rows
of a tokenized corpus into a next-token loss, with checkpoint-resume, DDP/FSDP and
telemetry built around that; a pair classifier trained for minutes needs a different
batch (pairs of unequal lengths, cached activations) and a different loss, and none of
the rest. This loop reuses its optimizer groups (`parameter_groups`) and schedule.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LmforgeError
from .config import RerankTrainOptions
from .rerank import CrossEncoder, default_reranker_dir
from .rerank_data import DataOptions, Dataset, Pair, generate


def split_pairs(pairs: Sequence[Pair], dev_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, dev): whole pages (and whole out-of-scope queries) go to one side."""
    if dev_fraction <= 0:
        return list(pairs), []
    rng = random.Random(seed)
    sources = sorted({p.source for p in pairs if p.source})
    oos = sorted({p.first for p in pairs if not p.source})
    dev_sources = set(rng.sample(sources, max(1, round(dev_fraction * len(sources))))) if sources else set()
    dev_oos = set(rng.sample(oos, round(dev_fraction * len(oos)))) if oos else set()
    train, dev = [], []
    for p in pairs:
        held = p.source in dev_sources if p.source else p.first in dev_oos
        (dev if held else train).append(p)
    return train, dev


class PairTrainer:
    """Trains the top layers and head of a `CrossEncoder` on `Pair`s (see the module docstring)."""

    def __init__(self, model: CrossEncoder, options: RerankTrainOptions) -> None:
        self.model, self.options = model, options
        n_layer = len(model.encoder.layers)
        if not 1 <= options.train_layers <= n_layer:
            raise LmforgeError(f"--train-layers must be between 1 and {n_layer}, got {options.train_layers}")
        self.first = n_layer - options.train_layers  # first trained layer
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        for layer in model.encoder.layers[self.first:]:
            for p in layer.parameters():
                p.requires_grad_(True)

    def encode(self, pairs: Sequence[Pair]) -> list[tuple[list[int], list[int]]]:
        return [self.model.encode_pair(p.first, p.second) for p in pairs]

    def frozen_states(self, encoded: Sequence[tuple[list[int], list[int]]], batch_size: int = 32,
                      progress: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:
        """Each pair's hidden states entering the first trained layer ([length, D], float16)."""
        model = self.model
        out: list[torch.Tensor | None] = [None] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chosen = order[start:start + batch_size]
                batch = model.pack([encoded[i] for i in chosen])
                x = model.run_layers(model.embed_packed(batch), batch.lengths, 0, self.first)
                for i, part in zip(chosen, x.split(batch.lengths)):
                    out[i] = part.to(torch.float16).clone()
                if progress is not None:
                    progress(min(start + batch_size, len(order)), len(order))
        return out  # type: ignore[return-value]

    def logits(self, states: Sequence[torch.Tensor], indices: Sequence[int]) -> torch.Tensor:
        x = torch.cat([states[i] for i in indices]).float()
        return self.model.logits_from(x, [len(states[i]) for i in indices], self.first)

    def batches(self, lengths: Sequence[int], rng: random.Random,
                groups: Sequence[int] | None = None) -> list[list[int]]:
        """Shuffled batches of about `batch_size` pairs of similar length (sorted within groups of
        32 batches); the pairs of one query (same group id >= 0) stay in one batch."""
        size = self.options.batch_size
        units: dict[object, list[int]] = {}
        for i in range(len(lengths)):
            key = groups[i] if groups is not None and groups[i] >= 0 else ("single", i)
            units.setdefault(key, []).append(i)
        order = list(units.values())
        rng.shuffle(order)
        out: list[list[int]] = []
        span = max(1, 32 * size // max(1, round(len(lengths) / max(1, len(order)))))
        for start in range(0, len(order), span):
            members = sorted(order[start:start + span], key=lambda u: sum(lengths[i] for i in u) / len(u))
            batch: list[int] = []
            for unit in members:
                batch += unit
                if len(batch) >= size:
                    out.append(batch)
                    batch = []
            if batch:
                out.append(batch)
        rng.shuffle(out)
        return out

    def optimizer(self) -> torch.optim.Optimizer:
        from lmforge.train.optim import parameter_groups

        opts = self.options
        groups = []
        for group in parameter_groups(self.model, opts.weight_decay):
            for head in (False, True):
                params = [p for p, n in zip(group["params"], group["names"])
                          if n.startswith(("pooler.", "classifier.")) == head]
                if params:
                    groups.append({"params": params, "weight_decay": group["weight_decay"],
                                   "lr": opts.lr * (opts.head_lr_scale if head else 1.0),
                                   "base_lr": opts.lr * (opts.head_lr_scale if head else 1.0)})
        return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)

    def fit(self, states: Sequence[torch.Tensor], heads: Sequence[int], labels: Sequence[float],
            groups: Sequence[int] | None = None, progress: Callable[..., None] | None = None) -> list[float]:
        """Train on cached states; returns the loss of every step.

        The loss of a batch is the binary cross-entropy of every pair's own output, plus
        (weighted by `listwise`) for each query group with one positive the cross-entropy of
        a softmax over the group's logits with the positive as the answer: ranking the
        positive above its own negatives is what reranking needs, and the pointwise term keeps
        the logits' scale meaningful for thresholds (out of scope, support).
        """
        from lmforge.train.schedule import lr_factor

        opts = self.options
        rng = random.Random(opts.seed)
        torch.manual_seed(opts.seed)
        lengths = [len(s) for s in states]
        head_t = torch.tensor(heads)
        label_t = torch.tensor(labels, dtype=torch.float32)
        group_t = torch.tensor(list(groups) if groups is not None else [-1] * len(states))
        optimizer = self.optimizer()
        epochs = [self.batches(lengths, rng, groups) for _ in range(opts.epochs)]
        total = sum(len(e) for e in epochs)
        warmup = max(1, round(0.06 * total))
        losses: list[float] = []
        self.model.train()
        step = 0
        for batches in epochs:
            for batch in batches:
                factor = lr_factor(step, total, "cosine", warmup, min_lr_ratio=0.0)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                index = torch.tensor(batch)
                logits = self.logits(states, batch)
                chosen = logits.gather(1, head_t[index].view(-1, 1)).squeeze(1)
                loss = F.binary_cross_entropy_with_logits(chosen, label_t[index])
                if opts.listwise > 0:
                    loss = loss + opts.listwise * self._listwise(chosen, label_t[index], group_t[index])
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                step += 1
                if progress is not None:
                    progress(step, total, float(np.mean(losses[-20:])))
        self.model.eval()
        return losses

    @staticmethod
    def _listwise(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        terms = []
        for g in torch.unique(groups):
            if g < 0:
                continue
            member = groups == g
            if int(labels[member].sum()) != 1 or int(member.sum()) < 2:
                continue
            target = torch.nonzero(labels[member] > 0)[0]
            terms.append(F.cross_entropy(logits[member].view(1, -1), target))
        return torch.stack(terms).mean() if terms else logits.new_zeros(())

    def predict(self, states: Sequence[torch.Tensor], batch_size: int = 64) -> np.ndarray:
        """Logits [len(states), labels] from cached states."""
        order = sorted(range(len(states)), key=lambda i: len(states[i]))
        out = np.zeros((len(states), len(self.model.labels)), dtype=np.float32)
        self.model.eval()
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chosen = order[start:start + batch_size]
                out[chosen] = self.logits(states, chosen).float().numpy()
        return out


def dev_report(pairs: Sequence[Pair], logits: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy at logit 0 per output and per origin, and how often a relevance query's positive
    outscores all its negatives (the query's passages all come from generated pairs)."""
    report: dict[str, Any] = {}
    for h, head in enumerate(labels):
        rows = [(p, logits[i, h]) for i, p in enumerate(pairs) if p.head == head]
        if not rows:
            continue
        correct = [(score > 0) == bool(p.label) for p, score in rows]
        by_origin: dict[str, list[bool]] = {}
        for (p, _), ok in zip(rows, correct):
            by_origin.setdefault(p.origin.split("/")[0], []).append(ok)
        report[head] = {"pairs": len(rows), "accuracy": float(np.mean(correct)),
                        "by_origin": {k: round(float(np.mean(v)), 3) for k, v in sorted(by_origin.items())}}
    h = labels.index("relevant") if "relevant" in labels else None
    if h is not None:
        groups: dict[str, list[tuple[int, float]]] = {}
        for i, p in enumerate(pairs):
            if p.head == "relevant" and p.source:
                groups.setdefault(p.first, []).append((p.label, float(logits[i, h])))
        wins = [max(s for lab, s in g if lab) > max(s for lab, s in g if not lab)
                for g in groups.values() if any(lab for lab, _ in g) and any(not lab for lab, _ in g)]
        if wins:
            report["relevant"]["positive_ranked_first"] = float(np.mean(wins))
    return report


def evaluation_questions() -> list[str]:
    """The labelled handbook questions (the main and the held-out set): evaluation data that
    no training query may copy."""
    from .metrics import load_questions

    texts = [q.question for q in load_questions()]
    heldout = Path(__file__).resolve().parent / "data" / "handbook_questions_heldout.jsonl"
    if heldout.is_file():
        texts += [q.question for q in load_questions(heldout)]
    return texts


def train_reranker(options: RerankTrainOptions, embedder=None, index: str | None = None,
                   exclude: Sequence[str] | None = None, log: Callable[[str], None] = print,
                   progress: bool = True) -> dict[str, Any]:
    """Generate the data, train, save; returns a summary (also stored in the model's config.json).

    `embedder` and `index` make the retriever that supplies hard negatives (default: the
    default embedder and its handbook index). `exclude` lists texts no training query may
    copy (default: the labelled handbook questions, which are evaluation data).
    """
    return with_threads(options.threads, _train, options, embedder, index, exclude, log, progress)


def with_threads(threads: int | None, fn: Callable[..., Any], *args) -> Any:
    """fn(*args) with PyTorch on `threads` threads (None or 0: as it is), restored afterwards."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


def retrieval_for_training(embedder, index: str | None) -> tuple[Any, str]:
    """The embedder and index whose retriever supplies a training run's hard negatives: the ones
    given, else the default embedder and its handbook index (built on first use)."""
    if embedder is None:
        from .embedder import load_embedder

        embedder = load_embedder()
    if index is None:
        from .handbook import handbook_index

        index = str(handbook_index(embedder))
    return embedder, index


def _train(options: RerankTrainOptions, embedder, index: str | None, exclude: Sequence[str] | None,
           log: Callable[[str], None], progress: bool) -> dict[str, Any]:
    from lmforge.io.progress import Progress

    from .retriever import Retriever
    from .store import open_store

    started = time.perf_counter()
    torch.manual_seed(options.seed)
    embedder, index = retrieval_for_training(embedder, index)
    if exclude is None:
        exclude = evaluation_questions()
    out = Path(options.out).expanduser() if options.out else default_reranker_dir()

    from lmforge.model.registry import resolve

    spec = resolve(options.base)
    model = CrossEncoder.from_encoder(spec.path, max_length=options.max_length, seed=options.seed)
    with open_store(index) as store:
        retriever = Retriever(store, embedder)
        chunks = list(store.all_chunks())
        if not chunks:
            raise LmforgeError(f"the index {index} holds no chunks to make training pairs from")

        def retrieve(query: str, n: int):
            lists = retriever.search_lists(query, max(n, 10))
            return [h.chunk for h in retriever.combine(lists, "hybrid", n)]

        line = Progress("making pairs", unit="pages", enabled=progress)
        dataset: Dataset = generate(chunks, retrieve, DataOptions(seed=options.seed,
                                                                  support_sentences=options.support_per_page), exclude,
                                    progress=lambda done, total: line.update(done, total=total),
                                    passage=model.passage_text)
        line.close()
    data_seconds = time.perf_counter() - started
    train_pairs, dev_pairs = split_pairs(dataset.pairs, options.dev_fraction, options.seed)
    if options.max_pairs is not None and len(train_pairs) > options.max_pairs:
        train_pairs = random.Random(options.seed).sample(train_pairs, options.max_pairs)
    log(f"{len(train_pairs)} training pairs, {len(dev_pairs)} development pairs "
        f"({dataset.stats['queries']} queries; {dataset.stats['dropped_near_copies']} dropped as near copies of "
        f"evaluation questions) in {data_seconds:.0f} s")

    trainer = PairTrainer(model, options)
    heads = [model.head_index(p.head) for p in train_pairs]
    labels = [float(p.label) for p in train_pairs]
    group_ids: dict[tuple[str, str], int] = {}
    groups = [group_ids.setdefault((p.first, p.source), len(group_ids)) if p.head == "relevant" and p.source
              else -1 for p in train_pairs]

    t0 = time.perf_counter()
    line = Progress("lower layers, once", unit="pairs", enabled=progress)
    states = trainer.frozen_states(trainer.encode(train_pairs), progress=lambda d, t: line.update(d, total=t))
    line.close()
    cache_seconds = time.perf_counter() - t0
    tokens = sum(len(s) for s in states)

    t0 = time.perf_counter()
    line = Progress("train-reranker", unit="steps", enabled=progress)
    losses = trainer.fit(states, heads, labels, groups,
                         progress=lambda step, total, loss: line.update(step, total=total, info=f"loss {loss:.4f}"))
    line.close()
    fit_seconds = time.perf_counter() - t0
    del states

    dev = {}
    if dev_pairs:
        dev_states = trainer.frozen_states(trainer.encode(dev_pairs))
        dev = dev_report(dev_pairs, trainer.predict(dev_states), list(model.labels))
    summary = {
        "base": spec.name, "pairs": {"train": len(train_pairs), "dev": len(dev_pairs)},
        "train_tokens": tokens, "data": dataset.stats, "dev": dev,
        "loss": {"first_20": float(np.mean(losses[:20])), "last_20": float(np.mean(losses[-20:])),
                 "steps": len(losses)},
        "seconds": {"data": round(data_seconds, 1), "lower_layers": round(cache_seconds, 1),
                    "training": round(fit_seconds, 1), "total": round(time.perf_counter() - started, 1)},
        "options": {k: v for k, v in vars(options).items() if k != "out"},
        "threads": torch.get_num_threads(),
    }
    model.info["training"] = summary
    model.info["support_threshold"] = 0.0
    model.save(out)
    summary["out"] = str(out)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    s = summary["seconds"]
    lines = [f"saved {summary['out']}",
             f"{summary['pairs']['train']} training pairs ({summary['train_tokens']:,} tokens), "
             f"{summary['loss']['steps']} steps: loss {summary['loss']['first_20']:.3f} -> "
             f"{summary['loss']['last_20']:.3f}",
             f"time: data {s['data']} s, lower layers {s['lower_layers']} s, training {s['training']} s, "
             f"total {s['total']} s ({summary['threads']} threads)"]
    for head, r in summary.get("dev", {}).items():
        extra = f", positive ranked first {r['positive_ranked_first']:.3f}" if "positive_ranked_first" in r else ""
        lines.append(f"development pages, {head}: accuracy {r['accuracy']:.3f} on {r['pairs']} pairs{extra}")
    return "\n".join(lines)
