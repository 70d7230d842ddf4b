"""The settings of ``lmforge data prepare`` (`PrepareConfig`), apart from the pipeline.

Kept free of the pipeline's imports (NumPy, the dedup index) so that the command line,
which generates its flags from these fields, starts without loading them.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.options import option


def _source_weights(values: list[str]) -> dict[str, float]:
    """``--weight wiki=2 --weight news=0.5`` -> {"wiki": 2.0, "news": 0.5}."""
    out = {}
    for item in values:
        name, sep, weight = item.rpartition("=")
        try:
            if not sep:
                raise ValueError
            out[name] = float(weight)
        except ValueError:
            raise LmforgeError(f"--weight expects SOURCE=NUMBER, got {item!r}") from None
    return out


@dataclass
class PrepareConfig:
    """Every option of ``lmforge data prepare``: each field is also its flag."""

    sources: list[str] = option(flag="--source", repeat=True,
                                help="wiki, news, bgwiki (gensim test corpora), a file (.txt .md .jsonl .xml[.bz2]) "
                                     "or a directory; repeatable")
    out: str = option(help="output directory")
    tokenizer: str | None = option(None, help="tokenizer.json, a directory with one, a .gguf or a model name "
                                              "(default: the default model's tokenizer)")
    pack: bool = option(True, help="clean and score only; write no token shards")
    seq_len: int = option(1024, help="tokens per packed row")
    rows_per_shard: int = option(1024, help="rows per .npy shard")
    val_fraction: float = option(0.01, help="share of documents for validation")
    test_fraction: float = option(0.0, help="share of documents for test")
    split_salt: str = option("", help="change to draw a different (still deterministic) split")
    eos_token: str | None = option(None, help="token appended after each document (default: <|endoftext|> or EOS)")
    weights: dict[str, float] = option(default_factory=dict, flag="--weight", repeat=True, metavar="SOURCE=W",
                                       parse=_source_weights,
                                       help="mixture weight of a source in the train split (2 = twice, 0.5 = half); "
                                            "repeatable")
    split_docs: str = option("file", choices=("file", "line", "blank"),
                             help="plain-text files: one document per file, per line, or per blank-line-separated "
                                  "block")
    text_field: str = option("text", help="JSONL field with the text")
    unicode_form: str = option("NFC", flag="--unicode", choices=("NFC", "NFKC", "none"), help="normalization form")
    html: str = option("auto", choices=("auto", "always", "never"), help="strip HTML tags")
    languages: list[str] | None = option(None, parse=lambda text: text.split(","),
                                         help="keep only these languages, e.g. en,de (default: all)")
    quality: bool = option(True, help="skip the heuristic quality filters")
    min_words: int = option(30, help="quality filter: fewest words")
    dedup: bool = option(True, help="skip exact, near and paragraph deduplication")
    near_dup_threshold: float = option(0.8, help="Jaccard threshold of near duplicates")
    num_perm: int = option(128, help="MinHash permutations")
    shingle_size: int = option(5, help="words per shingle")
    paragraph_dedup: bool = option(True, help="keep repeated paragraphs")
    redact_pii: bool = option(True, flag="--no-pii", help="do not redact PII")
    decontaminate: list[str] = option(default_factory=list, nargs="+", metavar="FILE",
                                      help="evaluation files (.txt lines, .json, .jsonl, optionally .gz): drop "
                                           "documents sharing an n-gram with them")
    decontam_n: int = option(13, help="n-gram length for decontamination")
    write_text: bool = option(True, flag="--no-text", help="do not write the cleaned text (text/*.jsonl)")
    max_docs: int | None = option(None, help="stop after reading this many documents")
    overwrite: bool = option(False, help="replace OUT if it exists")
    progress: bool = option(True, flag="--quiet", help="no progress on stderr")

    def validate(self) -> None:
        if not self.sources:
            raise LmforgeError("give at least one --source")
        if self.seq_len < 2:
            raise LmforgeError("--seq-len must be at least 2")
        if self.rows_per_shard < 1:
            raise LmforgeError("--rows-per-shard must be positive")
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1 \
                or self.val_fraction + self.test_fraction >= 1:
            raise LmforgeError("--val-fraction and --test-fraction must be in [0, 1) and sum to less than 1")
        if not 0 < self.near_dup_threshold <= 1:
            raise LmforgeError("--near-dup-threshold must be in (0, 1]")
        if self.unicode_form not in ("NFC", "NFKC", "none"):
            raise LmforgeError("--unicode must be NFC, NFKC or none")
        unknown = set(self.weights) - set(self.sources)
        if unknown:
            raise LmforgeError(f"--weight names {', '.join(sorted(unknown))}, which is not a --source")
        if any(w < 0 for w in self.weights.values()):
            raise LmforgeError("source weights must be >= 0")
