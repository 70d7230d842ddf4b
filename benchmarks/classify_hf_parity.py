"""The trained classifiers of docs/benchmarks.md ("Task heads") loaded by transformers'
Auto classes give the logits lmforge gives, on real test sentences (first 4 of each split).

    python benchmarks/classify_hf_parity.py      # after the three runs that write runs/*/model
"""
import torch, transformers as T
from lmforge.tune.heads import load_classifier
from lmforge.tune.classify import sentiment_splits, entity_splits, encode_text, encode_words, special_tokens
from lmforge.model.loading import resolve_tokenizer
torch.set_num_threads(1)  # a shared machine
for d, auto in [("runs/classify-sentiment-minilm/model", T.AutoModelForSequenceClassification),
                ("runs/tag-entities-minilm/model", T.AutoModelForTokenClassification),
                ("runs/classify-forgetting/lora/model", T.AutoModelForSequenceClassification)]:
    tok = resolve_tokenizer(d); sp = special_tokens(tok)
    if "tag" in d:
        rows = [encode_words(tok, r["tokens"], [0]*len(r["tokens"]), 64, sp).ids for r in entity_splits(0, {"train": 1, "validation": 1, "test": 4})["test"]]
    else:
        rows = [encode_text(tok, r["text"], 64, sp) for r in sentiment_splits(0)["test"][:4]]
    w = max(map(len, rows)); pad = tok.pad_id if tok.pad_id is not None else 0
    ids = torch.tensor([r + [pad]*(w-len(r)) for r in rows]); mask = torch.tensor([[1]*len(r)+[0]*(w-len(r)) for r in rows])
    ours = load_classifier(d)
    hf = auto.from_pretrained(d).eval()
    with torch.no_grad():
        a = ours(ids, mask); b = hf(input_ids=ids, attention_mask=mask).logits
    if a.dim() == 3:
        a, b = a[mask.bool()], b[mask.bool()]
    print(d, type(hf).__name__, "max |diff|", float((a-b).abs().max()), "same argmax", bool((a.argmax(-1)==b.argmax(-1)).all()))
