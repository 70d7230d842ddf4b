"""``lmforge data prepare``: raw corpora -> clean, deduplicated, packed token shards.

Stages, in order, each counted in the scorecard::

    load -> clean -> language -> quality -> exact_dedup -> near_dedup -> paragraph_dedup
         -> pii -> decontaminate -> split -> tokenize + pack

Documents stream through one at a time, so memory holds only the dedup indexes and the
shard being filled. The output directory is built under a temporary name and renamed
into place at the end: an interrupted or failed run leaves the previous output intact.

Output layout::

    OUT/index.json                    seq_len, dtype, EOS id, tokenizer, shards per split
    OUT/{train,validation,test}-NNNNN.npy   (rows, seq_len) token ids
    OUT/text/{split}.jsonl            the cleaned documents (for tokenizer training, inspection)
    OUT/scorecard.json, scorecard.md  what every stage did
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from lmforge.data.clean import QualityConfig, clean_text, quality_reasons
from lmforge.data.config import PrepareConfig
from lmforge.data.corpora import SPLITS, Source, open_sources, split_of
from lmforge.data.decontam import Decontaminator
from lmforge.data.dedup import ExactDeduplicator, NearDuplicateIndex, ParagraphDeduplicator
from lmforge.data.langid import identify_language
from lmforge.data.pack import ShardWriter, index_header, write_json_atomic
from lmforge.data.pii import redact_pii
from lmforge.data.scorecard import Scorecard
from lmforge.errors import LmforgeError
from lmforge.io.progress import Progress

# Preferred end-of-document tokens, before falling back to the tokenizer's EOS.
DOCUMENT_END_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")


def _copies(weight: float, text: str) -> int:
    """How many times a training document enters the mix for a source weight.

    The whole part repeats the document; the fractional part keeps it with that
    probability, decided by a hash of the text so that runs are reproducible.
    """
    whole = int(weight)
    frac = weight - whole
    if frac > 0:
        u = int.from_bytes(hashlib.blake2b(("mix" + text).encode(), digest_size=8).digest(), "big") / 2**64
        whole += u < frac
    return whole


def _prepare_output(out: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LmforgeError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise LmforgeError(f"cannot create the output directory {out}: {exc.strerror or exc}") from None


def _commit_output(tmp: Path, out: Path) -> None:
    """Swap the finished temporary directory into place (the old one goes only after)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_prepare(config: PrepareConfig) -> dict[str, Any]:
    """Run the whole pipeline; returns the index (also written to OUT/index.json)."""
    config.validate()
    sources: list[tuple[str, Source]] = []
    for spec in config.sources:
        sources += [(spec, s) for s in open_sources(spec, config.split_docs, config.text_field)]
    decontaminator = (Decontaminator.from_files(config.decontaminate, n=config.decontam_n)
                      if config.decontaminate else None)
    tokenizer = eos_id = None
    if config.pack:
        from lmforge.model.loading import resolve_tokenizer

        tokenizer = resolve_tokenizer(config.tokenizer)
        eos_id = _document_end_id(tokenizer, config.eos_token)

    out = Path(config.out).expanduser()
    tmp = _prepare_output(out, config.overwrite)
    try:
        index = _run(config, sources, decontaminator, tokenizer, eos_id, tmp)
        _commit_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def _document_end_id(tokenizer: Any, eos_token: str | None) -> int:
    if eos_token is not None:
        tid = tokenizer.token_to_id(eos_token)
        if tid is None:
            raise LmforgeError(f"--eos-token {eos_token!r} is not in the tokenizer's vocabulary")
        return tid
    for token in DOCUMENT_END_TOKENS:
        tid = tokenizer.token_to_id(token)
        if tid is not None and tid in tokenizer.special_ids:
            return tid
    if tokenizer.eos_id is not None:
        return tokenizer.eos_id
    raise LmforgeError("the tokenizer has no end-of-sequence token; name one with --eos-token")


