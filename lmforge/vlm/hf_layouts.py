"""Hugging Face layouts of the vision models: which one a checkpoint maps to, exporting, loading.

    lmforge kind   Hugging Face architecture            module
    vit            ViTForImageClassification            hf_vit.py
    vlm            LlavaForConditionalGeneration        hf_llava.py
    clip           CLIPModel                            hf_clip.py
    cnn            (none: a baseline with no counterpart)

lmforge's own checkpoints say what they are with a ``kind`` key in config.json; a Hugging
Face directory says it with ``model_type``. `load_checkpoint` (train.py) and `load_vlm`
(captioner.py) ask `hf_model_type` first and hand Hugging Face directories to the loaders
here, so every command that reads a vision checkpoint also reads these layouts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

HF_MODEL_TYPES = {"vit": "vit", "llava": "vlm", "clip": "clip"}


def hf_model_type(folder: str | Path) -> str | None:
    """The transformers ``model_type`` of ``folder`` when it is a Hugging Face vision layout
    lmforge reads (vit, llava, clip); None for lmforge's own checkpoints and anything else."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(config, dict) or "kind" in config:
        return None
    model_type = config.get("model_type")
    return model_type if model_type in HF_MODEL_TYPES else None


def checkpoint_kind(folder: str | Path) -> str | None:
    """lmforge's kind (cnn, vit, clip, vlm) of a checkpoint in either layout; None when unknown."""
    model_type = hf_model_type(folder)
    if model_type is not None:
        return HF_MODEL_TYPES[model_type]
    path = Path(folder) / "config.json"
    try:
        kind = json.loads(path.read_text(encoding="utf-8")).get("kind")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def load_hf_checkpoint(folder: str | Path):
    """A Hugging Face ViT classifier or CLIP directory as train.py's `Checkpoint`."""
    from lmforge.vlm.train import Checkpoint

    model_type = hf_model_type(folder)
    if model_type == "vit":
        from lmforge.vlm.hf_vit import load_vit_hf

        model, meta = load_vit_hf(folder)
        return Checkpoint("vit", model, None, meta)
    if model_type == "clip":
        from lmforge.vlm.hf_clip import load_clip_hf

        model, tokenizer, meta = load_clip_hf(Path(folder))
        return Checkpoint("clip", model, tokenizer, meta)
    if model_type == "llava":
        raise LmforgeError(f"{folder} holds a LLaVA captioning/VQA model: use lmforge vlm caption, ask or eval")
    raise LmforgeError(f"{folder} is not a Hugging Face ViT, CLIP or LLaVA directory")


def load_hf_vlm(folder: str | Path):
    """A Hugging Face LLaVA directory as captioner.py's `LoadedVLM`."""
    from lmforge.vlm.hf_llava import load_llava_hf

    if hf_model_type(folder) != "llava":
        raise LmforgeError(f"{folder} is not a LLaVA directory")
    return load_llava_hf(folder)


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the vision checkpoint ``checkpoint`` (either layout) to ``out`` in its Hugging Face
    layout, atomically: ``out`` appears complete or not at all. Returns what was written."""
    from lmforge.io.atomic import atomic_directory

    source, target = Path(checkpoint), Path(out)
    if not (source / "config.json").is_file():
        raise LmforgeError(f"{source} is not a vision checkpoint (no config.json)")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise LmforgeError(f"{target} already exists and is not empty (choose another --out or remove it)")
    if target.resolve() == source.resolve():
        raise LmforgeError("--out must differ from the checkpoint directory")
    kind = checkpoint_kind(source)
    if kind == "cnn":
        raise LmforgeError("the CNN baseline has no Hugging Face counterpart; only vit, clip and caption/vqa "
                           "models export")
    if kind == "vlm":
        from lmforge.vlm.captioner import load_vlm
        from lmforge.vlm.hf_llava import save_llava_hf

        loaded = load_vlm(source)
        with atomic_directory(target) as staging:
            save_llava_hf(loaded.model, loaded.meta, loaded.tokenizer, staging)
        return {"kind": kind, "architecture": "LlavaForConditionalGeneration", "out": str(target)}
    if kind in ("vit", "clip"):
        from lmforge.vlm.train import load_checkpoint

        ckpt = load_checkpoint(source)
        with atomic_directory(target) as staging:
            if kind == "vit":
                from lmforge.vlm.hf_vit import save_vit_hf

                save_vit_hf(ckpt.model, ckpt.meta, staging)
            else:
                from lmforge.vlm.hf_clip import save_clip_hf

                save_clip_hf(ckpt.model, ckpt.meta, ckpt.tokenizer, staging)
        architecture = "ViTForImageClassification" if kind == "vit" else "CLIPModel"
        return {"kind": kind, "architecture": architecture, "out": str(target)}
    raise LmforgeError(f"{source} holds a {kind!r} model; lmforge exports vit, clip and caption/vqa models")
