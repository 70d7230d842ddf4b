"""Training, evaluating and loading the vision models: ``lmforge vlm train cnn|vit|clip``.

A run trains one model on the Fashion-MNIST training split, evaluates it on the test
split and writes a checkpoint directory (atomically: a half-written one never appears)::

    OUT/config.json        what was trained: the run's settings and every tower's shape
    OUT/model.safetensors  the weights
    OUT/tokenizer.json     (clip) the WordPiece tokenizer trained on the training captions
    OUT/metrics.json       test accuracy / zero-shot accuracy / recall@k, the loss curve's ends
    OUT/confusion.png      the test confusion matrix
    OUT/train.jsonl        loss (and temperature) every ``log_interval`` steps

Why this is not `lmforge.train.loop.Trainer`: that loop's model is a `Transformer`
language model (its config becomes Hugging Face files, its FLOPs are estimated from it,
its checkpoints hold a tokenizer and resume mid-stream). These models are image
classifiers and a two-tower contrastive model trained for a few minutes, whose
checkpoint is their own format. What can be shared is: AdamW with the usual parameter
groups (`build_optimizer`), the learning-rate schedule (`lr_factor`), the JSONL log, the
progress line and atomic writes. A classifier minimizes cross-entropy over 10 classes;
the dual encoder minimizes symmetric InfoNCE (clip.py) on pairs of an image and a
caption freshly generated each epoch, so one image is seen with several wordings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.vlm import fashion_mnist as fm
from lmforge.vlm.config import VisionTrainConfig

# ---- building and loading ---------------------------------------------------------------

def build_model(kind: str, encoder_kind: str, encoder_config: dict[str, Any], text: dict[str, Any] | None = None,
                embed_dim: int = 64) -> torch.nn.Module:
    from lmforge.vlm.clip import DualEncoder
    from lmforge.vlm.encoders import ImageClassifier, TextConfig, TextEncoder, build_image_encoder

    image = build_image_encoder(encoder_kind, encoder_config)
    if kind == "clip":
        return DualEncoder(image, TextEncoder(TextConfig(**(text or {}))), embed_dim)
    return ImageClassifier(image, len(fm.CLASS_NAMES))


@dataclass
class Checkpoint:
    kind: str
    model: torch.nn.Module
    tokenizer: Any
    meta: dict[str, Any]

    @property
    def max_length(self) -> int:
        return self.meta.get("text", {}).get("max_length", 24)


def save_checkpoint(out: str | Path, model: torch.nn.Module, meta: dict[str, Any], tokenizer=None,
                    extra_files: dict[str, Callable[[Path], None]] | None = None) -> Path:
    from safetensors.torch import save_file

    from lmforge.io.atomic import atomic_directory

    with atomic_directory(out) as staging:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, staging / "model.safetensors")
        (staging / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(staging)
        for name, write in (extra_files or {}).items():
            write(staging / name)
    return Path(out)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """An lmforge vision checkpoint, or a Hugging Face ViT classifier / CLIP directory (hf_layouts.py)."""
    from safetensors.torch import load_file

    from lmforge.vlm.hf_layouts import hf_model_type, load_hf_checkpoint

    folder = Path(path)
    if hf_model_type(folder) is not None:
        return load_hf_checkpoint(folder)
    config_path, weights = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise LmforgeError(f"{folder} is not a vision checkpoint (needs config.json and model.safetensors; "
                           "make one with lmforge vlm train)")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
        kind = meta["kind"]
        model = build_model(kind, meta["encoder"], meta["encoder_config"], meta.get("text"), meta.get("embed_dim", 64))
    except (KeyError, ValueError, TypeError) as exc:
        raise LmforgeError(f"{config_path} does not describe a vision model: {exc}") from None
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise LmforgeError(f"{weights} does not match {config_path}: {str(exc).splitlines()[0]}") from None
    model.eval()
    tokenizer = None
    if kind == "clip":
        from lmforge.tokenizer.tokenizer import Tokenizer

        if not (folder / "tokenizer.json").is_file():
            raise LmforgeError(f"{folder} has no tokenizer.json: a clip checkpoint needs its caption tokenizer")
        tokenizer = Tokenizer.from_file(folder / "tokenizer.json")
    return Checkpoint(kind, model, tokenizer, meta)


def train_caption_tokenizer(texts: list[str], vocab_size: int):
    from lmforge.tokenizer.train import train_tokenizer

    return train_tokenizer(texts, algo="wordpiece", vocab_size=vocab_size, lowercase=True, min_frequency=1)


# ---- evaluation ------------------------------------------------------------------------

def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, n: int) -> np.ndarray:
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


@torch.no_grad()
def predict_classes(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i:i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])


def classification_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict[str, Any]:
    matrix = confusion_matrix(labels, predictions, len(fm.CLASS_NAMES))
    per_class = matrix.diagonal() / np.maximum(matrix.sum(1), 1)
    return {"accuracy": float((labels == predictions).mean()), "n": int(len(labels)),
            "per_class_accuracy": {name: round(float(a), 4) for name, a in zip(fm.CLASS_NAMES, per_class)},
            "confusion": matrix.tolist()}


PROMPT_SETS = {
    "class name only": ("{noun}",),
    "one held-out template": (fm.PROMPT_TEMPLATES[0],),
    "held-out ensemble": fm.PROMPT_TEMPLATES,
    "training-style ensemble": ("a photo of {a} {noun}", "{a} {noun}", "a picture showing {a} {noun}"),
}


@torch.no_grad()
def evaluate_clip(model, tokenizer, images: torch.Tensor, labels: np.ndarray, max_length: int,
                  bins: fm.AttributeBins, raw_images: np.ndarray, retrieval_size: int = 1000) -> dict[str, Any]:
    """Zero-shot accuracy for each prompt set (the held-out ensemble is the headline figure)
    and recall@1/5/10 both ways on the first ``retrieval_size`` test images."""
    from lmforge.vlm.clip import class_embeddings, embed_images, embed_texts, retrieval, zero_shot_scores

    image_embeds = embed_images(model, images)
    zero_shot = {}
    headline = None
    for name, templates in PROMPT_SETS.items():
        classes = class_embeddings(model, tokenizer, [fm.prompts(c, templates) for c in range(len(fm.CLASS_NAMES))],
                                   max_length)
        predictions = zero_shot_scores(image_embeds, classes).argmax(1).numpy()
        zero_shot[name] = float((predictions == labels).mean())
        if name == "held-out ensemble":
            headline = classification_metrics(labels, predictions)
    n = min(retrieval_size, len(images))
    brightness, size = bins.assign(raw_images[:n], labels[:n])
    texts = [fm.retrieval_caption(int(c), int(b), int(s)) for c, b, s in zip(labels[:n], brightness, size)]
    text_embeds = embed_texts(model, tokenizer, texts, max_length)
    strict = retrieval(image_embeds[:n], text_embeds, ks=CURVE_KS)
    same_text = retrieval(image_embeds[:n], text_embeds, texts, ks=CURVE_KS)
    pick = lambda recalls: {k: recalls[k] for k in (1, 5, 10)}  # noqa: E731
    return {"zero_shot_accuracy": zero_shot["held-out ensemble"], "zero_shot_by_prompts": zero_shot,
            **{k: v for k, v in headline.items() if k != "accuracy"},
            "retrieval": {"n": n, "distinct_captions": len(set(texts)),
                          "image_to_text": pick(strict.image_to_text), "text_to_image": pick(strict.text_to_image),
                          "image_to_text_same_caption": pick(same_text.image_to_text),
                          "text_to_image_same_caption": pick(same_text.text_to_image)},
            "recall_curve": {"k": list(CURVE_KS), "image_to_text": list(strict.image_to_text.values()),
                             "text_to_image": list(strict.text_to_image.values()),
                             "image_to_text_same_caption": list(same_text.image_to_text.values()),
                             "text_to_image_same_caption": list(same_text.text_to_image.values())},
            "logit_scale": float(model.logit_scale())}


CURVE_KS = tuple(range(1, 51))


def plot_recall(curve: dict[str, list[float]], title: str, path: Path) -> bool:
    """Recall@k against k, both directions, strict and counting identical captions."""
    from lmforge.io.plots import pyplot

    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, style in (("image_to_text", "-"), ("text_to_image", "-"), ("image_to_text_same_caption", "--"),
                       ("text_to_image_same_caption", "--")):
        ax.plot(curve["k"], curve[key], style, label=key.replace("_", " "))
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.02)
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_confusion(matrix: list[list[int]], title: str, path: Path) -> bool:
    from lmforge.io.plots import pyplot

    plt = pyplot()
    if plt is None:
        return False
    m = np.array(matrix, dtype=float)
    m = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(fm.CLASS_NAMES))
    ax.set_xticks(ticks, fm.CLASS_NAMES, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(ticks, fm.CLASS_NAMES, fontsize=8)
    for i in ticks:
        for j in ticks:
            if m[i, j] >= 0.01:
                ax.text(j, i, f"{100 * m[i, j]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if m[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- the run ---------------------------------------------------------------------------

def train(config: VisionTrainConfig, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``config.kind`` on the training split, evaluate on the test split, write the checkpoint."""
    from lmforge.io.progress import Progress
    from lmforge.train.optim import build_optimizer
    from lmforge.train.schedule import lr_factor
    from lmforge.train.telemetry import JsonlLog
    from lmforge.vlm.encoders import TextConfig

    c = config
    if c.threads:
        torch.set_num_threads(c.threads)
    raw_train, train_labels = fm.load_split("train", c.data_dir, c.train_limit)
    raw_test, test_labels = fm.load_split("test", c.data_dir, c.test_limit)
    train_images, test_images = fm.to_tensor(raw_train), fm.to_tensor(raw_test)
    labels_t = torch.from_numpy(train_labels)
    n = len(train_images)
    steps_per_epoch = max(1, n // c.batch_size)
    total_steps = c.max_steps or max(1, int(round(c.epochs * steps_per_epoch)))

    torch.manual_seed(c.seed)
    tokenizer, text, bins = None, None, None
    if c.kind == "clip":
        bins = fm.training_bins(c.data_dir) if c.train_limit is None else fm.AttributeBins.fit(raw_train, train_labels)
        brightness, size = bins.assign(raw_train, train_labels)
        tokenizer = train_caption_tokenizer(fm.captions(train_labels, brightness, size, seed=c.seed), c.vocab_size)
        eos = dict(causal=True, pool="eos", eos_token_id=tokenizer.eos_id) if c.text_pool == "eos" else {}
        if eos and eos["eos_token_id"] is None:
            raise LmforgeError("the caption tokenizer has no EOS token for --text-pool eos")
        text = dataclasses.asdict(TextConfig(vocab_size=tokenizer.vocab_size, width=c.text_width, depth=c.text_depth,
                                             heads=max(1, c.text_width // 16), **eos))
    model = build_model(c.kind, c.image_encoder, c.image_encoder_config(), text, c.embed_dim)
    model.train()
    optimizer = build_optimizer(model, "adamw", c.lr, (0.9, 0.98), 1e-8, c.weight_decay)
    out = Path(c.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging_log = out.parent / f".{out.name}.train.jsonl"
    jsonl = JsonlLog(staging_log)
    generator = torch.Generator().manual_seed(c.seed)
    bar = Progress(f"train {c.kind}", total=total_steps, unit="steps", enabled=progress)
    order, epoch_captions = None, None
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(total_steps):
        epoch, within = divmod(step, steps_per_epoch)
        if within == 0:
            order = torch.randperm(n, generator=generator)
            if c.kind == "clip":
                epoch_captions = fm.captions(train_labels, brightness, size, seed=c.seed * 1000 + epoch)
        lr = c.lr * lr_factor(step, total_steps, "cosine", c.warmup_steps, c.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = order[within * c.batch_size:(within + 1) * c.batch_size]
        images = train_images[index]
        if c.kind == "clip":
            from lmforge.vlm.clip import encode_texts

            ids, mask = encode_texts(tokenizer, [epoch_captions[i] for i in index.tolist()], text["max_length"],
                                     model.eos_token_id)
            loss = model(images, ids, mask)
        else:
            loss = F.cross_entropy(model(images), labels_t[index])
        if not torch.isfinite(loss):
            raise LmforgeError(f"the loss became {float(loss)} at step {step}: lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.clip_grad_norm)
        optimizer.step()
        if c.kind == "clip":
            model.clamp_scale()
        losses.append(loss.item())
        info = f"loss {np.mean(losses[-20:]):.4f}  lr {lr:.1e}"
        if c.kind == "clip":
            info += f"  scale {float(model.logit_scale()):.1f}"
        bar.update(step + 1, info=info)
        if (step + 1) % c.log_interval == 0 or step + 1 == total_steps:
            record = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 3), "lr": lr,
                      "loss": float(np.mean(losses[-c.log_interval:]))}
            if c.kind == "clip":
                record["logit_scale"] = float(model.logit_scale())
            jsonl.write(record)
    train_seconds = time.perf_counter() - started
    bar.close(f"trained {c.kind} for {total_steps} steps")
    jsonl.close()

    model.eval()
    if c.kind == "clip":
        metrics = evaluate_clip(model, tokenizer, test_images, test_labels, text["max_length"], bins, raw_test,
                                c.retrieval_size)
    else:
        metrics = classification_metrics(test_labels, predict_classes(model, test_images).numpy())
    params = sum(p.numel() for p in model.parameters())
    report = {"kind": c.kind, "encoder": c.image_encoder, "parameters": params, "steps": total_steps,
              "epochs": round(total_steps / steps_per_epoch, 3), "train_images": n, "test_images": len(test_images),
              "train_seconds": round(train_seconds, 1), "images_per_second": round(total_steps * c.batch_size
                                                                                  / max(train_seconds, 1e-9), 1),
              "first_loss": float(np.mean(losses[:20])), "final_loss": float(np.mean(losses[-20:])), **metrics}
    meta = {"kind": c.kind, "encoder": c.image_encoder, "encoder_config": c.image_encoder_config(), "text": text,
            "embed_dim": c.embed_dim, "classes": list(fm.CLASS_NAMES), "class_nouns": list(fm.CLASS_NOUNS),
            "prompt_templates": list(fm.PROMPT_TEMPLATES), "train_config": dataclasses.asdict(c)}
    title = (f"{c.kind} ({c.image_encoder}) " if c.kind == "clip" else f"{c.kind} ") + \
        (f"zero-shot accuracy {metrics['zero_shot_accuracy']:.3f}" if c.kind == "clip"
         else f"test accuracy {metrics['accuracy']:.3f}")

    def write_metrics(path: Path) -> None:
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    def write_log(path: Path) -> None:
        staging_log.replace(path)

    files = {"metrics.json": write_metrics, "train.jsonl": write_log,
             "confusion.png": lambda path: plot_confusion(metrics["confusion"], title, path)}
    if c.kind == "clip":
        files["recall.png"] = lambda path: plot_recall(metrics["recall_curve"], f"retrieval on {c.retrieval_size} "
                                                       "test images", path)
    save_checkpoint(out, model, meta, tokenizer, files)
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['kind']} ({report['encoder']}, {report['parameters']:,} parameters): {report['steps']} steps, "
             f"{report['epochs']} epochs on {report['train_images']:,} images in {report['train_seconds']} s "
             f"({report['images_per_second']} images/s); loss {report['first_loss']:.4f} -> {report['final_loss']:.4f}"]
    if report["kind"] == "clip":
        lines.append("zero-shot accuracy on %d test images: " % report["test_images"] + ", ".join(
            f"{k} {v:.4f}" for k, v in report["zero_shot_by_prompts"].items()))
        r = report["retrieval"]
        for key in ("image_to_text", "text_to_image", "image_to_text_same_caption", "text_to_image_same_caption"):
            lines.append(f"{key.replace('_', ' ')} recall@1/5/10 on {r['n']}: "
                         + " / ".join(f"{r[key][k]:.3f}" for k in sorted(r[key], key=int)))
        lines.append(f"logit scale {report['logit_scale']:.1f} (temperature {1 / report['logit_scale']:.4f})")
    else:
        lines.append(f"test accuracy {report['accuracy']:.4f} on {report['n']:,} images")
    return "\n".join(lines)


def evaluate_checkpoint(path: str | Path, data_dir: str | None = None, test_limit: int | None = None,
                        retrieval_size: int = 1000, out: str | Path | None = None) -> dict[str, Any]:
    """The test metrics of a checkpoint; with ``out``, also written there as eval.json, confusion.png
    and (clip) recall.png."""
    ckpt = load_checkpoint(path)
    raw, labels = fm.load_split("test", data_dir, test_limit)
    images = fm.to_tensor(raw)
    if ckpt.kind == "clip":
        bins = fm.training_bins(data_dir)
        metrics = evaluate_clip(ckpt.model, ckpt.tokenizer, images, labels, ckpt.max_length, bins, raw,
                                retrieval_size)
    else:
        metrics = classification_metrics(labels, predict_classes(ckpt.model, images).numpy())
    result = {"kind": ckpt.kind, "encoder": ckpt.meta["encoder"], **metrics}
    if out is not None:
        from lmforge.io.atomic import atomic_path, write_json_atomic

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "eval.json", result)
        headline = result.get("zero_shot_accuracy", result.get("accuracy"))
        with atomic_path(folder / "confusion.png", suffix=".png") as tmp:
            plot_confusion(result["confusion"], f"{ckpt.kind} test accuracy {headline:.3f}", tmp)
        if ckpt.kind == "clip":
            with atomic_path(folder / "recall.png", suffix=".png") as tmp:
                plot_recall(result["recall_curve"], f"retrieval on {result['retrieval']['n']} test images", tmp)
    return result


# ---- classifying files -----------------------------------------------------------------

def read_image(spec: str, data_dir: str | None = None, invert: str = "auto") -> torch.Tensor:
    """One image as the models see it, [1, 28, 28] in 0..1: an image file (made grey and 28x28;
    inverted when its border is bright, since Fashion-MNIST shows light garments on black), or
    ``test:N`` / ``train:N`` for image N of a Fashion-MNIST split."""
    if ":" in spec and spec.split(":", 1)[0] in ("test", "train") and not Path(spec).exists():
        split, number = spec.split(":", 1)
        images, _ = fm.load_split(split, data_dir)
        try:
            index = int(number)
            image = images[index]
        except (ValueError, IndexError):
            raise LmforgeError(f"{spec}: expected {split}:N with 0 <= N < {len(images)}") from None
        return fm.to_tensor(image[None])[0]
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(spec) as img:
            grey = img.convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    except FileNotFoundError:
        raise LmforgeError(f"no such image: {spec}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise LmforgeError(f"{spec} is not an image PIL can read: {exc}") from None
    x = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)
    border = torch.cat([x[0], x[-1], x[:, 0], x[:, -1]]).mean()
    if invert == "yes" or (invert == "auto" and border > 0.5):
        x = 1.0 - x
    return x.unsqueeze(0)


@torch.no_grad()
def classify(path: str | Path, specs: list[str], data_dir: str | None = None, invert: str = "auto",
             top: int = 3) -> list[dict[str, Any]]:
    """Zero-shot labels of images with a trained clip checkpoint (held-out prompt ensemble);
    a cnn/vit checkpoint answers with its classifier head."""
    from lmforge.vlm.clip import class_embeddings, zero_shot_scores

    ckpt = load_checkpoint(path)
    images = torch.stack([read_image(s, data_dir, invert) for s in specs])
    if ckpt.kind == "clip":
        templates = tuple(ckpt.meta.get("prompt_templates") or fm.PROMPT_TEMPLATES)
        classes = class_embeddings(ckpt.model, ckpt.tokenizer, [fm.prompts(c, templates)
                                                                for c in range(len(fm.CLASS_NAMES))], ckpt.max_length)
        logits = ckpt.model.logit_scale() * zero_shot_scores(ckpt.model.encode_images(images), classes)
    else:
        logits = ckpt.model(images)
    probs = logits.softmax(-1)
    results = []
    for spec, p in zip(specs, probs):
        best = p.argsort(descending=True)[:top]
        names = ckpt.meta.get("classes") or fm.CLASS_NAMES
        results.append({"image": spec, "label": names[int(best[0])],
                        "top": [{"label": names[int(i)], "probability": round(float(p[i]), 4)} for i in best]})
    return results


def round_floats(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [round_floats(v, digits) for v in value]
    return value
