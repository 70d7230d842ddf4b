"""`lmforge eval ratings --file annotations.jsonl`: Likert summaries, win rates, Elo, Bradley-Terry, kappa."""

from __future__ import annotations

import argparse
import json
import sys

from lmforge.errors import LmforgeError


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("ratings", help="human ratings: Likert means, win rates, Elo, Bradley-Terry, agreement")
    p.add_argument("--file", required=True, help="annotations (JSONL: Likert ratings and/or pairwise judgements)")
    p.add_argument("--export-pairs", metavar="OUT", help="write prompt/chosen/rejected JSONL of majority preferences")
    p.add_argument("--interval", choices=("wilson", "bootstrap"), default="wilson",
                   help="confidence interval of win rates (default wilson)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level (default 0.95)")
    p.add_argument("--k", type=float, default=32.0, help="Elo K-factor (default 32)")
    p.add_argument("--initial", type=float, default=1000.0, help="initial Elo rating (default 1000)")
    p.add_argument("--bt-prior", type=float, default=0.0,
                   help="virtual games per pair of systems in Bradley-Terry (keeps strengths finite)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--out", help="directory for ratings.json and ratings.md")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmforge.eval.human import load_annotations, preference_pairs, summarize
    from lmforge.eval.report import json_safe, write_jsonl, write_report

    if not 0 < args.confidence < 1:
        raise LmforgeError("--confidence must be between 0 and 1")
    if args.k <= 0 or args.bt_prior < 0:
        raise LmforgeError("--k must be positive and --bt-prior not negative")
    annotations = load_annotations(args.file)
    summary = summarize(annotations, args.interval, args.confidence, args.k, args.initial, args.bt_prior, args.seed)
    summary = {"file": args.file, **summary}
    if args.export_pairs:
        if not annotations.comparisons:
            raise LmforgeError(f"{args.file} has no pairwise judgements to export")
        pairs = preference_pairs(annotations.comparisons)
        write_jsonl(args.export_pairs, pairs)
        summary["exported_pairs"] = {"path": args.export_pairs, "pairs": len(pairs)}
        print(f"wrote {len(pairs)} preference pairs to {args.export_pairs}", file=sys.stderr)
    md = render_markdown(summary)
    if args.out:
        json_path, _ = write_report(args.out, "ratings", summary, md)
        print(f"wrote {json_path} and ratings.md", file=sys.stderr)
    if args.json:
        print(json.dumps(json_safe(summary), ensure_ascii=False))
    else:
        print(md, end="")
    return 0


def _kappa_line(name: str, a: dict) -> str:
    if a.get("kappa") is None:
        return f"- {name}: no unit was judged by two or more raters\n"
    method = "Cohen's kappa" if a["method"] == "cohen" else f"Fleiss' kappa ({a['raters_per_unit']} raters per unit)"
    return (f"- {name}: {method} = {a['kappa']:.3f}, raw agreement {a['observed_agreement']:.3f} "
            f"({a['units']} units, {a['raters']} raters, {a['skipped_units']} units skipped)\n")


def render_markdown(summary: dict) -> str:
    from lmforge.eval.report import markdown_table

    md = f"# Human evaluation\n\n{summary['ratings']} Likert ratings, {summary['comparisons']} pairwise judgements ({summary['file']}).\n"
    if "likert" in summary:
        md += "\n## Likert ratings\n\n" + markdown_table(
            ["criterion", "system", "n", "mean", "sd", "ci low", "ci high", "distribution"],
            [[r["criterion"], r["system"], r["n"], r["mean"], r["sd"], r["ci_low"], r["ci_high"],
              " ".join(f"{k}:{v}" for k, v in r["distribution"].items())] for r in summary["likert"]])
        md += "\n" + "".join(_kappa_line(f"agreement on {c}", a) for c, a in summary["likert_agreement"].items())
    if "win_rates" in summary:
        elo = summary["elo"]["ratings"]
        bt = summary["bradley_terry"].get("ratings", {})
        level = int(round(summary["interval"]["confidence"] * 100))
        md += f"\n## Pairwise preferences\n\nWin rate counts a tie as half a win; {level}% {summary['interval']['method']} intervals.\n\n"
        md += markdown_table(
            ["system", "games", "wins", "ties", "losses", "win rate", "ci low", "ci high", "Elo", "Bradley-Terry"],
            [[r["system"], r["games"], r["wins"], r["ties"], r["losses"], r["win_rate"], r["ci_low"], r["ci_high"],
              elo.get(r["system"]), bt.get(r["system"])] for r in summary["win_rates"]], digits=3)
        if "error" in summary["bradley_terry"]:
            md += f"\nBradley-Terry: {summary['bradley_terry']['error']}\n"
        md += "\n" + _kappa_line("agreement on preferences", summary["pairwise_agreement"])
    if "exported_pairs" in summary:
        md += f"\nExported {summary['exported_pairs']['pairs']} preference pairs to {summary['exported_pairs']['path']}.\n"
    return md
