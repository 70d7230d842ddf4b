"""``lmforge prune``: remove weights from a model (magnitude, Wanda, n:m, MLP channels,
head groups) and write a Hugging Face directory; see lmforge/infer/prune.py."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from lmforge.cli import common
from lmforge.errors import LmforgeError


def cmd_prune(args: argparse.Namespace) -> int:
    import torch

    from lmforge.data.corpora import load_source, split_of
    from lmforge.infer.options import PruneOptions
    from lmforge.infer.prune import calibration_batches, prune, sparsity_of
    from lmforge.io.progress import Progress
    from lmforge.model.checkpoint import save_hf_model
    from lmforge.model.loading import load_model, load_tokenizer, pick_dtype
    from lmforge.model.registry import resolve

    options = common.config_from_args(PruneOptions, args)
    if not args.overwrite and Path(args.out).exists():
        raise LmforgeError(f"{args.out} exists; pass --overwrite to replace it")
    spec = resolve(args.model)
    dtype = pick_dtype(args.dtype, torch.device("cpu"))  # pruned on the CPU: "auto" is float32
    progress = Progress(f"loading {spec.name}", unit="tensors", log_every=5.0)
    original = load_model(spec, dtype=dtype, progress=progress)  # plain weights, no inference layout
    progress.close()
    if not original.config.causal or original.lm_head is None:
        raise LmforgeError("lmforge prune works on decoder language models")
    tokenizer = load_tokenizer(spec)
    config, before = original.config, original.num_parameters()
    batches = None
    if options.needs_calibration:
        # The training side of the corpus's hash split, so a held-out perplexity stays unseen.
        texts = (d.text for d in load_source(args.calibration) if split_of(d.text, 0.1, salt="prune") == "train")
        batches = calibration_batches(tokenizer, itertools.islice(texts, 10_000), options.calibration_tokens)
        progress = Progress("calibrating", total=len(batches), unit="rows")

        def counted():
            for row in batches:
                yield row
                progress.update(1)
        with torch.inference_mode():
            model = prune(original, options, counted())
        progress.close()
    else:
        model = prune(original, options)
    out = save_hf_model(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    after = model.num_parameters()
    if options.method == "channels":
        what = f"intermediate size {config.intermediate_size} -> {model.config.intermediate_size}"
    elif options.method == "heads":
        what = f"heads {config.n_head} -> {model.config.n_head} (KV heads {config.n_kv_head} -> {model.config.n_kv_head})"
    else:
        pattern = f"{options.n}:{options.m} pattern, " if options.method == "nm" else ""
        what = f"{pattern}{sparsity_of(model):.1%} of the block weights are zero"
    print(f"pruned {spec.name} ({options.method}): {what}; parameters {before:,} -> {after:,}; wrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.infer.options import PruneOptions

    p = sub.add_parser("prune", help="prune a model (magnitude, Wanda, n:m, MLP channels, heads) into a new directory")
    common.add_model_argument(p)
    p.add_argument("--out", required=True, help="output directory (a Hugging Face model directory)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--calibration", default="wiki",
                   help="text whose activations score the weights: a corpus name (wiki, news) or a file "
                        "(default wiki: the offline Wikipedia excerpt, its training side)")
    p.add_argument("--dtype", default="float32", help="weights dtype (default float32)")
    common.add_config_flags(p, PruneOptions, "pruning")
    p.set_defaults(func=cmd_prune)
