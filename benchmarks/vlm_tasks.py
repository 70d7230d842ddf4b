"""Captioning and VQA checkpoints on the generated test scenes: metrics, sample outputs and figures.

    python benchmarks/vlm_tasks.py --caption runs/vlm-caption --vqa runs/vlm-vqa --out docs/vlm

Evaluates the captioner greedily and with beam search (--beams), the VQA model greedily,
prints the figures and one JSON line, and writes OUT/results.json, OUT/samples.png (test
images with the generated caption and answers), OUT/vqa_by_type.png (accuracy per question
type against the answer-prior baseline) and OUT/loss.png (training and validation loss).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lmforge.io.atomic import atomic_path, write_json_atomic  # noqa: E402
from lmforge.io.plots import pyplot  # noqa: E402
from lmforge.vlm import scenes as sc  # noqa: E402
from lmforge.vlm.captioner import evaluate, format_metrics, load_vlm, to_tensor  # noqa: E402


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_loss(runs: dict[str, Path], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for name, folder in runs.items():
        log = read_log(folder / "train.jsonl")
        ax.plot([r["step"] for r in log], [r["loss"] for r in log], label=f"{name} train")
        val = [r for r in log if "val_loss" in r]
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o--", label=f"{name} validation")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on target tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def plot_by_type(result: dict, path: Path) -> None:
    plt = pyplot()
    types = list(result["by_type"])
    x = range(len(types))
    fig, ax = plt.subplots(figsize=(7.2, 3.8))
    ax.bar([i - 0.2 for i in x], [result["by_type"][t] for t in types], 0.4, label="model (greedy)")
    ax.bar([i + 0.2 for i in x], [result["prior_baseline"]["by_type"][t] for t in types], 0.4,
           label="answer prior (blind)")
    ax.set_xticks(list(x), [t.replace("_", "\n") for t in types], fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(f"VQA on {result['n']} test questions: {result['accuracy']:.3f} "
                 f"(prior {result['prior_baseline']['accuracy']:.3f})", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def plot_samples(caption_model, vqa_model, n: int, path: Path) -> list[dict]:
    plt = pyplot()
    scenes = [sc.make_scene("test", i) for i in range(n)]
    images = to_tensor(sc.render_batch(scenes, caption_model.meta["image_size"]))
    captions = caption_model.caption(images)
    rows = []
    fig, axes = plt.subplots(2, n // 2, figsize=(3.3 * n // 2, 10.5))
    for i, ax in enumerate(axes.flat):
        qs = sc.split_questions("test", i, 2)
        answers = vqa_model.answer(images[[i] * len(qs)], [q.text for q in qs]) if vqa_model else []
        rows.append({"image": f"test:{i}", "caption": captions[i],
                     "qa": [{"question": q.text, "answer": q.answer, "predicted": a} for q, a in zip(qs, answers)]})
        ax.imshow(sc.render(scenes[i], 128))
        ax.set_xticks([])
        ax.set_yticks([])
        text = "\n".join(_wrap(captions[i], 34))
        for q, a in zip(qs, answers):
            text += "\n" + "\n".join(_wrap(f"Q: {q.text} A: {a}" + ("" if a == q.answer else f" (true: {q.answer})"), 34))
        ax.set_xlabel(text, fontsize=7, loc="left")
        ax.set_title(f"test:{i}", fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.97, bottom=0.17, hspace=0.75, wspace=0.08)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return rows


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--caption", default="runs/vlm-caption")
    p.add_argument("--vqa", default="runs/vlm-vqa")
    p.add_argument("--out", default="docs/vlm")
    p.add_argument("--test-scenes", type=int, default=1000)
    p.add_argument("--questions", type=int, default=3)
    p.add_argument("--beams", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--curve", action="append", default=[], metavar="NAME=CHECKPOINT",
                   help="another run's loss curves on loss.png (repeatable)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    caption_model = load_vlm(args.caption)
    vqa_model = load_vlm(args.vqa) if Path(args.vqa).exists() else None
    for beams in (1, args.beams):
        r = evaluate(caption_model, args.test_scenes, num_beams=beams)
        print(format_metrics(r))
        print(f"  reference vs the other four: CIDEr-D {r['reference_vs_others']['cider_d']:.3f}  BLEU-4 "
              f"{r['reference_vs_others']['bleu4']:.2f}  METEOR-light {r['reference_vs_others']['meteor_light']:.4f}"
              f"  ({r['decode_seconds']} s)")
        results[f"caption_beams{beams}"] = r
    if vqa_model is not None:
        r = evaluate(vqa_model, args.test_scenes, args.questions)
        print(format_metrics(r), f"({r['decode_seconds']} s, {r['invalid_answers']} answers outside the answer set)")
        results["vqa"] = r
        plot_by_type(r, out / "vqa_by_type.png")
    curves = {"caption": Path(args.caption), **({"vqa": Path(args.vqa)} if vqa_model else {})}
    curves.update({name: Path(path) for name, _, path in (c.partition("=") for c in args.curve)})
    plot_loss(curves, out / "loss.png")
    results["samples"] = plot_samples(caption_model, vqa_model, 8, out / "samples.png")
    for name, folder in (("caption", Path(args.caption)), ("vqa", Path(args.vqa))):
        metrics = folder / "metrics.json"
        if metrics.is_file():
            m = json.loads(metrics.read_text())
            results[f"{name}_training"] = {k: m[k] for k in ("parameters", "parameters_by_part", "steps",
                                                              "train_seconds", "images_per_second", "first_loss",
                                                              "final_loss", "val_loss")}
    write_json_atomic(out / "results.json", results)
    summary = {k: {m: v[m] for m in ("cider_d", "bleu4", "meteor_light", "accuracy") if m in v}
               for k, v in results.items() if isinstance(v, dict) and "task" in v}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
