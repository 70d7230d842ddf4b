"""``lmforge explain``: why a model predicts what it does after a prompt, as one HTML report
(attention maps, logit lens, token attributions; activation patching with --compare;
per-layer probes with --probe). See lmforge/interpret/."""

from __future__ import annotations

import argparse

from lmforge.cli import common
from lmforge.errors import LmforgeError


def cmd_explain(args: argparse.Namespace) -> int:
    import time

    import torch

    from lmforge.interpret.explain import explain
    from lmforge.interpret.options import ExplainOptions
    from lmforge.interpret.report import check_output, write_report
    from lmforge.io.progress import Progress
    from lmforge.model.loading import load_model, load_tokenizer, pick_device, pick_dtype
    from lmforge.model.registry import resolve

    options = common.config_from_args(ExplainOptions, args)
    if getattr(args, "weights", "float") != "float":
        # The hooks read each layer's float weights (q/k/v for the attention maps, gradients for attributions).
        raise LmforgeError("lmforge explain works on the float weights; leave out --weights")
    check_output(options.out)
    started = time.perf_counter()
    spec = resolve(args.model)
    device = pick_device(args.device)
    progress = Progress(f"loading {spec.name}", unit="tensors", log_every=5.0)
    # The plain checkpoint modules (no inference layout): hooks see lmforge's own blocks.
    model = load_model(spec, dtype=pick_dtype(args.dtype, device), device=device, progress=progress).eval()
    progress.close()
    tokenizer = load_tokenizer(spec)
    torch.manual_seed(0)
    result = explain(model, tokenizer, args.prompt, options, model_name=spec.name)
    progress = Progress("drawing attention maps", unit="layers", log_every=5.0)
    written = write_report(result, options.out, options.figures, progress=progress)
    progress.close()
    lens = result.lens
    on_top = lens.first_layer_on_top()
    print(f"{spec.name}: {result.target_text!r} after the prompt has probability {float(lens.target_prob[-1]):.3f} "
          f"(rank {int(lens.target_rank[-1]) + 1}); "
          + (f"the logit lens ranks it first from layer {on_top} on" if on_top is not None else
             "the logit lens never ranks it first"))
    if result.patching is not None:
        last = result.patching.restored["resid"][:, -1].tolist()
        moved = next((layer for layer in range(len(last)) if min(last[layer:]) >= 0.5), None)
        where = (f"from layer {moved} on, patching the last token's residual stream restores at least half of the "
                 f"logit difference" if moved is not None else
                 "patching the last token's residual stream never restores half of the logit difference")
        print(f"patching: {where}")
    if result.probe is not None:
        best = result.probe.best_layer
        print(f"sentiment probe: best layer {best}, accuracy {float(result.probe.accuracy[best]):.1%} "
              f"(control {float(result.probe.control[best]):.1%})")
    extra = f" and {written['figures']}/" if "figures" in written else ""
    print(f"wrote {written['html']} ({written['json'].name}{extra}) in {time.perf_counter() - started:.1f} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.interpret.options import ExplainOptions

    p = sub.add_parser("explain", help="explain a model's next-token prediction: attention maps, logit lens, "
                                       "attributions, activation patching, probes (an HTML report)")
    common.add_model_argument(p)
    p.add_argument("prompt", help="the prompt whose next token is explained")
    common.add_device_flags(p)
    common.add_config_flags(p, ExplainOptions, "explanation")
    p.set_defaults(func=cmd_explain)
