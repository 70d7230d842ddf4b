"""``lmforge data ...``: prepare corpora into packed shards, validate dataset files."""

from __future__ import annotations

import argparse
import json
import sys


def _weights(values: list[str]) -> dict[str, float]:
    from lmforge.errors import LmforgeError

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


def cmd_prepare(args: argparse.Namespace) -> int:
    from lmforge.data.pipeline import PrepareConfig, run_prepare

    config = PrepareConfig(
        sources=args.source, out=args.out, tokenizer=args.tokenizer, pack=not args.no_pack,
        seq_len=args.seq_len, rows_per_shard=args.rows_per_shard, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, split_salt=args.split_salt, eos_token=args.eos_token,
        weights=_weights(args.weight), split_docs=args.split_docs, text_field=args.text_field,
        unicode_form=args.unicode, html=args.html, languages=args.languages.split(",") if args.languages else None,
        quality=not args.no_quality, min_words=args.min_words, dedup=not args.no_dedup,
        near_dup_threshold=args.near_dup_threshold, num_perm=args.num_perm, shingle_size=args.shingle_size,
        paragraph_dedup=not args.no_paragraph_dedup, redact_pii=not args.no_pii,
        decontaminate=args.decontaminate, decontam_n=args.decontam_n, write_text=not args.no_text,
        max_docs=args.max_docs, overwrite=args.overwrite, progress=not args.quiet,
    )
    index = run_prepare(config)
    card = index.pop("scorecard")
    for split, entry in index["splits"].items():
        if entry["documents"] and not entry["rows"]:
            print(f"warning: the {split} split has {entry['documents']} document(s) but fewer than "
                  f"--seq-len {config.seq_len} tokens, so no row was written; raise its fraction "
                  "or lower --seq-len", file=sys.stderr)
    if args.json:
        print(json.dumps({"out": args.out, **index, "summary": card["summary"]}, ensure_ascii=False))
    else:
        s = card["summary"]
        print(f"wrote {args.out}: kept {s['docs_out']:,}/{s['docs_in']:,} documents, "
              f"{s['bytes_out'] / 1e6:.2f}/{s['bytes_in'] / 1e6:.2f} MB; scorecard in {args.out}/scorecard.md")
        for split, entry in index["splits"].items():
            print(f"  {split}: {entry['documents']:,} docs, {entry['tokens']:,} tokens, {entry['rows']:,} rows "
                  f"of {config.seq_len} in {len(entry['shards'])} shard(s)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from lmforge.data.formats import load_records, summarize

    fmt, records, errors = load_records(args.file, None if args.format == "auto" else args.format,
                                        strict=not args.lenient)
    summary = summarize(fmt, records)
    summary["invalid_records"] = len(errors)
    if errors:
        for e in errors[:20]:
            print(f"invalid: {e}", file=sys.stderr)
    print(json.dumps(summary, ensure_ascii=False) if args.json else
          "  ".join(f"{k}: {v}" for k, v in summary.items()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="prepare training data: clean, dedup, PII, pack; validate datasets")
    verbs = parser.add_subparsers(dest="data_command", required=True, metavar="VERB")

    p = verbs.add_parser("prepare", help="corpora -> cleaned, deduplicated, packed token shards + scorecard")
    p.add_argument("--source", action="append", required=True,
                   help="wiki, news, bgwiki (gensim test corpora), a file (.txt .md .jsonl .xml[.bz2]) "
                        "or a directory; repeatable")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", help="tokenizer.json, a directory with one, a .gguf or a model name "
                                       "(default: the default model's tokenizer)")
    p.add_argument("--no-pack", action="store_true", help="clean and score only; write no token shards")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per packed row (default 1024)")
    p.add_argument("--rows-per-shard", type=int, default=1024, help="rows per .npy shard (default 1024)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for validation (0.01)")
    p.add_argument("--test-fraction", type=float, default=0.0, help="share of documents for test (0)")
    p.add_argument("--split-salt", default="", help="change to draw a different (still deterministic) split")
    p.add_argument("--eos-token", help="token appended after each document (default: <|endoftext|> or EOS)")
    p.add_argument("--weight", action="append", default=[], metavar="SOURCE=W",
                   help="mixture weight of a source in the train split (2 = twice, 0.5 = half); repeatable")
    p.add_argument("--split-docs", choices=("file", "line", "blank"), default="file",
                   help="plain-text files: one document per file, per line, or per blank-line-separated block")
    p.add_argument("--text-field", default="text", help="JSONL field with the text (default 'text')")
    p.add_argument("--unicode", default="NFC", choices=("NFC", "NFKC", "none"), help="normalization form")
    p.add_argument("--html", default="auto", choices=("auto", "always", "never"), help="strip HTML tags")
    p.add_argument("--languages", help="keep only these languages, e.g. en,de (default: all)")
    p.add_argument("--no-quality", action="store_true", help="skip the heuristic quality filters")
    p.add_argument("--min-words", type=int, default=30, help="quality filter: fewest words (default 30)")
    p.add_argument("--no-dedup", action="store_true", help="skip exact, near and paragraph deduplication")
    p.add_argument("--near-dup-threshold", type=float, default=0.8, help="Jaccard threshold (default 0.8)")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
    p.add_argument("--shingle-size", type=int, default=5, help="words per shingle (default 5)")
    p.add_argument("--no-paragraph-dedup", action="store_true", help="keep repeated paragraphs")
    p.add_argument("--no-pii", action="store_true", help="do not redact PII")
    p.add_argument("--decontaminate", nargs="+", default=[], metavar="FILE",
                   help="evaluation files (.txt lines, .json, .jsonl, optionally .gz): drop documents "
                        "sharing an n-gram with them")
    p.add_argument("--decontam-n", type=int, default=13, help="n-gram length for decontamination (default 13)")
    p.add_argument("--no-text", action="store_true", help="do not write the cleaned text (text/*.jsonl)")
    p.add_argument("--max-docs", type=int, help="stop after reading this many documents")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true", help="print the index and summary as one JSON object")
    p.set_defaults(func=cmd_prepare)

    p = verbs.add_parser("validate", help="check an SFT / chat / preference / classification dataset file")
    p.add_argument("file", help="a .jsonl or .json file")
    p.add_argument("--format", default="auto",
                   choices=("auto", "alpaca", "chat", "sharegpt", "preference", "classification"))
    p.add_argument("--lenient", action="store_true", help="report bad records instead of failing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_validate)
