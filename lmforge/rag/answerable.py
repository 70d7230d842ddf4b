"""Does a passage answer a question? A cross-encoder judgement, as one more refusal signal.

The retriever's word statistics (cosine, BM25 strength, term overlap, coverage) measure
whether the knowledge base *uses the question's words*; a near miss, a question about a
subject the pages do not cover phrased with words they use ("the kernel of a support
vector machine" against pages about kernels and machines), passes them all. Telling the
two apart takes reading the passage with the question. This module trains a
`rerank.CrossEncoder` with one output, ``answerable``, on pairs generated from the
knowledge base's own chunks, and scores a question by the best logit over its top
retrieved chunks (`answerable_score`). `lmforge rag eval --answerable --calibrate` fits a
threshold for that score beside the others; the retriever uses it only for an index
calibrated with it, and only when the model is present (`Retriever`, retriever.py).

**Pairs** (question first, passage second; all generated, nothing taken from the labelled
question sets):

* positives (label 1): the relevance queries of `rerank_data` (English and Chinese
  templates over a page's terms and titles, section headings, masked sentences) with the
  chunk they were made from;
* ``other-page`` (0): the same question with the best BM25 hits of *other* pages (pages
  whose names contain the question's term are skipped): words shared, subject not answered;
* ``swap`` (0): the question with its subject term replaced by a subject no chunk covers,
  paired with the positive chunk itself and with the best hit of the swapped question.
  Every word but the subject still matches the passage, which is what a near miss looks
  like; the label can only be learned by reading the subject;
* ``heading-swap`` (1 / 0): "<page term>: <section heading>" with the section (1) and
  "<outside subject>: <section heading>" with the same section (0);
* ``mention`` (0): "What is X?" (English and Chinese templates) for a name X that one or
  two chunks mention without explaining it (`mentioned_subjects`), with the chunk naming it;
* ``oos`` (0): generic templates ("What should I know about X?") over outside subjects,
  with their best BM25 hits.

The outside subjects come from text the knowledge base does not contain: the link targets
of the Wikipedia excerpt that gensim ships (`lmforge.data.corpora.WIKI_FILE`, ~22k
distinct targets), kept when the phrase occurs in no chunk and at least one of its words
occurs in none (`outside_subjects`). Chinese swaps put those (English) subjects into
Chinese templates: a Chinese question usually names its subject in Latin script, and
all-MiniLM-L6-v2's vocabulary reads few Traditional Chinese characters (most are [UNK]),
so the model reads Chinese questions mostly through their Latin words and digits.

**Training** reuses `rerank_train.PairTrainer`: the lower layers of all-MiniLM-L6-v2 run
once per pair, the top `train_layers` and the head learn, pointwise binary cross-entropy.
The model is built by `lmforge rag train-answerable` into the user's cache
(``answerable-all-minilm-l6-v2``), never shipped in the repository.
"""

from __future__ import annotations

import bz2
import random
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import LmforgeError
from .rerank import CrossEncoder
from .rerank_data import (EN_TEMPLATES, HEADING_TEMPLATES, OOS_TEMPLATES_EN, OOS_TEMPLATES_ZH, ZH_TEMPLATES, DataOptions, Pair,
                          _GENERIC_SHARE, _idf, _mentions, _relevance_queries, pages_of)
from .text import is_chinese
from .types import Chunk

HEAD = "answerable"
DEFAULT_NAME = "answerable-all-minilm-l6-v2"  # the trained model's directory in the cache
DEFAULT_TOP = 5  # retrieved chunks a question's score is the best of
_LINK = re.compile(r"\[\[([^\]|#:]+)[\]|]")
_SUBJECT = re.compile(r"^[A-Za-z][A-Za-z' -]{2,38}[A-Za-z]$")
_WORD = re.compile(r"[a-z]+")


def default_answerable_dir() -> Path:
    """Where `lmforge rag train-answerable` writes its model by default (the user's cache)."""
    from .handbook import cache_dir

    return cache_dir() / DEFAULT_NAME


