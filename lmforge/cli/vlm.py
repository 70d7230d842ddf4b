"""`lmforge vlm train cnn|vit|clip | eval CHECKPOINT | classify CHECKPOINT IMAGE...`: image encoders and
a CLIP-style dual encoder trained on Fashion-MNIST (lmforge/vlm/)."""

from __future__ import annotations

import argparse
import json

from lmforge.cli.common import add_config_flags, config_from_args


def register(verbs: argparse._SubParsersAction) -> None:
    from lmforge.vlm.config import DEFAULT_DATA_DIR, KINDS, VisionTrainConfig

    p = verbs.add_parser("vlm", help="vision encoders (ViT, CNN) and a CLIP-style dual encoder on Fashion-MNIST",
                         description="Train image classifiers and a contrastive image-text model on Fashion-MNIST, "
                                     "evaluate them, and label images zero-shot.")
    sub = p.add_subparsers(dest="vlm_command", required=True, metavar="SUBCOMMAND")
    train = sub.add_parser("train", help="train a classifier (cnn, vit) or the dual encoder (clip), evaluate it on "
                                         "the test split and save the checkpoint")
    train.add_argument("kind", choices=KINDS)
    train.add_argument("--json", action="store_true", help="print the report as JSON")
    train.add_argument("--quiet", action="store_true", help="no progress line")
    add_config_flags(train, VisionTrainConfig)
    train.set_defaults(func=run_train)

    evaluate = sub.add_parser("eval", help="test accuracy (cnn, vit) or zero-shot accuracy and recall@k (clip) "
                                           "of a checkpoint")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder with the Fashion-MNIST idx .gz files")
    evaluate.add_argument("--test-limit", type=int, default=None, help="only the first N test images")
    evaluate.add_argument("--retrieval-size", type=int, default=1000, help="clip: images in the retrieval set")
    evaluate.add_argument("--out", default=None, help="also write eval.json, confusion.png and (clip) recall.png here")
    evaluate.set_defaults(func=run_eval)

    classify = sub.add_parser("classify", help="label images: zero-shot with a clip checkpoint (class prompts), "
                                               "or a classifier's head")
    classify.add_argument("checkpoint")
    classify.add_argument("images", nargs="+", metavar="IMAGE",
                          help="an image file (made grey and 28x28) or test:N / train:N for a Fashion-MNIST image")
    classify.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder with the Fashion-MNIST idx .gz files")
    classify.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                          help="invert image files (auto: when the border is bright; Fashion-MNIST is light on black)")
    classify.add_argument("--top", type=int, default=3, help="labels shown per image (default 3)")
    classify.add_argument("--json", action="store_true", help="one JSON object per image")
    classify.set_defaults(func=run_classify)


def run_train(args: argparse.Namespace) -> int:
    from lmforge.vlm.config import VisionTrainConfig
    from lmforge.vlm.train import format_report, round_floats, train

    config = config_from_args(VisionTrainConfig, args, kind=args.kind)
    report = train(config, progress=not args.quiet)
    if args.json:
        print(json.dumps({k: v for k, v in round_floats(report).items() if k not in ("confusion", "recall_curve")}))
    else:
        print(format_report(report))
        print(f"checkpoint: {config.out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from lmforge.vlm.train import evaluate_checkpoint, round_floats

    result = evaluate_checkpoint(args.checkpoint, args.data_dir, args.test_limit, args.retrieval_size, args.out)
    print(json.dumps({k: v for k, v in round_floats(result).items() if k not in ("confusion", "recall_curve")}))
    return 0


def run_classify(args: argparse.Namespace) -> int:
    from lmforge.errors import LmforgeError
    from lmforge.vlm.train import classify

    if args.top < 1:
        raise LmforgeError("--top must be at least 1")
    for result in classify(args.checkpoint, args.images, args.data_dir, args.invert, args.top):
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{result['image']}\t" + "  ".join(f"{t['label']} {t['probability']:.3f}" for t in result["top"]))
    return 0
