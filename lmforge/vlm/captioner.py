"""A LLaVA-style vision-language model for captioning and VQA (V3, V4).

    image [B, 3, H, W] -> ViT (encoders.py) -> patch states [B, 1 + N, d_img]
                       -> connector (connectors.py) -> visual tokens [B, P, d_lm]
    [visual tokens ; embed(text ids)] -> lmforge Transformer (inputs_embeds) -> logits

The visual tokens are a prefix of the language model's input: the decoder attends to them
as it attends to earlier words. Captioning feeds ``[BOS] caption [EOS]`` after them; VQA
feeds ``[BOS] question [SEP] answer [EOS]``. The loss is cross-entropy on the caption (or
answer) tokens and the final EOS only: the model is not asked to predict the image, the
BOS or the question.

Everything here trains from scratch on generated scenes (scenes.py): a small ViT, the MLP
projector (or the query resampler) and a small decoder with a WordPiece vocabulary trained
on the scene texts. Each step renders a fresh batch of training scenes and samples one of
their five captions (or one question), so the model never sees the same (image, text) pair
twice in a row.

Decoding runs the one beam search of lmforge/infer/beam.py through `PrefixStepper`
(the decoder-only stepper whose first step is the prefix of embeddings instead of token
ids); greedy decoding is the same search with one beam that stops at the first EOS.

Why this does not use `lmforge.train.loop.Trainer`: that loop trains a `Transformer` on
token streams and writes Hugging Face checkpoints. This model's input is an image plus
text and its checkpoint is the three towers together, like the other vision models
(lmforge/vlm/train.py); it shares their optimizer groups, schedule, JSONL log, progress
line and atomic checkpoint writer.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.infer.beam import BeamParams, DecoderStepper, beam_search
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.vlm import scenes as sc
from lmforge.vlm.config import CaptionTrainConfig
from lmforge.vlm.connectors import MLPProjector, QueryResampler
from lmforge.vlm.encoders import ViTConfig, VisionTransformer

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]")
VISION_FEATURES = ("last_block", "normed")


# ---- the model ---------------------------------------------------------------------------

class VisionLanguageModel(nn.Module):
    """``pixel_mean``/``pixel_std`` standardize the 0..1 pixels before the ViT. They matter: the
    scenes are mostly near-white background, and without centring the patch embedding starts
    nearly blind to colour; the decoder then learns the text prior and ignores the image (a
    run without them answered at the level of the blind answer prior; see the VQA handbook page).

    ``vision_features`` picks what the connector reads: "last_block" is the last ViT block's
    output before the final LayerNorm (what LLaVA takes from its vision tower, so these models
    export to Hugging Face's LlavaForConditionalGeneration), "normed" the final normalized
    states (the earlier design). ``projector_hidden`` is the MLP projector's hidden width:
    LLaVA's is the LM width; None keeps the earlier 2 x LM width."""

    def __init__(self, vit: ViTConfig, lm: ModelConfig, connector: str = "mlp", queries: int = 16,
                 pixel_mean: float = 0.5, pixel_std: float = 0.25, vision_features: str = "normed",
                 projector_hidden: int | None = None) -> None:
        super().__init__()
        if vision_features not in VISION_FEATURES:
            raise ValueError(f"vision_features must be one of {VISION_FEATURES}, got {vision_features!r}")
        self.pixel_mean, self.pixel_std = pixel_mean, pixel_std
        self.vision_features = vision_features
        self.encoder = VisionTransformer(vit)
        if connector == "mlp":
            self.connector = MLPProjector(vit.width, lm.n_embd, projector_hidden or 2 * lm.n_embd)
            self.prefix_length = vit.n_patches + 1
        elif connector == "resampler":
            self.connector = QueryResampler(lm.n_embd, vit.width, lm.n_head, queries)
            self.prefix_length = queries
        else:
            raise ValueError(f"unknown connector {connector!r}: use mlp or resampler")
        self.lm = Transformer(lm)

    def image_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """Visual tokens [B, P, d_lm] of images [B, 3, H, W] in 0..1."""
        pixels = (images - self.pixel_mean) / self.pixel_std
        return self.connector(self.encoder.tokens(pixels, final_norm=self.vision_features == "normed"))

    def embed_inputs(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.image_prefix(images), self.lm.embed(ids)], dim=1)

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, P + L, V] for the prefix of ``images`` followed by token ``ids`` [B, L]."""
        return self.lm(None, inputs_embeds=self.embed_inputs(images, ids))

    def loss(self, images: torch.Tensor, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the tokens where ``target`` [B, L] is True (each predicted
        from the position before it)."""
        hidden = self.lm.hidden_states(None, inputs_embeds=self.embed_inputs(images, ids))
        p = self.prefix_length
        states = hidden[:, p:p + ids.shape[1] - 1][target[:, 1:]]
        return F.cross_entropy(self.lm.lm_head(states).float(), ids[:, 1:][target[:, 1:]])