def resolve_answerable(spec: str | None) -> Path | None:
    """The model directory an ``--answerable`` value names: None/"none" (off), "auto" (the
    default in the cache; None when it was never trained) or a directory (must exist)."""
    if spec is None or str(spec) in ("", "none"):
        return None
    if str(spec) == "auto":
        path = default_answerable_dir()
        return path if (path / "config.json").is_file() else None
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise LmforgeError(f"--answerable {spec}: not a model directory (no config.json there); "
                           "train one with `lmforge rag train-answerable`")
    return path


def load_answerable(spec: str | None, device=None) -> CrossEncoder | None:
    """The answerable model `spec` names (see `resolve_answerable`), or None."""
    path = resolve_answerable(spec)
    if path is None:
        return None
    model = CrossEncoder.load(path, device)
    if HEAD not in model.labels:
        raise LmforgeError(f"{path} has no {HEAD!r} output (it has {', '.join(model.labels)}): "
                           "not a model of `lmforge rag train-answerable`")
    return model


def answerable_score(model: CrossEncoder, query: str, chunks: Sequence[Chunk]) -> float:
    """The best ``answerable`` logit of `query` over `chunks` (its top retrieved ones); -100 with none."""
    if not chunks:
        return -100.0
    return float(model.score([(query, model.passage_text(c)) for c in chunks], HEAD, batch_size=len(chunks)).max())


# -- outside subjects ----------------------------------------------------------------------------------

