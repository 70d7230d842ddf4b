"""`lmforge vlm train cnn|vit|clip | eval CHECKPOINT | classify CHECKPOINT IMAGE...`: image encoders and
a CLIP-style dual encoder trained on Fashion-MNIST; `lmforge vlm train --task caption|vqa`,
`lmforge vlm caption IMAGE...` and `lmforge vlm ask IMAGE QUESTION`: a LLaVA-style captioning
and question-answering model trained on generated scenes (lmforge/vlm/); `lmforge vlm export CHECKPOINT
--out DIR`: any of them except the CNN in its Hugging Face layout (lmforge/vlm/hf_layouts.py)."""

from __future__ import annotations

import argparse
import json

from lmforge.cli.common import _dest, add_config_flags, config_flags, config_from_args


def _add_task_flags(p: argparse.ArgumentParser, cls: type, title: str) -> None:
    """`cls`'s flags that `p` does not have yet (the shared ones, such as --lr, are read back for
    both configurations by `_task_config`)."""
    scratch = argparse.ArgumentParser(add_help=False)
    add_config_flags(scratch, cls)
    group = p.add_argument_group(title)
    for action in scratch._actions:
        if not any(flag in p._option_string_actions for flag in action.option_strings):
            group._add_action(action)


def _given(args: argparse.Namespace, cls: type) -> dict[str, str]:
    """Field name -> flag of every `cls` flag given on the command line."""
    return {f.name: "--" + f.name.replace("_", "-") for f, _ in config_flags(cls) if _dest(cls, f) in vars(args)}


def _task_config(args: argparse.Namespace):
    """The captioning/VQA run's settings: its own flags plus the shared ones, which argparse stored
    under the vision run's names."""
    from lmforge.errors import LmforgeError
    from lmforge.vlm.config import CaptionTrainConfig, VisionTrainConfig

    own = {f.name for f, _ in config_flags(CaptionTrainConfig)}
    vision = _given(args, VisionTrainConfig)
    foreign = sorted(flag for name, flag in vision.items() if name not in own)
    if foreign:
        raise LmforgeError(f"{', '.join(foreign)} do(es) not apply to --task {args.task_name}")
    shared = {name: getattr(args, _dest(VisionTrainConfig, f)) for f, _ in config_flags(VisionTrainConfig)
              if (name := f.name) in vision}
    return config_from_args(CaptionTrainConfig, args, task=args.task_name, **shared)


def register(verbs: argparse._SubParsersAction) -> None:
    from lmforge.vlm.config import (DEFAULT_DATA_DIR, KINDS, TASKS, CaptionDecodeOptions, CaptionTrainConfig,
                                    VisionTrainConfig)

    p = verbs.add_parser("vlm", help="vision encoders (ViT, CNN) and a CLIP-style dual encoder on Fashion-MNIST",
                         description="Train image classifiers and a contrastive image-text model on Fashion-MNIST, "
                                     "evaluate them, and label images zero-shot.")
    sub = p.add_subparsers(dest="vlm_command", required=True, metavar="SUBCOMMAND")
    train = sub.add_parser("train", help="train a classifier (cnn, vit) or the dual encoder (clip) on Fashion-MNIST, "
                                         "or (--task caption|vqa) a captioning / VQA model on generated scenes; "
                                         "evaluate it on the test split and save the checkpoint",
                           description="KIND trains a Fashion-MNIST model; --task caption|vqa trains a vision-"
                                       "language model on generated scenes instead (shared flags such as --lr, "
                                       "--batch-size, --patch-size then take the task's defaults: lr 1e-3, "
                                       "batch 64, patch 16).")
    train.add_argument("kind", choices=KINDS, nargs="?", help="cnn, vit or clip (leave out with --task)")
    train.add_argument("--task", dest="task_name", choices=TASKS, default=None,
                       help="caption or vqa: train the vision-language model (ViT -> projector -> decoder)")
    train.add_argument("--json", action="store_true", help="print the report as JSON")
    train.add_argument("--quiet", action="store_true", help="no progress line")
    add_config_flags(train, VisionTrainConfig)
    _add_task_flags(train, CaptionTrainConfig, "captioning and VQA (--task caption|vqa)")
    train.set_defaults(func=run_train)

    evaluate = sub.add_parser("eval", help="test accuracy (cnn, vit) or zero-shot accuracy and recall@k (clip) "
                                           "of a checkpoint")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder with the Fashion-MNIST idx .gz files")
    evaluate.add_argument("--test-limit", type=int, default=None, help="only the first N test images")
    evaluate.add_argument("--retrieval-size", type=int, default=1000, help="clip: images in the retrieval set")
    evaluate.add_argument("--out", default=None, help="also write eval.json, confusion.png and (clip) recall.png here")
    evaluate.add_argument("--test-scenes", type=int, default=1000, help="caption/vqa: generated test scenes")
    evaluate.add_argument("--questions", type=int, default=3, help="vqa: questions per test scene")
    evaluate.add_argument("--num-beams", type=int, default=1, help="caption/vqa: 1 greedy, more for beam search")
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

    caption = sub.add_parser("caption", help="describe images with a captioning checkpoint (lmforge vlm train "
                                             "--task caption)")
    caption.add_argument("images", nargs="+", metavar="IMAGE",
                         help="an image file (made RGB and resized) or test:N / val:N / train:N for generated scene N")
    caption.add_argument("--model", default="runs/vlm-caption", help="checkpoint directory (default runs/vlm-caption)")
    caption.add_argument("--json", action="store_true", help="one JSON object per image")
    add_config_flags(caption, CaptionDecodeOptions)
    caption.set_defaults(func=run_caption)

    ask = sub.add_parser("ask", help="answer a question about an image with a VQA checkpoint (lmforge vlm train "
                                     "--task vqa)")
    ask.add_argument("image", metavar="IMAGE", help="an image file or test:N / val:N / train:N")
    ask.add_argument("question", metavar="QUESTION", help='e.g. "how many red shapes are there?"')
    ask.add_argument("--model", default="runs/vlm-vqa", help="checkpoint directory (default runs/vlm-vqa)")
    ask.add_argument("--json", action="store_true", help="print a JSON object")
    add_config_flags(ask, CaptionDecodeOptions)
    ask.set_defaults(func=run_ask)

    export = sub.add_parser("export", help="write a vit, clip or caption/vqa checkpoint in its Hugging Face layout "
                                           "(ViTForImageClassification, CLIPModel, LlavaForConditionalGeneration)",
                            description="Write CHECKPOINT as a directory transformers loads with from_pretrained. "
                                        "Every lmforge vlm command also reads such directories.")
    export.add_argument("checkpoint", metavar="CHECKPOINT")
    export.add_argument("--out", required=True, metavar="DIR", help="the new directory (must not exist or be empty)")
    export.set_defaults(func=run_export)


