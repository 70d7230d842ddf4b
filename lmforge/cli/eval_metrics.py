"""`lmforge eval metrics --predictions F --references F`: BLEU, chrF, ROUGE and METEOR."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.io import text_files

SEGMENTS_HELP = ("one segment per line (.txt), or .jsonl with one JSON string, list of strings "
                 "(several references) or object with \"text\"/\"references\" per line")


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("metrics", help="BLEU, chrF, ROUGE and METEOR of predictions against references")
    p.add_argument("--predictions", required=True, help="predictions: " + SEGMENTS_HELP)
    p.add_argument("--references", required=True, action="append",
                   help="references, aligned with the predictions; repeat the flag for more references per segment")
    p.add_argument("--metrics", default="bleu,chrf,rouge,meteor", help="comma-separated (default: all four)")
    p.add_argument("--lang", help="target language, e.g. zh, ja, ko (CJK-aware tokenization) or de; default English")
    p.add_argument("--no-stem", action="store_true", help="no Porter stemming in ROUGE and METEOR")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--out", help="directory for metrics.json and metrics.md")
    p.set_defaults(func=run)


def read_segments(path: str, key: str) -> list[str | list[str]]:
    file = Path(path)
    raw = text_files.read_text(file, key)
    if file.suffix != ".jsonl":
        return raw.splitlines()
    segments: list[str | list[str]] = []
    for number, record in text_files.parse_jsonl(raw.splitlines(), file):
        if isinstance(record, dict):
            record = record.get("references", record.get("reference", record.get("text", record.get("prediction"))))
        if isinstance(record, list) and record and all(isinstance(r, str) for r in record):
            segments.append(record)
        elif isinstance(record, str):
            segments.append(record)
        else:
            raise LmforgeError(f"{file}:{number}: expected a string, a list of strings or an object with \"text\"")
    return segments


def run(args: argparse.Namespace) -> int:
    from lmforge.eval.metrics import METRICS, compute_metrics
    from lmforge.eval.report import markdown_table, write_report
    from lmforge.io.progress import Progress

    names = [m.strip().lower() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise LmforgeError(f"unknown metric(s) {', '.join(unknown) or '(none)'} (choose from {', '.join(METRICS)})")
    predictions = read_segments(args.predictions, "predictions")
    if any(not isinstance(p, str) for p in predictions):
        raise LmforgeError(f"{args.predictions}: a prediction must be one string")
    per_file = [read_segments(f, "references") for f in args.references]
    for f, refs in zip(args.references, per_file):
        if len(refs) != len(predictions):
            raise LmforgeError(f"{len(predictions)} predictions but {len(refs)} references in {f}")
    references = [[r for refs in per_file for r in ([refs[i]] if isinstance(refs[i], str) else refs[i])]
                  for i in range(len(predictions))]
    progress = Progress("metrics", unit="segments")
    try:
        scores = compute_metrics(predictions, references, names, lang=args.lang,  # type: ignore[arg-type]
                                 stem=not args.no_stem, progress=progress)
    finally:
        progress.close()
    data = {"predictions": args.predictions, "references": args.references, "segments": len(predictions),
            "lang": args.lang or "en", "stem": not args.no_stem, "scores": scores}
    rows = summary_rows(scores)
    if args.out:
        md = (f"# Text metrics\n\n{len(predictions)} segments of {args.predictions} against "
              f"{', '.join(args.references)} (language: {args.lang or 'en'}).\n\n"
              + markdown_table(["metric", "score", "detail"], rows))
        for name in ("bleu", "chrf"):
            if name in scores:
                md += f"\n{name} signature: `{scores[name]['signature']}`\n"
        json_path, _ = write_report(args.out, "metrics", data, md)
        print(f"wrote {json_path} and metrics.md", file=sys.stderr)
    if args.json:
        print(json.dumps(data, ensure_ascii=False))
    else:
        width = max(len(r[0]) for r in rows)
        for name, score, detail in rows:
            print(f"{name:<{width}}  {score:8.4f}  {detail}")
    return 0


def summary_rows(scores: dict) -> list[list]:
    rows: list[list] = []
    if "bleu" in scores:
        b = scores["bleu"]
        rows.append(["BLEU", b["score"], "precisions " + "/".join(f"{p:.1f}" for p in b["precisions"])
                     + f", BP {b['brevity_penalty']:.3f}"])
    if "chrf" in scores:
        rows.append(["chrF", scores["chrf"]["score"], ""])
    for kind, s in scores.get("rouge", {}).items():
        rows.append([kind, s["f"], f"P {s['precision']:.4f} R {s['recall']:.4f}"])
    if "meteor" in scores:
        rows.append(["METEOR", scores["meteor"]["score"], ""])
    return rows
