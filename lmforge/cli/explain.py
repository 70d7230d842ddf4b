"""``lmforge explain``: why a model predicts what it does after a prompt, as one HTML report
(attention maps, logit lens, token attributions; activation patching with --compare;
per-layer probes with --probe). See lmforge/interpret/."""

from __future__ import annotations

import argparse

from lmforge.cli import common


def cmd_explain(args: argparse.Namespace) -> int:
    import time

    import torch

    from lmforge.interpret.explain import explain
    from lmforge.interpret.options import ExplainOptions
    from lmforge.interpret.report import write_report
    from lmforge.io.progress import Progress
    from lmforge.model.loading import load_model, load_tokenizer, pick_device, pick_dtype
    from lmforge.model.registry import resolve

    options = common.config_from_args(ExplainOptions, args)
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
    written = write_report(result, options.out, options.figures)
    lens = result.lens
    print(f"{spec.name} predicts {result.target_text!r} after the prompt (probability "
          f"{float(lens.target_prob[-1]):.3f}); top token from layer {lens.first_layer_on_top()} on")
    if result.patching is not None:
        resid = result.patching.restored["resid"]
        layer, position = divmod(int(resid[1:].abs().argmax()) + resid.shape[1], resid.shape[1])
        print(f"patching: the residual stream at layer {layer}, token {result.tokens[position]!r} restores "
              f"{float(resid[layer, position]):.0%} of the logit difference (past layer 0)")
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