def build_model(meta: dict[str, Any]) -> VisionLanguageModel:
    # checkpoints written before pixels were standardized hold no pixel_mean: they saw raw 0..1 pixels;
    # those written before the LLaVA-compatible defaults hold no vision_features / projector_hidden
    return VisionLanguageModel(ViTConfig(**meta["vit"]), ModelConfig.from_dict(meta["lm"]), meta["connector"],
                               meta.get("queries", 16), meta.get("pixel_mean", 0.0), meta.get("pixel_std", 1.0),
                               meta.get("vision_features", "normed"), meta.get("projector_hidden"))


def model_meta(config: CaptionTrainConfig, vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    c = config
    vit = ViTConfig(image_size=c.image_size, channels=3, patch_size=c.patch_size, width=c.vit_width,
                    depth=c.vit_depth, heads=c.vit_heads, mlp_ratio=2, pool="cls")
    prefix = vit.n_patches + 1 if c.connector == "mlp" else c.queries
    lm = ModelConfig(family="llama", vocab_size=vocab_size, n_layer=c.lm_layers, n_embd=c.lm_width,
                     n_head=c.lm_heads, intermediate_size=int(8 * c.lm_width / 3) // 8 * 8,
                     max_position_embeddings=prefix + 96,
                     bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    return {"kind": "vlm", "task": c.task, "vit": dataclasses.asdict(vit), "lm": lm.to_dict(),
            "connector": c.connector, "queries": c.queries, "image_size": c.image_size, "special_ids": ids,
            "pixel_mean": 0.5, "pixel_std": 0.25, **connector_choices(c)}


def connector_choices(c: CaptionTrainConfig) -> dict[str, Any]:
    """What a newly trained model's connector reads and how wide it is. By default the MLP design
    follows LLaVA exactly (last block's states, hidden width = LM width) so that it exports to
    Hugging Face; the resampler, which has no Hugging Face counterpart, keeps reading the normed
    states. --vision-features and --projector-width choose otherwise (e.g. the earlier design)."""
    if c.connector == "mlp":
        return {"vision_features": c.vision_features or "last_block", "projector_hidden": c.projector_width or c.lm_width}
    return {"vision_features": c.vision_features or "normed"}


# ---- text and batches --------------------------------------------------------------------

def train_scene_tokenizer(vocab_size: int):
    from lmforge.tokenizer.train import train_tokenizer

    return train_tokenizer(sc.vocabulary_texts(), algo="wordpiece", vocab_size=vocab_size,
                           special_tokens=SPECIAL_TOKENS, lowercase=True, min_frequency=1)


def special_ids(tokenizer) -> dict[str, int]:
    return {name: tokenizer.token_to_id(f"[{name.upper()}]") for name in ("pad", "unk", "bos", "eos", "sep")}


def prompt_ids(tokenizer, ids: dict[str, int], question: str | None) -> list[int]:
    """What precedes the generated text: [BOS] (captioning) or [BOS] question [SEP] (VQA)."""
    if question is None:
        return [ids["bos"]]
    return [ids["bos"], *tokenizer.encode(question, add_special_tokens=False), ids["sep"]]


def encode_pairs(tokenizer, ids: dict[str, int], prompts: Sequence[str | None],
                 targets: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids [B, L] and the mask of the tokens the loss sees (target and EOS)."""
    rows, masks = [], []
    for prompt, target in zip(prompts, targets):
        head = prompt_ids(tokenizer, ids, prompt)
        tail = tokenizer.encode(target, add_special_tokens=False) + [ids["eos"]]
        rows.append(head + tail)
        masks.append([False] * len(head) + [True] * len(tail))
    width = max(map(len, rows))
    tensor = torch.full((len(rows), width), ids["pad"], dtype=torch.long)
    target = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, mask) in enumerate(zip(rows, masks)):
        tensor[i, :len(row)] = torch.tensor(row)
        target[i, :len(mask)] = torch.tensor(mask)
    return tensor, target


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in 0..1."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def sample_texts(task: str, scene_list: Sequence[sc.Scene], rng: np.random.Generator
                 ) -> tuple[list[str | None], list[str]]:
    """One training text per scene: a random reference caption, or a random question and its answer."""
    prompts: list[str | None] = []
    targets: list[str] = []
    for scene in scene_list:
        if task == "caption":
            refs = sc.captions(scene)
            prompts.append(None)
            targets.append(refs[int(rng.integers(len(refs)))])
        else:
            q = sc.questions(scene, rng, 1)[0]
            prompts.append(q.text)
            targets.append(q.answer)
    return prompts, targets


# ---- decoding ----------------------------------------------------------------------------

class PrefixStepper(DecoderStepper):
    """`DecoderStepper` whose first step feeds a prefix of input embeddings [B, L0, D]."""

    def __init__(self, model: Transformer, embeds: torch.Tensor, rows_per_source: int, max_len: int) -> None:
        from lmforge.model.kv_cache import KVCache

        self.model = model
        self.embeds = embeds.repeat_interleave(rows_per_source, 0)
        self.cache = KVCache.for_model(model.config, len(self.embeds), embeds.shape[1] + max_len + 1,
                                       embeds.dtype, embeds.device)
        self.position = 0

    def log_probs(self, tokens: torch.Tensor | None) -> torch.Tensor:
        if tokens is None:
            logits = self.model(None, cache=self.cache, start=0, last_only=True, inputs_embeds=self.embeds)
            self.position = self.embeds.shape[1]
        else:
            logits = self.model(tokens.view(-1, 1), cache=self.cache, start=self.position, last_only=True)
            self.position += 1
        return torch.log_softmax(logits[:, -1].float(), dim=-1)


@torch.no_grad()
def generate(model: VisionLanguageModel, images: torch.Tensor, prompts: Sequence[list[int]], eos_id: int,
             num_beams: int = 1, max_new_tokens: int = 40, length_penalty: float = 1.0,
             batch_size: int = 128) -> list[list[int]]:
    """Generated ids (EOS stripped) for each image and its prompt ids. Prompts of equal length
    are decoded together (the prefix has no padding); num_beams 1 is greedy."""
    model.eval()
    params = BeamParams(num_beams, max_new_tokens, length_penalty if num_beams > 1 else 0.0,
                        early_stopping=num_beams == 1)
    room = model.lm.config.max_position_embeddings - model.prefix_length
    out: list[list[int] | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for length, rows in by_length.items():
        if length + max_new_tokens + 1 > room:
            raise LmforgeError(f"a prompt of {length} tokens plus {max_new_tokens} new ones does not fit the "
                               f"model's {room} text positions")
        for k in range(0, len(rows), batch_size):
            chunk = rows[k:k + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk], dtype=torch.long)
            embeds = model.embed_inputs(images[chunk], ids)
            stepper = PrefixStepper(model.lm, embeds, num_beams, max_new_tokens)
            for i, hyp in zip(chunk, beam_search(stepper, len(chunk), params, [eos_id])):
                out[i] = [t for t in hyp.tokens if t != eos_id]
    return out  # type: ignore[return-value]


# ---- checkpoints -------------------------------------------------------------------------

@dataclass
class LoadedVLM:
    model: VisionLanguageModel
    tokenizer: Any
    meta: dict[str, Any]

    @property
    def ids(self) -> dict[str, int]:
        return self.meta["special_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def caption(self, images: torch.Tensor, num_beams: int = 1, max_new_tokens: int = 40,
                length_penalty: float = 1.0) -> list[str]:
        prompts = [prompt_ids(self.tokenizer, self.ids, None)] * len(images)
        return [self.decode(t) for t in generate(self.model, images, prompts, self.ids["eos"], num_beams,
                                                 max_new_tokens, length_penalty)]

    def answer(self, images: torch.Tensor, questions: Sequence[str], num_beams: int = 1,
               max_new_tokens: int = 8) -> list[str]:
        prompts = [prompt_ids(self.tokenizer, self.ids, q.lower()) for q in questions]
        return [self.decode(t) for t in generate(self.model, images, prompts, self.ids["eos"], num_beams,
                                                 max_new_tokens)]


def load_vlm(path: str | Path) -> LoadedVLM:
    from safetensors.torch import load_file

    from lmforge.tokenizer.tokenizer import Tokenizer

    from lmforge.vlm.hf_layouts import hf_model_type, load_hf_vlm

    folder = Path(path)
    if hf_model_type(folder) is not None:  # a Hugging Face LLaVA directory (hf_llava.py)
        return load_hf_vlm(folder)
    config_path, weights, tok = folder / "config.json", folder / "model.safetensors", folder / "tokenizer.json"
    if not (config_path.is_file() and weights.is_file() and tok.is_file()):
        raise LmforgeError(f"{folder} is not a vision-language checkpoint (needs config.json, model.safetensors and "
                           "tokenizer.json; make one with lmforge vlm train --task caption|vqa)")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
        if meta.get("kind") != "vlm":
            raise LmforgeError(f"{folder} holds a {meta.get('kind')!r} model, not a captioning/VQA model "
                               "(lmforge vlm train --task caption|vqa makes one)")
        model = build_model(meta)
    except (KeyError, ValueError, TypeError) as exc:
        raise LmforgeError(f"{config_path} does not describe a vision-language model: {exc}") from None
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise LmforgeError(f"{weights} does not match {config_path}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return LoadedVLM(model, Tokenizer.from_file(tok), meta)


def read_images(specs: Sequence[str], size: int) -> torch.Tensor:
    """Image files (any PIL format, made RGB and ``size`` x ``size``) or ``test:N`` / ``val:N`` /
    ``train:N`` for generated scene N of a split: [B, 3, size, size] in 0..1."""
    from PIL import Image, UnidentifiedImageError

    arrays = []
    for spec in specs:
        split, _, number = spec.partition(":")
        if split in sc.SPLIT_CODES and number and not Path(spec).exists():
            try:
                index = int(number)
            except ValueError:
                raise LmforgeError(f"{spec}: expected {split}:N with N a whole number") from None
            if index < 0:
                raise LmforgeError(f"{spec}: N must be >= 0")
            arrays.append(sc.render(sc.make_scene(split, index), size))
            continue
        try:
            with Image.open(spec) as img:
                arrays.append(np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)))
        except FileNotFoundError:
            raise LmforgeError(f"no such image: {spec}") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise LmforgeError(f"{spec} is not an image PIL can read: {exc}") from None
    return to_tensor(np.stack(arrays).astype(np.uint8))


# ---- evaluation --------------------------------------------------------------------------

def test_set(task: str, n_scenes: int, questions_per_scene: int = 3) -> list[tuple[int, sc.Question | None]]:
    if task == "caption":
        return [(i, None) for i in range(n_scenes)]
    return [(i, q) for i in range(n_scenes) for q in sc.split_questions("test", i, questions_per_scene)]


@torch.no_grad()
def evaluate(loaded: LoadedVLM, n_scenes: int, questions_per_scene: int = 3, num_beams: int = 1,
             samples: int = 8, split: str = "test") -> dict[str, Any]:
    """Caption metrics (CIDEr-D, BLEU-4, METEOR-light) or VQA accuracy (overall, per type, and the
    answer-prior baseline) on the first ``n_scenes`` scenes of ``split``."""
    from lmforge.vlm.caption_metrics import caption_scores, normalize_answer, pope_scores, vqa_accuracy

    task = loaded.meta["task"]
    size = loaded.meta["image_size"]
    scene_list = [sc.make_scene(split, i) for i in range(n_scenes)]
    images = to_tensor(sc.render_batch(scene_list, size))
    started = time.perf_counter()
    if task == "caption":
        predictions = loaded.caption(images, num_beams)
        references = [sc.captions(s) for s in scene_list]
        result = {"task": task, "split": split, "num_beams": num_beams,
                  **caption_scores(predictions, references), **sc.object_mention_scores(predictions, scene_list),
                  "samples": [{"image": f"{split}:{i}", "caption": p, "references": r}
                              for i, (p, r) in enumerate(zip(predictions[:samples], references[:samples]))]}
        # the ceiling: one reference scored against the other four
        result["reference_vs_others"] = caption_scores([r[0] for r in references], [r[1:] for r in references])
    else:
        items = [(i, q) for i in range(n_scenes)
                 for q in sc.questions(scene_list[i], sc.scene_rng(split, i, 1), questions_per_scene)]
        index = torch.tensor([i for i, _ in items])
        predictions = loaded.answer(images[index], [q.text for _, q in items], num_beams)
        answers, types = [q.answer for _, q in items], [q.type for _, q in items]
        result = {"task": task, "split": split, "num_beams": num_beams,
                  **vqa_accuracy(predictions, answers, types),
                  "prior_baseline": answer_prior_baseline(answers, types),
                  "samples": [{"image": f"{split}:{i}", "question": q.text, "answer": q.answer, "predicted": p}
                              for (i, q), p in list(zip(items, predictions))[:samples]]}
        result["invalid_answers"] = sum(normalize_answer(p) not in _answer_space() for p in predictions)
        exist = [(p, a) for p, a, t in zip(predictions, answers, types) if t == "exist"]
        if exist:
            result["pope"] = pope_scores(*zip(*exist))
    result["decode_seconds"] = round(time.perf_counter() - started, 2)
    return result


def _answer_space() -> set[str]:
    from lmforge.vlm.caption_metrics import normalize_answer

    words = list(sc.NUMBERS) + list(sc.COLOURS) + list(sc.SHAPES) + list(sc.SIZES) + ["yes", "no"]
    return {normalize_answer(w) for w in words}


def answer_prior_baseline(answers: Sequence[str], types: Sequence[str], train_scenes: int = 3000
                          ) -> dict[str, Any]:
    """Accuracy of answering every question with the most frequent training answer of its type
    (a blind model that has learned the answer distribution but never looks at the image)."""
    from collections import Counter, defaultdict

    from lmforge.vlm.caption_metrics import vqa_accuracy

    prior: dict[str, Counter] = defaultdict(Counter)
    for i in range(train_scenes):
        for q in sc.split_questions("train", i, len(sc.QUESTION_TYPES)):
            prior[q.type][q.answer] += 1
    guesses = [prior[t].most_common(1)[0][0] if prior[t] else "" for t in types]
    return vqa_accuracy(guesses, answers, types)


# ---- training ----------------------------------------------------------------------------

def train_vlm(config: CaptionTrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train a captioning or VQA model on generated scenes, evaluate it on the test split and
    write the checkpoint (config.json, model.safetensors, tokenizer.json, metrics.json, train.jsonl)."""
    from lmforge.io.progress import Progress
    from lmforge.train.optim import build_optimizer
    from lmforge.train.schedule import lr_factor
    from lmforge.train.telemetry import JsonlLog
    from lmforge.vlm.train import save_checkpoint

    c = config
    if c.threads:
        torch.set_num_threads(c.threads)
    torch.manual_seed(c.seed)
    if c.init is not None:  # stage two: the architecture, weights and vocabulary of an earlier run
        start = load_vlm(c.init)
        tokenizer, model = start.tokenizer, start.model
        meta = {k: v for k, v in start.meta.items() if k != "train_config"}
        meta["task"], meta["init"] = c.task, str(c.init)
        ids = meta["special_ids"]
    else:
        tokenizer = train_scene_tokenizer(c.vocab_size)
        ids = special_ids(tokenizer)
        meta = model_meta(c, tokenizer.vocab_size, ids)
        model = build_model(meta)
    model.train()
    optimizer = build_optimizer(model, "adamw", c.lr, (0.9, 0.98), 1e-8, c.weight_decay)
    out = Path(c.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging_log = out.parent / f".{out.name}.train.jsonl"
    jsonl = JsonlLog(staging_log)
    rng = np.random.default_rng(c.seed)
    val_scenes = [sc.make_scene("val", i) for i in range(c.val_scenes)]
    val_images = to_tensor(sc.render_batch(val_scenes, meta["image_size"]))
    val_prompts, val_targets = sample_texts(c.task, val_scenes, np.random.default_rng(12345))
    val_ids, val_mask = encode_pairs(tokenizer, ids, val_prompts, val_targets)
    bar = Progress(f"train vlm {c.task}", total=c.steps, unit="steps", enabled=progress)
    losses: list[float] = []
    val_curve: list[tuple[int, float]] = []
    started = time.perf_counter()

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            value = float(np.mean([model.loss(val_images[i:i + 256], val_ids[i:i + 256], val_mask[i:i + 256]).item()
                                   for i in range(0, len(val_images), 256)]))
        model.train()
        return value

    image_size = meta["image_size"]
    for step in range(c.steps):
        lr = c.lr * lr_factor(step, c.steps, "cosine", c.warmup_steps, c.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch_scenes = [sc.make_scene("train", int(i)) for i in rng.integers(0, c.train_scenes, c.batch_size)]
        images = to_tensor(sc.render_batch(batch_scenes, image_size))
        token_ids, target = encode_pairs(tokenizer, ids, *sample_texts(c.task, batch_scenes, rng))
        loss = model.loss(images, token_ids, target)
        if not torch.isfinite(loss):
            raise LmforgeError(f"the loss became {float(loss)} at step {step}: lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.clip_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        bar.update(step + 1, info=f"loss {np.mean(losses[-20:]):.4f}  lr {lr:.1e}")
        record: dict[str, Any] = {}
        if (step + 1) % c.eval_interval == 0 or step + 1 == c.steps:
            val_curve.append((step + 1, val_loss()))
            record["val_loss"] = val_curve[-1][1]
        if record or (step + 1) % c.log_interval == 0:
            jsonl.write({"step": step + 1, "lr": lr, "loss": float(np.mean(losses[-c.log_interval:])), **record})
    train_seconds = time.perf_counter() - started
    bar.close(f"trained vlm {c.task} for {c.steps} steps")
    jsonl.close()
    model.eval()
    metrics = evaluate(LoadedVLM(model, tokenizer, meta), c.test_scenes, c.test_questions, c.num_beams)
    report = {"task": c.task, "parameters": sum(p.numel() for p in model.parameters()),
              "parameters_by_part": {name: sum(p.numel() for p in part.parameters())
                                     for name, part in (("vit", model.encoder), ("connector", model.connector),
                                                        ("lm", model.lm))},
              "steps": c.steps, "train_seconds": round(train_seconds, 1),
              "images_per_second": round(c.steps * c.batch_size / max(train_seconds, 1e-9), 1),
              "first_loss": float(np.mean(losses[:20])), "final_loss": float(np.mean(losses[-20:])),
              "val_loss": val_curve, **metrics}
    meta["train_config"] = dataclasses.asdict(c)

    def write_metrics(path: Path) -> None:
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    def write_log(path: Path) -> None:
        staging_log.replace(path)

    save_checkpoint(out, model, meta, tokenizer, {"metrics.json": write_metrics, "train.jsonl": write_log})
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"vlm {report['task']} ({report['parameters']:,} parameters): {report['steps']} steps in "
             f"{report['train_seconds']} s ({report['images_per_second']} images/s); loss {report['first_loss']:.4f} "
             f"-> {report['final_loss']:.4f}"]
    lines.append(format_metrics(report))
    return "\n".join(lines)


def format_metrics(m: dict[str, Any]) -> str:
    if m["task"] == "caption":
        lines = [f"{m['split']} captions ({m['n']}, beams {m['num_beams']}): CIDEr-D {m['cider_d']:.3f}  "
                 f"BLEU-4 {m['bleu4']:.2f}  METEOR-light {m['meteor_light']:.4f}; objects named: precision "
                 f"{m['object_precision']:.3f}, recall {m['object_recall']:.3f}, exact set {m['exact_object_set']:.3f}"]
        for s in m["samples"][:4]:
            lines.append(f"  {s['image']}: {s['caption']}")
        return "\n".join(lines)
    lines = [f"{m['split']} VQA accuracy {m['accuracy']:.4f} on {m['n']} questions (answer prior "
             f"{m['prior_baseline']['accuracy']:.4f}); by type: "
             + ", ".join(f"{t} {a:.3f}" for t, a in m["by_type"].items())]
    if "pope" in m:
        p = m["pope"]
        lines.append(f"existence (POPE-style, {p['n']}): F1 {p['f1']:.3f}  precision {p['precision']:.3f}  "
                     f"recall {p['recall']:.3f}  yes-ratio {p['yes_ratio']:.3f}")
    for s in m["samples"][:4]:
        lines.append(f"  {s['image']}: {s['question']} -> {s['predicted']} (true: {s['answer']})")
    return "\n".join(lines)


def describe(path: str | Path, specs: Sequence[str], question: str | None = None, num_beams: int = 1,
             max_new_tokens: int = 40, length_penalty: float = 1.0,
             log: Callable[[str], None] | None = None) -> list[dict[str, str]]:
    """Captions of ``specs`` (or answers to ``question`` about them) from a checkpoint."""
    loaded = load_vlm(path)
    task = loaded.meta["task"]
    if question is None and task != "caption":
        raise LmforgeError(f"{path} answers questions (a vqa model): use lmforge vlm ask IMAGE QUESTION")
    if question is not None and task != "vqa":
        raise LmforgeError(f"{path} is a captioning model: use lmforge vlm caption IMAGE")
    if question is not None and not question.strip():
        raise LmforgeError("the question is empty")
    images = read_images(specs, loaded.meta["image_size"])
    if question is None:
        texts = loaded.caption(images, num_beams, max_new_tokens, length_penalty)
        return [{"image": s, "caption": t} for s, t in zip(specs, texts)]
    unk = loaded.ids["unk"]
    unknown = [w for w in question.lower().split() if unk in loaded.tokenizer.encode(w, add_special_tokens=False)]
    if unknown and log is not None:
        log(f"note: words the model never saw: {', '.join(unknown)}")
    texts = loaded.answer(images, [question] * len(specs), num_beams, min(max_new_tokens, 8))
    return [{"image": s, "question": question, "answer": t} for s, t in zip(specs, texts)]
