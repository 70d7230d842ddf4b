"""The answerable judgement (lmforge/rag/answerable.py) as a refusal signal: its score, its
subjects, and how the calibration and the retriever use it. Tiny handmade inputs; the model is
a tiny random BERT built here and read by transformers as the reference."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.rag.answerable import (HEAD, answerable_score, load_answerable, mentioned_subjects,
                                    outside_subjects)
from lmforge.rag.evaluate import _refuse_by, fit_language, fit_refusal
from lmforge.rag.retriever import ANSWERABLE_RULE_KEYS
from tests.conftest import bare_retriever
from lmforge.rag.types import Chunk

WORDS = "the a of is what how does cache key value attention query model token tokens memory layer".split()
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,?!:;()-'")


@pytest.fixture(scope="module")
def tiny_answerable(tmp_path_factory):
    """(directory, transformers model, fast tokenizer) of a one-output BERT with random weights."""
    import transformers as T
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, processors

    directory = tmp_path_factory.mktemp("tiny-answerable")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *CHARS, *("##" + c for c in CHARS)]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(vocab))}
    tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    tok.save(str(directory / "tokenizer.json"))
    config = T.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=128, num_labels=1, pad_token_id=0,
                          id2label={0: HEAD}, label2id={HEAD: 0})
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval().save_pretrained(directory)
    fast = T.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), pad_token="[PAD]",
                                     cls_token="[CLS]", sep_token="[SEP]",
                                     model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    return directory, model, fast


CHUNKS = [
    Chunk(source="kv.md", text="The key value cache holds the keys of earlier tokens.", headings=("KV cache",),
          metadata={"title": "KV cache", "terms": ["KV cache"]}),
    Chunk(source="attn.md", text="Attention scores each query against every key; XGBoost is not covered.",
          headings=("Attention", "Scores"), metadata={"title": "Attention", "terms": ["attention"]}),
    Chunk(source="layer.md", text="A model layer reads the tokens of its memory.", headings=("Layers",),
          metadata={"title": "Layers"}),
]


def test_score_is_the_best_logit_over_the_chunks_as_transformers_computes_it(tiny_answerable):
    directory, reference, fast = tiny_answerable
    model = load_answerable(str(directory))
    query = "what is the kv cache?"
    passages = [model.passage_text(c) for c in CHUNKS]
    batch = fast([query] * len(passages), passages, padding=True, truncation="longest_first",
                 max_length=model.max_length, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**batch).logits[:, 0]
    assert answerable_score(model, query, CHUNKS) == pytest.approx(float(expected.max()), abs=1e-5)
    assert answerable_score(model, query, CHUNKS[1:2]) == pytest.approx(float(expected[1]), abs=1e-5)
    assert answerable_score(model, query, []) == -100.0


def test_load_needs_an_answerable_output(tmp_path, tiny_answerable):
    import json
    import shutil

    directory = tmp_path / "other"
    shutil.copytree(tiny_answerable[0], directory)
    config = json.loads((directory / "config.json").read_text())
    config["id2label"] = {"0": "relevant"}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmforgeError, match="no 'answerable' output"):
        load_answerable(str(directory))
    with pytest.raises(LmforgeError, match="train-answerable"):
        load_answerable(str(tmp_path / "missing"))
    assert load_answerable("none") is None


def test_subjects_are_the_ones_the_chunks_do_not_cover():
    candidates = ["key value cache", "Tennessee River", "attention", "Key cache memory", "x", "Query Ponzi"]
    assert outside_subjects(CHUNKS, candidates) == ["Tennessee River", "Query Ponzi"]
    assert [name for name, chunk in mentioned_subjects(CHUNKS)] == ["XGBoost"]
    assert mentioned_subjects(CHUNKS)[0][1].source == "attn.md"


def _signals():
    # Word statistics cannot separate the near misses (the last six) from the in-scope
    # questions; the answerable judgement can.
    inside = [dict(cosine=0.5 + 0.005 * i, strength=0.3, overlap=2.0, unknown=0.0, coverage=0.5,
                   answerable=1.0 + 0.05 * i) for i in range(40)]
    outside = [dict(cosine=0.2, strength=0.1, overlap=1.0, unknown=0.0, coverage=0.1, answerable=-2.0),
               dict(cosine=0.25, strength=0.05, overlap=1.0, unknown=0.0, coverage=0.2, answerable=-3.0)]
    outside += [dict(cosine=0.55 + 0.01 * i, strength=0.3, overlap=2.0, unknown=0.0, coverage=0.5,
                     answerable=-1.0 + 0.1 * i) for i in range(6)]
    return inside + outside, [True] * 40 + [False] * 8


def test_calibration_fits_and_chooses_the_answerable_threshold():
    signals, in_scope = _signals()
    plain = fit_refusal(signals, in_scope)
    assert len(plain) == 6 and math.isinf(plain[5])
    assert sum(_refuse_by(s, plain) for s in signals[40:]) == 2
    fit = fit_refusal(signals, in_scope, keys=("answerable",))
    assert -0.5 < fit[5] <= 1.0 and all(math.isinf(t) for t in (fit[0], fit[1], fit[2], fit[4]))
    assert [_refuse_by(s, fit) for s in signals] == [not i for i in in_scope]
    chosen = fit_language(signals, in_scope)
    assert not math.isinf(chosen[5]) and all(_refuse_by(s, chosen) for s in signals[40:])
    # Without the signal the earlier sets only, and the signal never answers.
    without = [{k: v for k, v in s.items() if k != "answerable"} for s in signals]
    assert math.isinf(fit_language(without, in_scope)[5])


def test_retriever_judges_with_the_answerable_rule_only_where_calibrated():
    plain = {"min_cosine_en": 0.4, "min_strength_en": 0.3, "min_overlap_en": 1e9, "unknown_veto_en": 0,
             "min_coverage_en": 1e9}
    rule = dict(zip(ANSWERABLE_RULE_KEYS, (1e9, 0.3, 1e9, 0, 1e9, 0.5)))
    meta = {**plain, **{f"answerable_{k}_en": v for k, v in rule.items()}}
    near_miss = {"cosine": 0.6, "strength": 0.1, "overlap": 2.0, "unknown": 0.0, "coverage": 0.5}
    retriever = bare_retriever(meta)
    assert retriever.answerable_rules["en"] == (1e9, 0.3, 1e9, 0, 1e9, 0.5) and "zh" not in retriever.answerable_rules
    assert retriever.judge(near_miss, "en")[1]  # no answerable signal: the plain rule (cosine answers)
    assert not retriever.judge({**near_miss, "answerable": 0.2}, "en")[1]
    confidence, confident = retriever.judge({**near_miss, "answerable": 0.9}, "en")
    assert confident and confidence == pytest.approx((1 / (1 + math.exp(-0.9))) / (1 / (1 + math.exp(-0.5))))
    assert retriever.judge({**near_miss, "answerable": -5.0}, "zh") == retriever.judge(near_miss, "zh")
    old = bare_retriever(plain)  # calibrated before the signal: judged as before
    assert old.answerable_rules == {} and old.answerable_model is None
    assert old.judge({**near_miss, "answerable": -5.0}, "en") == old.judge(near_miss, "en")
