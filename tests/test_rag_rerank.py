"""The cross-encoder (lmforge/rag/rerank.py), its training data and its training loop.

Parity is checked against transformers' BertForSequenceClassification on a tiny random
configuration with a tiny WordPiece vocabulary built here (no hub, no real model needed).
"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.rag.config import EvalOptions, RerankTrainOptions, RetrieverOptions
from lmforge.rag.rerank import CrossEncoder, rerank, resolve_reranker, truncate_pair
from lmforge.rag.rerank_data import (ANTONYMS, DataOptions, Pair, _change_number, _negate, _swap_word, generate,
                                     near_copy)
from lmforge.rag.types import Chunk, Hit

WORDS = ("the a an of to and in is are what how why does cache key value attention query passage model token "
         "tokens number not half quarter memory layer layers head heads size per bytes fast slow more fewer "
         "batch step steps decode prefill score scores softmax norm").split()
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,?!:;()-'")


def write_tiny_tokenizer(directory):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, processors

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *CHARS, *("##" + c for c in CHARS)]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(vocab))}
    tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    tok.save(str(directory / "tokenizer.json"))
    return len(vocab)


@pytest.fixture(scope="module")
def tiny_pair_model(tmp_path_factory):
    """(directory, transformers BertForSequenceClassification, fast tokenizer) with random weights."""
    import transformers as T

    directory = tmp_path_factory.mktemp("tiny-cross-encoder")
    vocab_size = write_tiny_tokenizer(directory)
    config = T.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=0,
                          id2label={0: "relevant", 1: "supported"}, label2id={"relevant": 0, "supported": 1})
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(config)
    with torch.no_grad():  # larger than the default init, so that every bias and norm matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval().save_pretrained(directory)
    fast = T.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), pad_token="[PAD]",
                                     cls_token="[CLS]", sep_token="[SEP]",
                                     model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    return directory, model, fast


PAIRS = [
    ("what is the kv cache?", "the key value cache holds the keys and values of earlier tokens."),
    ("how does attention score tokens?", "softmax of query key scores, " * 12),  # the second is cut
    ("decode step " * 20, "prefill is one step " * 20),  # both long: both are cut
    ("x", "y"),
]


def test_forward_equals_transformers(tiny_pair_model):
    directory, reference, fast = tiny_pair_model
    ours = CrossEncoder.load(directory)
    assert ours.labels == ("relevant", "supported")
    batch = fast([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, truncation=True, max_length=64,
                 return_tensors="pt")
    with torch.no_grad():
        want = reference(**batch).logits
        got = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert want.abs().max() > 0.05  # random weights large enough that a wrong operation would show


def test_text_pairs_equal_transformers_with_its_tokenizer(tiny_pair_model):
    """Same ids and token types as the tokenizers library (truncation included), same logits
    from the packed path whose last layer runs on [CLS] only."""
    directory, reference, fast = tiny_pair_model
    ours = CrossEncoder.load(directory)
    ours.max_length = 64
    for first, second in PAIRS:
        want = fast(first, second, truncation=True, max_length=64)
        ids, types = ours.encode_pair(first, second)
        assert ids == want["input_ids"] and types == want["token_type_ids"]
    batch = fast([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, truncation=True, max_length=64,
                 return_tensors="pt")
    with torch.no_grad():
        want = reference(**batch).logits.numpy()
    got = ours.logits(PAIRS, batch_size=3)  # sorted by length and batched: order must come back
    assert abs(got - want).max() < 1e-5
    assert list(ours.score(PAIRS, "supported")) == pytest.approx(list(got[:, 1]), abs=1e-6)


def test_truncate_pair_is_the_tokenizers_rule():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    tok = HFTokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    for budget in (20, 21):
        tok.enable_truncation(max_length=budget)
        for len_a, len_b in [(3, 50), (50, 3), (40, 80), (80, 40), (30, 30), (12, 11), (11, 12), (15, 10),
                             (10, 15), (5, 5), (11, 11), (budget, 1)]:
            ids = tok.encode(" ".join(["a"] * len_a), " ".join(["b"] * len_b)).ids
            assert truncate_pair(len_a, len_b, budget) == (ids.count(1), ids.count(2)), (len_a, len_b, budget)


def test_save_load_round_trip_and_transformers_reads_it(tiny_pair_model, tmp_path):
    import transformers as T

    directory = tiny_pair_model[0]
    model = CrossEncoder.load(directory)
    model.info["support_threshold"] = 0.25
    saved = model.save(tmp_path / "saved")
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "relevant", "1": "supported"}
    assert config["lmforge_cross_encoder"]["support_threshold"] == 0.25
    again = CrossEncoder.load(saved)
    assert again.labels == model.labels and again.max_length == model.max_length
    assert again.info["support_threshold"] == 0.25
    assert abs(again.logits(PAIRS) - model.logits(PAIRS)).max() == 0.0
    reference = T.BertForSequenceClassification.from_pretrained(saved).eval()
    tokenizer = T.AutoTokenizer.from_pretrained(saved)  # what the saved files say, token types included
    batch = tokenizer([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, truncation=True, max_length=64,
                      return_tensors="pt")
    assert "token_type_ids" in batch
    with torch.no_grad():
        assert abs(reference(**batch).logits.numpy() - model.logits(PAIRS)).max() < 1e-5


def test_load_errors_are_one_clear_message(tmp_path, tiny_pair_model):
    with pytest.raises(LmforgeError, match="no config.json"):
        CrossEncoder.load(tmp_path / "missing")
    with pytest.raises(LmforgeError, match="--rerank"):
        resolve_reranker(str(tmp_path / "missing"))
    with pytest.raises(LmforgeError, match="train-reranker"):
        import os

        os.environ["LMFORGE_CACHE"], old = str(tmp_path), os.environ.get("LMFORGE_CACHE")
        try:
            resolve_reranker("auto")
        finally:
            if old is None:
                del os.environ["LMFORGE_CACHE"]
            else:
                os.environ["LMFORGE_CACHE"] = old
    assert resolve_reranker(None) is None and resolve_reranker("none") is None
    model = CrossEncoder.load(tiny_pair_model[0])
    with pytest.raises(LmforgeError, match="no 'entailment' output"):
        model.score(PAIRS, "entailment")
    with pytest.raises(LmforgeError, match="not a string"):
        model.score([("a", 3)])


def test_options_validate_and_eval_adds_the_rerank_mode():
    with pytest.raises(LmforgeError, match="--rerank-depth"):
        RetrieverOptions(rerank_depth=0)
    with pytest.raises(LmforgeError, match="--train-layers"):
        RerankTrainOptions(train_layers=0)
    assert "hybrid+rerank" in EvalOptions(rerank="some/dir").modes
    assert EvalOptions(modes=("hybrid", "hybrid+rerank")).rerank == "auto"
    assert "hybrid+rerank" not in EvalOptions().modes


def _hits(texts):
    return [Hit(Chunk(source=f"p{i}.md", text=t, headings=(f"Page {i}",)), 1.0 / (i + 1), {"bm25": i + 1})
            for i, t in enumerate(texts)]


def test_rerank_orders_by_the_fusion_of_both_orders_deterministically(tiny_pair_model):
    model = CrossEncoder.load(tiny_pair_model[0])
    texts = ["the key value cache", "softmax of scores", "the cache of keys", "memory per token", "a b c"]
    hits = _hits(texts)
    query = "what is the kv cache?"
    logits = model.score([(query, model.passage_text(h.chunk)) for h in hits])
    alone = rerank(hits, query, model, fusion_k=None)
    assert [h.score for h in alone] == pytest.approx(sorted(logits.tolist(), reverse=True), abs=1e-6)
    by_model = sorted(range(5), key=lambda i: -logits[i])
    assert [h.ranks["fused"] - 1 for h in alone] == by_model
    fused = rerank(hits, query, model)  # reciprocal rank fusion of the incoming order and the model's, k = 60
    want = sorted(range(5), key=lambda i: (-(1 / (61 + i) + 1 / (61 + by_model.index(i))), i))
    assert [h.ranks["fused"] - 1 for h in fused] == want
    assert [h.ranks["rerank"] for h in fused] == [1, 2, 3, 4, 5]
    assert all(h.ranks["bm25"] == h.ranks["fused"] for h in fused)  # the earlier lists' ranks are kept
    assert [h.chunk.id for h in rerank(hits, query, model, k=3)] == [h.chunk.id for h in fused[:3]]
    assert [h.chunk.id for h in rerank(hits, query, model)] == [h.chunk.id for h in fused]  # same every time
    assert rerank([], query, model) == []


def test_rerank_keeps_the_earlier_order_on_ties(tiny_pair_model):
    model = CrossEncoder.load(tiny_pair_model[0])
    chunk = Chunk(source="p.md", text="the key value cache", headings=("Page",))
    hits = [Hit(chunk, 1.0 - i / 10, {"dense": i + 1}) for i in range(4)]  # one passage four times: equal logits
    for fusion_k in (None, 60.0):
        out = rerank(hits, "kv cache", model, fusion_k=fusion_k)
        assert [h.ranks["fused"] for h in out] == [1, 2, 3, 4]


def test_fit_rule_is_the_exhaustive_optimum():
    from itertools import product

    from lmforge.rag.evaluate import fit_rule

    rng = random.Random(4)
    values = [[rng.random(), rng.random()] for _ in range(30)]
    inside = [v[0] + v[1] > 0.8 or rng.random() < 0.2 for v in values]

    def outcome(t):
        refused = [all(x < y for x, y in zip(v, t)) for v in values]
        false = sum(r for r, i in zip(refused, inside) if i)
        return sum(r for r, i in zip(refused, inside) if not i), -false

    grid = [sorted({v[j] for v in values}) + [max(v[j] for v in values) + 1e-6] for j in range(2)]
    allowed = [t for t in product(*grid) if -outcome(t)[1] <= 0.05 * sum(inside)]
    best = max(outcome(t) for t in allowed)
    fitted = fit_rule(values, inside)
    assert outcome(fitted) == best and best[0] > 0
    one = fit_rule([[v[0]] for v in values], inside)  # one signal alone
    assert len(one) == 1 and outcome((one[0], 2.0))[1] >= -0.05 * sum(inside)


def test_passage_text_leaves_out_what_the_vocabulary_cannot_read(tiny_pair_model):
    model = CrossEncoder.load(tiny_pair_model[0])
    chunk = Chunk(source="kv.md", text="the cache.", headings=("KV cache", "Memory"),
                  metadata={"title": "KV cache", "zh_title": "鍵值快取", "terms": ["kv cache", "decode"],
                            "zh_terms": ["快取", "預填充"]})
    text = model.passage_text(chunk)
    assert text == "KV cache | kv cache, decode\nMemory\nthe cache."
    assert "快取" in chunk.search_text()


# -- training data --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def handbook_chunks():
    from lmforge.rag.chunking import Chunker
    from lmforge.rag.documents import load_document
    from lmforge.rag.handbook import handbook_dir, handbook_pages

    root = handbook_dir()
    return [c for page in handbook_pages() for c in Chunker().chunk(load_document(page, page.relative_to(root)
                                                                                      .as_posix()))]


def _evaluation_questions():
    from pathlib import Path

    from lmforge.rag.metrics import load_questions

    data = Path(__file__).resolve().parents[1] / "lmforge" / "rag" / "data"
    texts = [q.question for q in load_questions()]
    heldout = data / "handbook_questions_heldout.jsonl"
    if heldout.is_file():
        texts += [q.question for q in load_questions(heldout)]
    assert len(texts) > 250
    return texts


@pytest.mark.slow  # generates the whole training set (~5 s)
def test_generated_queries_never_copy_a_labelled_question(handbook_chunks):
    from lmforge.rag.bm25 import BM25Index

    index = BM25Index.build(handbook_chunks)

    def retrieve(query, n):
        return [h.chunk for h in index.search(query, k=n)]

    questions = _evaluation_questions()
    dataset = generate(handbook_chunks, retrieve, DataOptions(seed=3))  # no exclusion list: the generator itself
    queries = {p.first for p in dataset.pairs if p.head == "relevant"}
    assert len(queries) > 300
    words = re.compile(r"[a-z0-9]+|[\u3400-\u9fff]")
    query_words = [(query, set(words.findall(query.lower()))) for query in queries]  # split once, not per question
    for question in questions:
        q_words = set(words.findall(question.lower()))
        for query, g_words in query_words:
            overlap = len(q_words & g_words) / max(1, len(q_words | g_words))
            assert overlap < 0.8, (query, question)
    # and the guard works: a query the generator makes is dropped once it is listed
    target = sorted(queries)[0]
    guarded = generate(handbook_chunks, retrieve, DataOptions(seed=3), exclude=[target + "!"])
    assert target not in {p.first for p in guarded.pairs}
    assert guarded.stats["dropped_near_copies"] >= 1
    kinds = {p.origin.split("/")[0] for p in dataset.pairs}
    assert {"term-en", "term-zh", "heading", "masked", "keywords", "oos", "copy", "number", "antonym",
            "negation", "term-swap"} <= kinds
    # relevance negatives never come from the query's own page (a passage starts with its page's title)
    titles = {c.source: c.title for c in handbook_chunks}
    negatives = [p for p in dataset.pairs if p.head == "relevant" and not p.label and p.source]
    assert negatives and not any(p.second.startswith(titles[p.source] + " |") for p in negatives)
    positives = [p for p in dataset.pairs if p.head == "relevant" and p.label]
    assert all(p.second.startswith(titles[p.source] + " |") for p in positives)


def test_support_perturbations_change_what_they_say():
    rng = random.Random(0)
    passage = "The cache needs 45 KiB per token and 360 MiB for 8192 tokens."
    for _ in range(20):
        changed = _change_number(passage, passage, rng)
        assert changed != passage
        assert not (set(re.findall(r"\d+", changed)) <= set(re.findall(r"\d+", passage)))
    assert _swap_word("RMSNorm overestimates the variance.", ANTONYMS, rng) == "RMSNorm underestimates the variance."
    assert _swap_word("Half of the heads share keys.", ANTONYMS, rng) == "A quarter of the heads share keys."
    assert _negate("The result is exact.", rng) == "The result is not exact."
    assert near_copy("What is a KV cache?", "what is a kv cache") and not near_copy("KV cache", "KV cache memory")


# -- training --------------------------------------------------------------------------------------

def test_tiny_training_run_lowers_the_loss(tiny_pair_model):
    from lmforge.rag.rerank_train import PairTrainer, dev_report

    model = CrossEncoder.load(tiny_pair_model[0])
    rng = random.Random(0)
    pairs = []
    fillers = ["memory", "layer", "size", "bytes", "fast", "batch"]
    for _ in range(24):  # relevant when the passage names the cache; supported when it says half, not a quarter
        word = rng.choice(fillers)
        pairs.append(Pair("what is the cache?", f"the cache {word}", 1, "relevant", "t", "p"))
        pairs.append(Pair("what is the cache?", f"the softmax {word}", 0, "relevant", "t", "p"))
        pairs.append(Pair("half of the heads", f"half {word}", 1, "supported", "t", "p"))
        pairs.append(Pair("half of the heads", f"a quarter {word}", 0, "supported", "t", "p"))
    options = RerankTrainOptions(epochs=10, batch_size=16, lr=5e-3, head_lr_scale=3.0, train_layers=2)
    trainer = PairTrainer(model, options)
    frozen = [p.clone() for p in model.encoder.layers[0].parameters()]
    states = trainer.frozen_states(trainer.encode(pairs))
    assert len(states[0]) == len(model.encode_pair(pairs[0].first, pairs[0].second)[0])
    losses = trainer.fit(states, [model.head_index(p.head) for p in pairs], [float(p.label) for p in pairs])
    assert len(losses) == 10 * 6
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.65 * first, (first, last)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.encoder.layers[0].parameters()))  # frozen stays
    # logits from the cached states equal the text path's (up to the float16 cache)
    logits = trainer.predict(states)
    assert abs(logits - model.logits([(p.first, p.second) for p in pairs])).max() < 1e-2
    report = dev_report(pairs, logits, list(model.labels))
    assert report["relevant"]["accuracy"] > 0.75 and report["supported"]["pairs"] == 48


# -- wiring: retriever, evaluation ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    """(index path, embedder, an untrained cross-encoder on MiniLM saved to a directory): two real pages."""
    import shutil
    from pathlib import Path

    from lmforge.rag.embedder import load_embedder
    from lmforge.rag.index import build_index

    handbook = Path(__file__).resolve().parents[1] / "docs" / "handbook"
    root = tmp_path_factory.mktemp("pages")
    for name in ("kv-cache.md", "decoding.md"):
        shutil.copy(handbook / name, root / name)
    embedder = load_embedder()
    path = tmp_path_factory.mktemp("index") / "pages.sqlite"
    build_index(root, path, embedder)
    from lmforge.model.registry import resolve

    model_dir = CrossEncoder.from_encoder(resolve("all-minilm-l6-v2").path, seed=1).save(
        tmp_path_factory.mktemp("ce") / "model")
    return path, embedder, model_dir


@pytest.mark.slow
def test_retriever_reranks_the_fused_top_and_adds_the_signal(small_index):
    from lmforge.rag.retriever import Retriever
    from lmforge.rag.store import open_store

    path, embedder, model_dir = small_index
    query = "How much memory does the KV cache take per token?"
    with open_store(path) as store:
        plain = Retriever(store, embedder).retrieve(query, k=6)
        assert "rerank" not in plain.signals
        retriever = Retriever(store, embedder, RetrieverOptions(rerank=str(model_dir), rerank_depth=6))
        got = retriever.retrieve(query, k=6)
        assert sorted(h.chunk.id for h in got.hits) == sorted(h.chunk.id for h in plain.hits)
        assert [h.ranks["rerank"] for h in got.hits] == list(range(1, 7))
        model = CrossEncoder.load(model_dir)
        logits = model.score([(query, model.passage_text(h.chunk)) for h in plain.hits])
        assert got.signals["rerank"] == pytest.approx(float(logits.max()), abs=1e-4)
        # thresholds calibrated with the signal decide together; a high bar on it alone does not refuse
        store.set_meta(model_id=embedder.model_id, dim=embedder.dim, rerank_min_cosine_en=2.0,
                       rerank_min_strength_en=2.0, min_rerank_en=got.signals["rerank"] + 1.0)
        strict = Retriever(store, embedder, RetrieverOptions(rerank=str(model_dir), rerank_depth=6))
        assert strict.retrieve(query, k=3).confident is False
        store.set_meta(model_id=embedder.model_id, dim=embedder.dim, min_rerank_en=got.signals["rerank"] - 1.0)
        lenient = Retriever(store, embedder, RetrieverOptions(rerank=str(model_dir), rerank_depth=6))
        assert lenient.retrieve(query, k=3).confident is True


@pytest.mark.slow
def test_eval_measures_hybrid_plus_rerank_and_the_support_check(small_index, tmp_path):
    from lmforge.rag.evaluate import run_eval

    path, embedder, model_dir = small_index
    questions = tmp_path / "q.jsonl"
    rows = [("en-1", "en", "How much memory does the KV cache need per token?", ["kv-cache.md"]),
            ("en-2", "en", "What does temperature do when sampling tokens?", ["decoding.md"]),
            ("zh-1", "zh-Hant", "KV 快取每個 token 要多少記憶體？", ["kv-cache.md"]),
            ("en-3", "en", "What is a good recipe for pancakes?", [])]
    questions.write_text("".join(json.dumps({"id": i, "lang": lang, "question": q, "gold": gold,
                                             "kind": "concept" if gold else "out_of_scope"}) + "\n"
                                 for i, lang, q, gold in rows), encoding="utf-8")
    options = EvalOptions(questions=str(questions), modes=("hybrid",), rerank=str(model_dir), rerank_depth=5,
                          out=str(tmp_path / "out"))
    report = run_eval(options, embedder, index=str(path))
    assert set(report["modes"]) == {"hybrid", "hybrid+rerank"}
    assert report["rerank"]["seconds_per_question"]["rerank"]["mean"] > 0
    assert set(report["rerank"]["refusal_rules"]) == {"cosine+strength", "rerank", "cosine+strength+rerank"}
    assert all("rerank" in row["signals"] for row in report["per_question"])
    check = report["support_check"]
    assert check["pairs"] == 72 and set(check["cross_encoder"]) == {"en", "zh-Hant", "all"}
    assert 0.0 <= check["cross_encoder"]["all"] <= 1.0
    assert "hybrid+rerank" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "retrieval.png").is_file()
