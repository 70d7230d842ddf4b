"""Training checkpoints (P5): the model in Hugging Face layout plus everything to resume exactly.

A checkpoint is a directory ``checkpoints/step-NNNNNNN/``::

    config.json, model.safetensors, tokenizer.json, ...   the model, loadable as is
    trainer_state/optimizer.safetensors                   AdamW moments, by parameter name
    trainer_state/rng.safetensors                         torch CPU (and CUDA) generator states
    trainer_state/state.json                              step, data position, optimizer groups,
                                                          Python RNG, the loop's own counters
    checkpoint.json                                       the manifest: every file and its size

Nothing is a pickle: tensors are safetensors and the rest is JSON, so loading a
checkpoint cannot run code. The states saved are *full* (unsharded) ones, so a run can
stop under FSDP on 2 processes and resume under DDP, or on one process.

Crash safety: the directory is written under a hidden temporary name, every file is
flushed to disk, the manifest is written last, and only then is the directory renamed
to its final name (an atomic operation). A reader accepts a checkpoint only if its
manifest exists and every listed file has the listed size, so a save killed at any
moment leaves either nothing or a hidden directory that is ignored (and later deleted).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError

MANIFEST = "checkpoint.json"
FORMAT = "lmforge-train-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for path in [directory, *sorted(directory.rglob("*"))]:
        _fsync(path)


def flatten_optimizer_state(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a full optimizer state dict into tensors (``state/<param>/<key>``) and JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param, entry in osd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{param}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(param), {})[key] = value
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, param, key = name.split("/", 2)
        state.setdefault(param, {})[key] = value
    for param, entry in meta.get("scalars", {}).items():
        state.setdefault(param, {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(root: Path, step: int, config, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], loop_state: dict[str, Any], tokenizer=None,
                    keep_last: int | None = None, extra: dict[str, dict[str, torch.Tensor]] | None = None,
                    write_model=None) -> Path:
    """Write ``root/step-NNNNNNN`` atomically (see the module docstring); returns its path.
    ``extra`` maps file names to tensors saved beside the model files (a task's own weights).
    ``write_model(directory)`` writes the model files of a family the decoder-only writer does
    not know (encoder-decoder models); `load_checkpoint` recognises them by their config.json."""
    from safetensors.torch import save_file

    from lmforge.model.checkpoint import write_hf_files

    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step:07d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        if write_model is not None:
            write_model(staging)
        else:
            write_hf_files(config, model_state, staging, tokenizer)
        for name, tensors in (extra or {}).items():
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, staging / name)
        state_dir = staging / "trainer_state"
        state_dir.mkdir()
        opt_tensors, opt_meta = flatten_optimizer_state(optimizer_state)
        save_file(opt_tensors, state_dir / "optimizer.safetensors")
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, state_dir / "rng.safetensors")
        state = {"format": FORMAT, "step": step, "optimizer": opt_meta, "rng": rng_meta, **loop_state}
        (state_dir / "state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
        _fsync_tree(staging)
        manifest = staging / MANIFEST
        manifest.write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1) + "\n",
                            encoding="utf-8")
        _fsync(manifest)
        if target.exists():  # a valid checkpoint of this step from an earlier attempt
            shutil.rmtree(target)
        os.rename(staging, target)
        _fsync(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if keep_last:
        prune(root, keep_last)
    return target


def is_valid(directory: Path) -> bool:
    """True when the manifest exists and every file it lists is present with its size."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            return False
        return all((directory / name).is_file() and (directory / name).stat().st_size == size
                   for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Valid checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and path.is_dir() and is_valid(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` valid checkpoints, and abandoned staging dirs."""
    for _, path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    for path in root.iterdir():
        if path.name.startswith(".step-") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(directory: Path) -> dict[str, Any]:
    """Model state (lmforge names), full optimizer state, RNG and loop state of a checkpoint."""
    from safetensors.torch import load_file

    from lmforge.model.checkpoint import read_hf_config, read_safetensors
    from lmforge.model.families import hf_to_lmforge

    if not is_valid(directory):
        raise LmforgeError(f"{directory} is not a complete training checkpoint")
    state_dir = directory / "trainer_state"
    state = json.loads((state_dir / "state.json").read_text(encoding="utf-8"))
    from lmforge.model.seq2seq_io import is_seq2seq_config, read_config, read_seq2seq_state

    if is_seq2seq_config(read_config(directory)):
        config, model_state = read_seq2seq_state(directory)
    else:
        config = read_hf_config(directory)
        model_state = hf_to_lmforge(config, read_safetensors(directory))
    if config.tie_word_embeddings:
        model_state.setdefault("lm_head.weight", model_state["embed.weight"])
    optimizer = unflatten_optimizer_state(load_file(state_dir / "optimizer.safetensors"), state.pop("optimizer"))
    rng_tensors = load_file(state_dir / "rng.safetensors")
    return {"config": config, "model": model_state, "optimizer": optimizer,
            "rng": (rng_tensors, state.pop("rng")), "state": state}
