"""``lmforge tokenizer ...``: train BPE / WordPiece / Unigram tokenizers, compare their quality."""

from __future__ import annotations

import argparse
import json
import time


def cmd_train(args: argparse.Namespace) -> int:
    from lmforge.errors import LmforgeError
    from lmforge.io.progress import Progress
    from lmforge.tokenizer.train import read_training_texts, train_tokenizer

    if args.vocab_size < 2:
        raise LmforgeError("--vocab-size must be at least 2")
    options = {}
    if args.algo == "wordpiece":
        options["score"] = args.wordpiece_score
    started = time.perf_counter()
    progress = Progress(f"train {args.algo}", enabled=not args.quiet,
                        unit="pieces left" if args.algo == "unigram" else "merges")
    texts = list(read_training_texts(args.input, args.text_field))
    tok = train_tokenizer(texts, args.algo, args.vocab_size,
                          special_tokens=args.special_tokens, min_frequency=args.min_frequency,
                          pre_tokenization=args.pre_tokenization, lowercase=args.lowercase,
                          progress=progress, **options)
    seconds = time.perf_counter() - started
    tok.save(args.out)
    progress.close(f"trained {args.algo} with {tok.vocab_size:,} tokens")
    sample = texts[: 200]
    n_tokens = sum(len(tok.encode(t, add_special_tokens=False)) for t in sample)
    n_bytes = sum(len(t.encode("utf-8")) for t in sample)
    summary = {"algo": args.algo, "vocab_size": tok.vocab_size, "out": args.out, "seconds": round(seconds, 2),
               "training_bytes_per_token": round(n_bytes / n_tokens, 3) if n_tokens else None}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out}/tokenizer.json: {args.algo}, {tok.vocab_size:,} tokens, trained in "
              f"{seconds:.1f}s; {summary['training_bytes_per_token']} bytes/token on the training text")
    return 0


def _named(specs: list[str]) -> dict[str, str]:
    named = {}
    for spec in specs:
        name, sep, where = spec.partition("=")
        named[name if sep else spec] = where if sep else spec
    return named


def cmd_report(args: argparse.Namespace) -> int:
    from lmforge.data.langid import identify_language
    from lmforge.data.samples import MULTILINGUAL_SAMPLES
    from lmforge.errors import LmforgeError
    from lmforge.model.loading import resolve_tokenizer
    from lmforge.tokenizer.train import read_training_texts
    from lmforge.tokenizer.train.report import quality_report, report_markdown

    specs = _named(args.tokenizer)
    if args.default_model:
        specs["default model"] = ""
    if not specs:
        raise LmforgeError("give at least one --tokenizer (or --default-model)")
    tokenizers = {name: resolve_tokenizer(where or None) for name, where in specs.items()}
    groups: dict[str, list[str]] = {}
    for text in read_training_texts(args.heldout, args.text_field) if args.heldout else ():
        guess = identify_language(text)
        groups.setdefault(f"{guess.lang} ({guess.script}), held-out files", []).append(text)
    if not args.no_samples:
        for lang, texts in MULTILINGUAL_SAMPLES.items():
            groups.setdefault(f"{lang} ({identify_language(texts[0]).script}), samples", []).extend(texts)
    report = quality_report(tokenizers, groups)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, ensure_ascii=False, indent=2)
    print(json.dumps(report, ensure_ascii=False) if args.json else report_markdown(report))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="train tokenizers (BPE, WordPiece, Unigram) and compare them")
    verbs = parser.add_subparsers(dest="tokenizer_command", required=True, metavar="VERB")

    p = verbs.add_parser("train", help="train a tokenizer and save tokenizer.json")
    p.add_argument("--algo", choices=("bpe", "wordpiece", "unigram"), default="bpe")
    p.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary, special ones included")
    p.add_argument("--input", nargs="+", required=True,
                   help="training files: .txt/.md (blank-line-separated blocks) or .jsonl (a text field), "
                        "e.g. the text/train.jsonl that `lmforge data prepare` writes")
    p.add_argument("--out", required=True, help="output directory (tokenizer.json, tokenizer_config.json)")
    p.add_argument("--special-tokens", nargs="*", help="default: <|endoftext|> (bpe); [PAD] [UNK] [CLS] [SEP] "
                                                       "[MASK] (wordpiece); <unk> <s> </s> (unigram)")
    p.add_argument("--min-frequency", type=int, help="fewest occurrences for a merge (bpe 0, wordpiece 2)")
    p.add_argument("--pre-tokenization", choices=("gpt2", "llama3"), default="gpt2", help="BPE split regex")
    p.add_argument("--lowercase", action="store_true", help="WordPiece: lowercase (uncased vocabulary)")
    p.add_argument("--wordpiece-score", choices=("likelihood", "ratio"), default="likelihood",
                   help="WordPiece pair score: likelihood gain (default) or freq(ab)/(freq(a)freq(b))")
    p.add_argument("--text-field", default="text", help="JSONL field with the text")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("report", help="bytes/token, unknown rate and round trips per language")
    p.add_argument("--tokenizer", action="append", default=[], metavar="[NAME=]SPEC",
                   help="tokenizer.json, a directory, a .gguf or a model name; repeatable")
    p.add_argument("--default-model", action="store_true", help="also measure the default model's tokenizer")
    p.add_argument("--heldout", nargs="*", default=[], help="held-out .txt/.jsonl files, grouped by language")
    p.add_argument("--no-samples", action="store_true", help="leave out the built-in multilingual samples")
    p.add_argument("--text-field", default="text")
    p.add_argument("--out", help="also write the report as JSON to this file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_report)

