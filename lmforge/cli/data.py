"""``lmforge data ...``: prepare corpora into packed shards, validate dataset files."""

from __future__ import annotations

import argparse
import json
import sys

from lmforge.cli.common import add_config_flags, config_from_args


def cmd_prepare(args: argparse.Namespace) -> int:
    from lmforge.data.pipeline import PrepareConfig, run_prepare

    config = config_from_args(PrepareConfig, args)
    index = run_prepare(config)
    card = index.pop("scorecard")
    for split, entry in index["splits"].items():
        if entry["documents"] and not entry["rows"]:
            print(f"warning: the {split} split has {entry['documents']} document(s) but fewer than "
                  f"--seq-len {config.seq_len} tokens, so no row was written; raise its fraction "
                  "or lower --seq-len", file=sys.stderr)
    if args.json:
        print(json.dumps({"out": config.out, **index, "summary": card["summary"]}, ensure_ascii=False))
    else:
        s = card["summary"]
        print(f"wrote {config.out}: kept {s['docs_out']:,}/{s['docs_in']:,} documents, "
              f"{s['bytes_out'] / 1e6:.2f}/{s['bytes_in'] / 1e6:.2f} MB; scorecard in {config.out}/scorecard.md")
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

    from lmforge.data.config import PrepareConfig

    p = verbs.add_parser("prepare", help="corpora -> cleaned, deduplicated, packed token shards + scorecard")
    add_config_flags(p, PrepareConfig)
    p.add_argument("--json", action="store_true", help="print the index and summary as one JSON object")
    p.set_defaults(func=cmd_prepare)

    p = verbs.add_parser("validate", help="check an SFT / chat / preference / classification dataset file")
    p.add_argument("file", help="a .jsonl or .json file")
    p.add_argument("--format", default="auto",
                   choices=("auto", "alpaca", "chat", "sharegpt", "preference", "classification"))
    p.add_argument("--lenient", action="store_true", help="report bad records instead of failing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_validate)
