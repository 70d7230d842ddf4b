"""`lmforge eval perplexity [MODEL] --file F`: perplexity and bits per byte of a text.

With `--base-url` the log-probabilities come from an OpenAI-compatible endpoint (echo +
logprobs on /v1/completions); the text is tokenized here with `--tokenizer`, so local and
remote runs score the same token ids and report the same figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.cli.common import MODEL_HELP, add_device_flags, add_remote_flags, check_remote_arguments, load_local
from lmforge.errors import LmforgeError
from lmforge.io import text_files


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("perplexity", help="perplexity and bits per byte of a text (sliding window)",
                         description="Score a text with a sliding window: every token is predicted once, "
                                     "with up to WINDOW tokens of context.")
    p.add_argument("model", nargs="?", help=MODEL_HELP + "; with --base-url: the served model's name "
                                                       "(default: the first one the endpoint lists)")
    p.add_argument("--file", required=True, action="append",
                   help="text file (.txt: the whole file is one text; .jsonl: one {\"text\": ...} per line); repeatable")
    p.add_argument("--window", type=int, help="tokens the model reads per slice (default: its context, at most 2048)")
    p.add_argument("--stride", type=int, help="tokens between slice starts (default: half the window)")
    p.add_argument("--no-prefix", action="store_true",
                   help="do not put BOS before each text (its first token is then context, not scored)")
    p.add_argument("--batch-tokens", type=int, default=4096,
                   help="tokens per forward pass, or per request with --base-url (default 4096)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--out", help="directory for perplexity.json and perplexity.md")
    add_device_flags(p)
    add_remote_flags(p, scoring=True,
                     needs="it must answer /v1/completions with echo + logprobs + max_tokens=0 for token-id prompts")
    p.set_defaults(func=run)


def read_texts(path: str) -> list[str]:
    file = Path(path)
    raw = text_files.read_text(file, "text")
    if file.suffix != ".jsonl":
        return [raw] if raw.strip() else []
    return [text_files.text_of(record, f"{file}:{number}") for number, record in text_files.parse_jsonl(raw.splitlines(), file)]


def run(args: argparse.Namespace) -> int:
    from lmforge.eval.perplexity import DEFAULT_MAX_WINDOW, ModelScorer, perplexity, plan_windows
    from lmforge.eval.report import markdown_table, write_report
    from lmforge.io.progress import Progress

    texts = [t for f in args.file for t in read_texts(f)]
    if not texts:
        raise LmforgeError("no text to score (the file is empty)")
    if args.window is not None:
        plan_windows(0, args.window, args.stride or max(1, args.window // 2))  # flag errors before loading
    if args.batch_tokens < 1:
        raise LmforgeError("--batch-tokens must be positive")
    check_remote_arguments(args)
    if args.base_url:
        from lmforge.eval.remote import connect_scorer

        scorer = connect_scorer(args.base_url, args.api_key, args.model, args.tokenizer,
                                batch_tokens=args.batch_tokens, timeout=args.request_timeout, retries=args.retries)
        name, tokenizer = scorer.name, scorer.tokenizer
    else:
        lm = load_local(args.model, args)
        scorer = ModelScorer(lm.model, batch_tokens=args.batch_tokens)
        name, tokenizer = lm.name, lm.tokenizer
    # An endpoint that does not report its context gets the local default; one that is too
    # long for it is refused by the endpoint with its own message.
    window = args.window or min(scorer.context or DEFAULT_MAX_WINDOW, DEFAULT_MAX_WINDOW)
    stride = args.stride or max(1, window // 2)
    progress = Progress("perplexity", unit="windows")
    try:
        result = perplexity(scorer, texts, tokenizer=tokenizer, window=window, stride=stride,
                            prefix_token=None if args.no_prefix else "auto", progress=progress)
    finally:
        progress.close()
    data = {"model": name, "files": args.file, "window": window, "stride": stride, **result.to_dict()}
    if args.base_url:
        data["base_url"] = scorer.remote.base_url
    if args.out:
        rows = [[name, result.documents, result.tokens, result.bytes, result.mean_nll, result.ppl,
                 result.bits_per_token, result.bpb]]
        where = f" Scored through {scorer.remote.base_url}." if args.base_url else ""
        md = (f"# Perplexity\n\nFiles: {', '.join(args.file)}; window {window} tokens, stride {stride}.{where}\n\n"
              + markdown_table(["model", "texts", "tokens", "bytes", "nll/token", "ppl", "bits/token", "bits/byte"], rows))
        json_path, _ = write_report(args.out, "perplexity", data, md)
        print(f"wrote {json_path} and perplexity.md", file=sys.stderr)
    if args.json:
        print(json.dumps(data, ensure_ascii=False))
    else:
        bpb = "n/a" if result.bpb is None else f"{result.bpb:.4f}"
        print(f"{name}: perplexity {result.ppl:.4f}, {bpb} bits/byte, {result.mean_nll:.4f} nats/token "
              f"over {result.tokens} tokens ({result.bytes} bytes, {result.windows} windows of {window}, stride {stride})")
    return 0