def _run(config: PrepareConfig, sources: list[tuple[str, Source]], decontaminator: Decontaminator | None,
         tokenizer: Any, eos_id: int | None, tmp: Path) -> dict[str, Any]:
    card = Scorecard()
    qconfig = QualityConfig(min_words=config.min_words)
    exact = ExactDeduplicator()
    near = NearDuplicateIndex(config.near_dup_threshold, config.num_perm, config.shingle_size)
    paragraphs = ParagraphDeduplicator()
    allowed = set(config.languages) if config.languages else None
    writers: dict[str, ShardWriter] = {}
    text_files: dict[str, TextIO] = {}
    if config.write_text:
        (tmp / "text").mkdir()
    total_bytes = sum(s.size for _, s in sources)
    done_bytes = 0
    progress = Progress("prepare", unit="docs", enabled=config.progress, log_every=5.0)
    docs_read = bytes_read = 0
    decontam_removed = 0

    def writer(split: str) -> ShardWriter:
        if split not in writers:
            writers[split] = ShardWriter(tmp, split, config.seq_len, eos_id, tokenizer.vocab_size,  # type: ignore[arg-type]
                                         config.rows_per_shard)
        return writers[split]

    try:
        for spec, source in sources:
            if config.max_docs is not None and docs_read >= config.max_docs:
                break
            weight = config.weights.get(spec, 1.0)
            for doc in source:
                if config.max_docs is not None and docs_read >= config.max_docs:
                    break
                raw_bytes = len(doc.text.encode("utf-8"))
                docs_read += 1
                bytes_read += raw_bytes
                card.source(spec, 1, raw_bytes)
                card.passed("load", raw_bytes, raw_bytes)
                fraction = (done_bytes + source.progress() * source.size) / total_bytes if total_bytes else None
                progress.update(docs_read, fraction=fraction, nbytes=bytes_read)

                text = clean_text(doc.text, config.unicode_form, config.html)
                nbytes = len(text.encode("utf-8"))
                if not text.strip():
                    card.dropped("clean", raw_bytes, "empty_after_cleaning")
                    continue
                card.passed("clean", raw_bytes, nbytes)

                guess = identify_language(text)
                if allowed is not None and guess.lang not in allowed:
                    card.dropped("language", nbytes, f"lang_{guess.lang}")
                    continue
                card.passed("language", nbytes, nbytes)

                if config.quality:
                    reasons = quality_reasons(text, guess.lang, qconfig)
                    if reasons:
                        card.quality_reasons.update(reasons)
                        card.dropped("quality", nbytes, reasons[0])
                        continue
                    card.passed("quality", nbytes, nbytes)

                if config.dedup:
                    if exact.seen(text):
                        card.dropped("exact_dedup", nbytes, "exact_duplicate")
                        continue
                    card.passed("exact_dedup", nbytes, nbytes)
                    if near.check(doc.id, text) is not None:
                        card.dropped("near_dedup", nbytes, "near_duplicate")
                        continue
                    card.passed("near_dedup", nbytes, nbytes)
                    if config.paragraph_dedup:
                        text = paragraphs.filter(text)
                        after = len(text.encode("utf-8"))
                        if not text.strip():
                            card.dropped("paragraph_dedup", nbytes, "all_paragraphs_repeated")
                            continue
                        card.passed("paragraph_dedup", nbytes, after)
                        nbytes = after

                if config.redact_pii:
                    result = redact_pii(text)
                    if result.matches:
                        card.pii.update(result.counts)
                        card.pii_docs += 1
                        text = result.text
                    after = len(text.encode("utf-8"))
                    card.passed("pii", nbytes, after)
                    nbytes = after

                if decontaminator is not None:
                    if decontaminator.contaminated(text):
                        decontam_removed += 1
                        card.dropped("decontaminate", nbytes, "eval_ngram_overlap")
                        continue
                    card.passed("decontaminate", nbytes, nbytes)

                card.languages[guess.lang] += 1
                card.language_bytes[guess.lang] += nbytes
                card.scripts[guess.script] += 1
                card.observe_kept_text(text)
                split = split_of(text, config.val_fraction, config.test_fraction, config.split_salt)
                card.passed("split", nbytes, nbytes)
                split_counts = card.splits.setdefault(split, {"documents": 0, "bytes": 0})
                split_counts["documents"] += 1
                split_counts["bytes"] += nbytes
                if config.write_text:
                    if split not in text_files:
                        text_files[split] = open(tmp / "text" / f"{split}.jsonl", "w", encoding="utf-8")
                    text_files[split].write(json.dumps({"id": doc.id, "source": spec, "lang": guess.lang,
                                                        "text": text}, ensure_ascii=False) + "\n")
                if tokenizer is not None:
                    ids = tokenizer.encode(text, add_special_tokens=False)
                    copies = _copies(weight, text) if split == "train" else 1
                    for _ in range(copies):
                        writer(split).add(ids)
            done_bytes += source.size
    finally:
        for f in text_files.values():
            f.close()

    card.info["paragraph_dedup"] = {"paragraphs_removed": paragraphs.paragraphs_removed,
                                    "paragraph_bytes_removed": paragraphs.bytes_removed}
    if decontaminator is not None:
        card.info["decontamination"] = {"files": list(config.decontaminate), "n": config.decontam_n,
                                        "eval_items": decontaminator.items, "eval_ngrams": decontaminator.num_ngrams,
                                        "docs_removed": decontam_removed}
    card.info["config"] = {k: v for k, v in asdict(config).items() if k not in ("progress", "overwrite")}

    index = index_header(config.seq_len, tokenizer, config.tokenizer or "default model", eos_id)
    if tokenizer is not None:
        for split in SPLITS:
            if split in writers:
                entry = writers[split].close()
                index["splits"][split] = entry
                card.splits.setdefault(split, {}).update(
                    {"tokens": entry["tokens"], "rows": entry["rows"], "packed_documents": entry["documents"]})
        write_json_atomic(tmp / "index.json", index)
    write_json_atomic(tmp / "scorecard.json", card.to_dict())
    (tmp / "scorecard.md").write_text(card.to_markdown(), encoding="utf-8")
    summary = card.to_dict()["summary"]
    progress.close(f"prepared {summary['docs_out']:,} of {summary['docs_in']:,} documents"
                  + (f", {sum(e['tokens'] for e in index['splits'].values()):,} tokens" if index["splits"] else ""))
    index["scorecard"] = card.to_dict()
    return index
