"""``lmforge translate``: translate lines with an encoder-decoder model, or train one from a recipe.

    lmforge translate MODEL_DIR [FILE] [--num-beams 4] [--json]      (stdin when FILE is - or absent)
    lmforge translate train [RECIPE] [--section.field VALUE ...] [--resume]   (lmforge/tune/translation.py)

MODEL_DIR is a Hugging Face T5, Marian or BART directory (config.json + safetensors) with a
tokenizer.json, e.g. OUT/model of a training run. Each non-empty input line is translated
(beam search with --num-beams > 1, greedy otherwise); empty lines stay empty.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.cli.common import add_recipe_fields, find_recipe, recipe_overrides
from lmforge.errors import LmforgeError


def _read_lines(source: str | None) -> list[str]:
    if source in (None, "-"):
        return sys.stdin.read().splitlines()
    path = Path(source)
    if not path.is_file():
        raise LmforgeError(f"no such input file: {source}")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise LmforgeError(f"{source} is not UTF-8 text") from None


def cmd_translate(args: argparse.Namespace) -> int:
    if args.num_beams < 1 or args.max_tokens < 1 or args.batch_size < 1:
        raise LmforgeError("--num-beams, --max-tokens and --batch-size must be at least 1")
    lines = _read_lines(args.input)
    from lmforge.model.seq2seq_io import load_seq2seq
    from lmforge.tokenizer import Tokenizer
    from lmforge.tune.translation import translate_texts

    directory = Path(args.model)
    model = load_seq2seq(directory)
    if not (directory / "tokenizer.json").is_file():
        raise LmforgeError(f"{directory} has no tokenizer.json")
    tokenizer = Tokenizer.from_pretrained_dir(directory)
    wanted = [i for i, line in enumerate(lines) if line.strip()]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    done = translate_texts(model, tokenizer, [lines[i] for i in wanted], num_beams=args.num_beams,
                           max_new_tokens=args.max_tokens, length_penalty=args.length_penalty,
                           batch_size=args.batch_size)
    out = [""] * len(lines)
    for i, text in zip(wanted, done):
        out[i] = text
    for source, text in zip(lines, out):
        if args.json:
            print(json.dumps({"source": source, "translation": text}, ensure_ascii=False))
        else:
            print(text)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lmforge.tune.translation import load_translation_recipe, train_translator

    config = load_translation_recipe(find_recipe(args.recipe), recipe_overrides(args))
    if args.print_recipe:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    report = train_translator(config, progress=not args.quiet, resume=args.resume)
    if args.json:
        print(json.dumps(report, default=str))
        return 0
    test = report.get("test") or {}
    for name, scores in test.items():
        if isinstance(scores, dict):
            print(f"test books, {name}: BLEU {scores['bleu']:.2f}  chrF {scores['chrf']:.2f}")
    print(f"model: {report.get('output')}\nreport: {Path(config.train.out) / 'report.md'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "translate", help="translate lines with an encoder-decoder (T5/Marian) model; 'translate train' trains one",
        description="lmforge translate MODEL_DIR [FILE]: translate each line of FILE (or stdin) with a T5 or Marian "
                    "Hugging Face directory holding a tokenizer.json. lmforge translate train [RECIPE]: train a "
                    "translator from scratch (default recipe: English->Spanish on the Bible, see "
                    "lmforge/recipes/translate-bible-en-es.yaml); every recipe field is also a flag "
                    "--SECTION.FIELD VALUE.")
    p.add_argument("model", metavar="MODEL_DIR", help="a T5/Marian Hugging Face directory, or 'train'")
    p.add_argument("input", nargs="?", metavar="FILE",
                   help="lines to translate (default: stdin); after 'train', the RECIPE")
    p.add_argument("--num-beams", type=int, default=4, help="beam width (1 = greedy; default 4)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = log p / length ** this (default 1.0; > 0 favours longer outputs)")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens per translation (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="lines translated together (default 16)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    p.add_argument("--json", action="store_true", help="one JSON object per line: source and translation "
                                                       "(train: the whole report)")
    p.add_argument("--out", help="train: output directory (same as --train.out)")
    p.add_argument("--print-recipe", action="store_true", help="train: print the resolved recipe and exit")
    p.add_argument("--quiet", action="store_true", help="train: no progress line")
    p.add_argument("--resume", action="store_true",
                   help="train: continue from the newest complete checkpoint in OUT/checkpoints")
    from lmforge.tune.translation_recipe import option_names

    add_recipe_fields(p, option_names())
    p.set_defaults(func=_dispatch)


def _dispatch(args: argparse.Namespace) -> int:
    if args.model == "train":
        args.recipe = args.input
        return cmd_train(args)
    if any(k.startswith("set:") for k in vars(args)) or args.print_recipe or args.out or args.resume:
        raise LmforgeError("recipe flags (--SECTION.FIELD, --out, --print-recipe, --resume) belong to "
                           "'lmforge translate train'")
    return cmd_translate(args)