def run_train(args: argparse.Namespace) -> int:
    from lmforge.errors import LmforgeError
    from lmforge.vlm.config import CaptionTrainConfig, VisionTrainConfig
    from lmforge.vlm.train import format_report, round_floats, train

    if (args.kind is None) == (args.task_name is None):
        raise LmforgeError("give a model kind (cnn, vit, clip) or --task caption|vqa, not both")
    if args.task_name is not None:
        from lmforge.vlm.captioner import format_report as format_task_report, train_vlm

        task_config = _task_config(args)
        report = train_vlm(task_config, progress=not args.quiet)
        if args.json:
            print(json.dumps(round_floats({k: v for k, v in report.items() if k != "samples"})))
        else:
            print(format_task_report(report))
            print(f"checkpoint: {task_config.out}")
        return 0
    own = {f.name for f, _ in config_flags(VisionTrainConfig)}
    foreign = sorted(flag for name, flag in _given(args, CaptionTrainConfig).items() if name not in own)
    if foreign:
        raise LmforgeError(f"{', '.join(foreign)} only apply(ies) to --task caption|vqa")
    config = config_from_args(VisionTrainConfig, args, kind=args.kind)
    report = train(config, progress=not args.quiet)
    if args.json:
        print(json.dumps({k: v for k, v in round_floats(report).items() if k not in ("confusion", "recall_curve")}))
    else:
        print(format_report(report))
        print(f"checkpoint: {config.out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lmforge.vlm.train import evaluate_checkpoint, round_floats

    from lmforge.vlm.hf_layouts import checkpoint_kind

    if checkpoint_kind(args.checkpoint) == "vlm":
        from lmforge.errors import LmforgeError
        from lmforge.io.atomic import write_json_atomic
        from lmforge.vlm.captioner import evaluate, format_metrics, load_vlm

        if min(args.test_scenes, args.questions, args.num_beams) < 1:
            raise LmforgeError("--test-scenes, --questions and --num-beams must be at least 1")
        result = evaluate(load_vlm(args.checkpoint), args.test_scenes, args.questions, args.num_beams)
        if args.out is not None:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(args.out) / "eval.json", result)
        print(format_metrics(result))
        print(json.dumps(round_floats({k: v for k, v in result.items() if k != "samples"})))
        return 0
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


def _decode_options(args: argparse.Namespace):
    from lmforge.vlm.config import CaptionDecodeOptions

    return config_from_args(CaptionDecodeOptions, args)


def run_caption(args: argparse.Namespace) -> int:
    from lmforge.vlm.captioner import describe

    o = _decode_options(args)
    for result in describe(args.model, args.images, None, o.num_beams, o.max_new_tokens, o.length_penalty):
        print(json.dumps(result) if args.json else f"{result['image']}\t{result['caption']}")
    return 0


def run_ask(args: argparse.Namespace) -> int:
    import sys

    from lmforge.vlm.captioner import describe

    o = _decode_options(args)
    result = describe(args.model, [args.image], args.question, o.num_beams, o.max_new_tokens, o.length_penalty,
                      log=lambda line: print(line, file=sys.stderr))[0]
    print(json.dumps(result) if args.json else result["answer"])
    return 0


def run_export(args: argparse.Namespace) -> int:
    from lmforge.vlm.hf_layouts import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {result['architecture']} ({result['kind']}) to {result['out']}")
    return 0