def wiki_link_targets(path: Path | None = None) -> list[str]:
    """Distinct link targets of the gensim Wikipedia excerpt, in order of first appearance."""
    if path is None:
        from lmforge.data.corpora import WIKI_FILE, gensim_data_file

        path = gensim_data_file(WIKI_FILE)
    with bz2.open(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    return list(dict.fromkeys(m.strip() for m in _LINK.findall(text)))


def outside_subjects(chunks: Sequence[Chunk], candidates: Sequence[str]) -> list[str]:
    """The `candidates` the chunks do not cover: plain 1-4 word phrases that occur in no chunk,
    with at least one word (of 3+ letters) that no chunk uses."""
    grams: set[tuple[str, ...]] = set()
    for chunk in chunks:  # every run of 1-4 words of every chunk, to look phrases up in
        words = _WORD.findall(chunk.search_text().lower())
        for n in range(1, 5):
            grams.update(zip(*(words[i:] for i in range(n))))
    out = []
    for phrase in candidates:
        if not _SUBJECT.match(phrase) or len(phrase.split()) > 4:
            continue
        words = tuple(_WORD.findall(phrase.lower()))
        if not any(len(w) >= 3 for w in words) or len(words) > 4 or words in grams:
            continue
        if all((w,) in grams for w in words if len(w) >= 3):
            continue
        out.append(phrase)
    return out


_NAME = re.compile(r"(?<![\w-])[A-Z][A-Za-z0-9]*[A-Z0-9][A-Za-z0-9]*(?:-[A-Za-z0-9]+)?(?![\w-])")


def mentioned_subjects(chunks: Sequence[Chunk], max_chunks: int = 2) -> list[tuple[str, Chunk]]:
    """Names the chunks mention without explaining them: words with two or more capitals or
    digits ("XGBoost", "ResNet-50") that occur in at most `max_chunks` chunks' text and in no
    page's title, Chinese title, key terms or headings; each with the first chunk naming it.

    A question about such a name shares a rare word with a passage that does not answer it:
    the near miss that word statistics cannot tell from a question the passage answers.
    """
    named: set[str] = set()
    for page in pages_of(chunks):
        named |= page.names()
        named |= {h.lower() for c in page.chunks for h in c.headings if h}
    holders: dict[str, list[Chunk]] = {}
    for chunk in chunks:
        for name in dict.fromkeys(_NAME.findall(chunk.text)):
            holders.setdefault(name, []).append(chunk)
    out = []
    for name, found in holders.items():
        low = name.lower()
        if len(found) > max_chunks or len(name) < 3 or any(low in n for n in named):
            continue
        out.append((name, found[0]))
    return out


# -- pairs -----------------------------------------------------------------------------------------------

def _swap(query: str, term: str, subject: str) -> str | None:
    """`query` with `term` replaced by `subject` (None when the term is not in it)."""
    if not term:
        return None
    pattern = re.compile(re.escape(term), flags=re.IGNORECASE)
    return pattern.sub(subject, query, count=1) if pattern.search(query) else None


def generate_pairs(chunks: Sequence[Chunk], retrieve: Callable[[str, int], list[Chunk]],
                   subjects: Sequence[str], seed: int = 0, oos_queries: int = 120,
                   passage: Callable[[Chunk], str] = Chunk.search_text,
                   progress: Callable[[int, int], None] | None = None) -> tuple[list[Pair], dict[str, int]]:
    """Answerable pairs from `chunks` (see the module docstring) and counts per origin and label.

    `retrieve(query, n)` gives the best `n` chunks for a query (`train-answerable` uses BM25:
    the chunks that share the most rare words); `subjects` are subjects no chunk covers
    (`outside_subjects`); names the chunks mention in passing (`mentioned_subjects`) join them.
    """
    if not subjects:
        raise LmforgeError("no outside subjects to build near misses from")
    mentions = mentioned_subjects(chunks)
    subjects = list(subjects)
    if mentions:  # swap in names the pages mention in passing as often as outside subjects
        subjects = subjects[: 4 * len(mentions)] + [name for name, _ in mentions] * 4
    rng = random.Random(seed)
    chunks = list(chunks)
    pages = pages_of(chunks)
    heading_pages: dict[str, int] = {}
    for page in pages:
        for h in {c.headings[-1] for c in page.chunks if len(c.headings) > 1}:
            heading_pages[h] = heading_pages.get(h, 0) + 1
    generic = {h for h, n in heading_pages.items() if n >= _GENERIC_SHARE}
    idf = _idf(chunks)
    names = {page.source: page.names() for page in pages}
    options = DataOptions(seed=seed, term_queries=3, zh_queries=2, heading_queries=2, masked_queries=2,
                          keyword_queries=0)
    pairs: list[Pair] = []

    def add(first: str, chunk: Chunk, label: int, origin: str, source: str, lang: str) -> None:
        pairs.append(Pair(first, passage(chunk), label, HEAD, origin, source, lang))

    for n, page in enumerate(pages, 1):
        for query, positive, origin, term, lang in _relevance_queries(page, generic, idf, options, rng):
            add(query, positive, 1, origin, page.source, lang)
            low = term.lower()

            def usable(c: Chunk) -> bool:
                if c.source == page.source:
                    return False
                return not term or not (_mentions(c, term) or any(low in name or (len(name) > 1 and name in low)
                                                                  for name in names.get(c.source, ())))

            for other in [c for c in retrieve(query, 12) if usable(c)][:2]:
                add(query, other, 0, f"{origin}/other-page", page.source, lang)
            swapped = _swap(query, term, rng.choice(subjects))
            if swapped is not None:
                add(swapped, positive, 0, f"{origin}/swap", page.source, lang)
                found = retrieve(swapped, 1)
                if found:
                    add(swapped, found[0], 0, f"{origin}/swap-retrieved", page.source, lang)
        sections = [c for c in page.chunks if len(c.headings) > 1]
        subject = page.terms[0] if page.terms else page.title
        for chunk in rng.sample(sections, min(2, len(sections))):
            heading = re.sub(r"\s*\([A-Z]{1,3}\d+[^)]*\)\s*$", "", chunk.headings[-1]).strip()
            template = rng.choice(HEADING_TEMPLATES)
            add(template.format(subject=subject, heading=heading.lower()), chunk, 1, "heading-swap", page.source, "en")
            add(template.format(subject=rng.choice(subjects), heading=heading.lower()), chunk, 0,
                "heading-swap", page.source, "en")
        if progress is not None:
            progress(n, len(pages))
    zh_templates = [t.replace("{x}", " {x} ").strip() for t in OOS_TEMPLATES_ZH + ZH_TEMPLATES]
    for i, (name, chunk) in enumerate(mentions):
        lang = "zh" if i % 3 == 2 else "en"
        template = rng.choice(zh_templates if lang == "zh" else EN_TEMPLATES[:-1])
        add(template.format(x=name), chunk, 0, "mention", chunk.source, lang)
    for i in range(oos_queries):
        subject = rng.choice(subjects)
        lang = "zh" if i % 3 == 2 else "en"
        query = rng.choice(zh_templates if lang == "zh" else OOS_TEMPLATES_EN).format(x=subject)
        for chunk in retrieve(query, 2):
            add(query, chunk, 0, "oos", "", lang)
    counts: dict[str, int] = {}
    for p in pairs:
        key = f"{p.origin.split('/')[-1] if '/' in p.origin else p.origin}/{p.label}"
        counts[key] = counts.get(key, 0) + 1
    counts["pairs"] = len(pairs)
    counts["zh"] = sum(p.lang == "zh" or is_chinese(p.first) for p in pairs)
    return pairs, dict(sorted(counts.items()))


# -- training ----------------------------------------------------------------------------------------------

def train_answerable(options, embedder=None, index: str | None = None, log: Callable[[str], None] = print,
                     progress: bool = True) -> dict[str, Any]:
    """Generate the pairs, train, save (`options`: `config.AnswerableTrainOptions`); returns a summary."""
    from .rerank_train import with_threads

    return with_threads(options.threads, _train, options, embedder, index, log, progress)


def _train(options, embedder, index: str | None, log: Callable[[str], None], progress: bool) -> dict[str, Any]:
    import torch

    from lmforge.io.progress import Progress
    from lmforge.model.registry import resolve

    from .rerank_train import PairTrainer, dev_report, retrieval_for_training, split_pairs
    from .retriever import Retriever
    from .store import open_store

    started = time.perf_counter()
    torch.manual_seed(options.seed)
    embedder, index = retrieval_for_training(embedder, index)
    out = Path(options.out).expanduser() if options.out else default_answerable_dir()
    spec = resolve(options.base)
    model = CrossEncoder.from_encoder(spec.path, labels=(HEAD,), max_length=options.max_length, seed=options.seed)
    with open_store(index) as store:
        retriever = Retriever(store, embedder)
        chunks = list(store.all_chunks())
        if not chunks:
            raise LmforgeError(f"the index {index} holds no chunks to make training pairs from")

        def retrieve(query: str, n: int) -> list[Chunk]:  # BM25: the chunks sharing the most rare words
            return [h.chunk for h in retriever.bm25.search(query, n)]

        subjects = outside_subjects(chunks, wiki_link_targets())
        line = Progress("making pairs", unit="pages", enabled=progress)
        pairs, counts = generate_pairs(chunks, retrieve, subjects, options.seed, passage=model.passage_text,
                                       progress=lambda done, total: line.update(done, total=total))
        line.close()
    data_seconds = time.perf_counter() - started
    train_pairs, dev_pairs = split_pairs(pairs, options.dev_fraction, options.seed)
    log(f"{len(train_pairs)} training pairs, {len(dev_pairs)} development pairs ({len(subjects)} outside "
        f"subjects) in {data_seconds:.0f} s")
    trainer = PairTrainer(model, options)
    t0 = time.perf_counter()
    line = Progress("lower layers, once", unit="pairs", enabled=progress)
    states = trainer.frozen_states(trainer.encode(train_pairs), progress=lambda d, t: line.update(d, total=t))
    line.close()
    cache_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    line = Progress("train-answerable", unit="steps", enabled=progress)
    losses = trainer.fit(states, [0] * len(train_pairs), [float(p.label) for p in train_pairs], None,
                         progress=lambda step, total, loss: line.update(step, total=total, info=f"loss {loss:.4f}"))
    line.close()
    fit_seconds = time.perf_counter() - t0
    tokens = sum(len(s) for s in states)
    del states
    dev = dev_report(dev_pairs, trainer.predict(trainer.frozen_states(trainer.encode(dev_pairs))),
                     [HEAD]) if dev_pairs else {}
    summary = {
        "base": spec.name, "pairs": {"train": len(train_pairs), "dev": len(dev_pairs)}, "counts": counts,
        "outside_subjects": len(subjects), "train_tokens": tokens, "dev": dev,
        "loss": {"first_20": float(np.mean(losses[:20])), "last_20": float(np.mean(losses[-20:])),
                 "steps": len(losses)},
        "seconds": {"data": round(data_seconds, 1), "lower_layers": round(cache_seconds, 1),
                    "training": round(fit_seconds, 1), "total": round(time.perf_counter() - started, 1)},
        "options": {k: v for k, v in vars(options).items() if k != "out"},
        "threads": torch.get_num_threads(),
    }
    model.info["training"] = summary
    model.info["top"] = DEFAULT_TOP
    model.save(out)
    summary["out"] = str(out)
    return summary
