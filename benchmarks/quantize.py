"""What each quantization method costs in perplexity on the default model (I4).

Every setting starts from the same float32 SmolLM2-135M-Instruct (the shipped Q4_1 file,
dequantized: that is the "fp32" row), is quantized by `lmforge.infer.quantize`, written as
a GGUF file, read back with lmforge's GGUF loader, and scored on held-out text: the offline
Wikipedia excerpt's validation side (`split_of(text, 0.1, salt="prune")`, the split
`lmforge prune` and `lmforge quantize` keep out of their calibration), in non-overlapping
windows of 512 tokens. Calibration (GPTQ, AWQ) reads --calib-rows rows of --calib-length
tokens from the training side. The file size is the written file's; the time is the
quantization's (calibration forwards included, writing excluded).

    python benchmarks/quantize.py            # fp32, rtn-8, rtn-4, gptq-4, gptq-4 act-order, awq-4
    python benchmarks/quantize.py --quick    # fewer tokens
    python benchmarks/quantize.py --layer-errors   # does GPTQ's fit carry over to held-out text?
    python benchmarks/quantize.py --value-errors   # the value rows' error as the attention heads pass it on
    python benchmarks/quantize.py --settings rtn-4 --gptq-only attn.qkv:q --gptq-only attn.out
        # GPTQ for the named products (or the q / k / v rows of the fused attn.qkv), RTN for the rest

Prints one JSON line per setting and a summary JSON line.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import cpu_model, heldout_texts, wiki_texts  # noqa: E402


SETTINGS = {
    "fp32": None,
    "rtn-8": dict(method="rtn", bits=8),
    "rtn-4": dict(method="rtn", bits=4),
    "gptq-4": dict(method="gptq", bits=4),
    "gptq-4-act-order": dict(method="gptq", bits=4, act_order=True),
    "awq-4": dict(method="awq", bits=4),
}


def walk_blocks(model, tokenizer, calib_rows: int, layers):
    """For each block index in `layers`, in order: (index, block, (calibration inputs, their block
    arguments), (held-out inputs, their arguments)), the float32 model's activations entering
    that block for `calib_rows` x 256 training-side tokens and 8 x 256 held-out tokens.
    Run it under `torch.no_grad()`."""
    from lmforge.infer.quantize import calibration_rows, first_block_inputs

    cal = calibration_rows(tokenizer, itertools.islice(wiki_texts("train"), 3000), calib_rows, 256)
    held = calibration_rows(tokenizer, itertools.islice(wiki_texts("heldout"), 3000), 8, 256)
    xs, ex = first_block_inputs(model, cal)
    hx, hex_ = first_block_inputs(model, held)
    for index in range(max(layers) + 1):
        block = model.layers[index]
        if index in layers:
            yield index, block, (xs, ex), (hx, hex_)
        xs = [block(x, *a) for x, a in zip(xs, ex)]
        hx = [block(x, *a) for x, a in zip(hx, hex_)]


def layer_errors(model, tokenizer, layers=(0, 5), name="mlp.proj") -> None:
    """Held-out output error of one linear (tr(E X^T X E^T) / n on held-out activations) for RTN
    and for GPTQ given 2k/8k/16k calibration tokens and two dampings: does GPTQ generalize?"""
    import torch

    from lmforge.infer.gptq import gptq_quantize
    from lmforge.infer.quantize import GRIDS, layer_inputs, rtn

    grid = GRIDS[4]

    def inputs(block, rows, extra):
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in layer_inputs(block, name, rows, extra)])

    with torch.no_grad():
        for index, block, (xs, ex), (hx, hex_) in walk_blocks(model, tokenizer, 64, layers):
            x, h = inputs(block, xs, ex), inputs(block, hx, hex_)
            w, gram = block.get_submodule(name).weight.float(), h.T @ h / h.shape[0]

            def error(q):
                e = w - q
                return round(float(((e @ gram) * e).sum()), 3)
            token_sizes = (x * x).sum(1)  # does a handful of outlier tokens dominate the Hessian?
            row = {"layer": index, "linear": name,
                   "top_token_share": round(float(token_sizes.max() / token_sizes.sum()), 5),
                   "rtn": error(rtn(w, grid).dequantize())}
            for tokens in (2048, 8192, 16384):
                hessian = 2 * x[:tokens].T @ x[:tokens] / tokens
                for damp in (0.01, 0.1):
                    row[f"gptq_{tokens}_damp{damp}"] = error(gptq_quantize(w, hessian, grid, damp=damp).dequantize())
            print(json.dumps(row), flush=True)


def value_errors(model, tokenizer, layers=(5, 12, 20, 24)) -> None:
    """Held-out error of the attention heads' outputs caused by the value rows of attn.qkv alone
    (relative: tr(E H E^T) / tr(W H W^T) with H the held-out attention-weighted Hessian of
    `value_hessians`, which is that error exactly), for RTN, GPTQ with the inputs' Hessian
    2 X^T X and GPTQ with the attention-weighted one; and the value error at position 0 (the
    attention sink) against the other positions. The float32 model's activations, 8,192
    calibration tokens, 2,048 held-out tokens, damping 0.01."""
    import torch

    from lmforge.infer.gptq import gptq_quantize, value_hessians
    from lmforge.infer.quantize import GRIDS, input_stats, layer_inputs, rtn

    grid = GRIDS[4]
    with torch.no_grad():
        for index, block, (xs, ex), (hx, hex_) in walk_blocks(model, tokenizer, 32, layers):
            attn = block.attn
            gram, _, n = input_stats(block, ["attn.qkv"], xs, ex, stop=True)["attn.qkv"]
            plain, weighted, held_h = gram * (2.0 / n), value_hessians(block, xs, ex), value_hessians(block, hx, hex_)
            inputs = torch.stack([t[0] for t in layer_inputs(block, "attn.qkv", hx, hex_)])  # [rows, L, cols]
            errors: dict[str, list[float]] = {}
            for head in range(attn.n_kv_head):
                start = attn.q_size + attn.kv_size + head * attn.head_dim
                w = attn.qkv.weight[start:start + attn.head_dim].float()
                size = float(torch.trace(w @ held_h[head] @ w.T))
                for kind, q in (("rtn", rtn(w, grid)), ("gptq_plain", gptq_quantize(w, plain, grid)),
                                ("gptq_attention", gptq_quantize(w, weighted[head], grid))):
                    e = q.dequantize() - w
                    out = (inputs @ e.T) ** 2
                    sums = errors.setdefault(kind, [0.0, 0.0, 0.0])
                    sums[0] += float(torch.trace(e @ held_h[head] @ e.T)) / size / attn.n_kv_head
                    sums[1] += float(out[:, 0].sum(-1).mean()) / attn.n_kv_head
                    sums[2] += float(out[:, 1:].sum(-1).mean()) / attn.n_kv_head
            row = {"layer": index}
            for kind, (rel, first, rest) in errors.items():
                row[kind] = {"head_output_rel_error": round(rel, 5), "value_error_position0": round(first, 4),
                             "value_error_other_positions": round(rest, 4)}
            print(json.dumps(row), flush=True)


def parse_gptq_only(spec: str) -> dict[str, tuple[str, ...]]:
    """`attn.qkv:q,attn.out` -> {"attn.qkv": ("q",), "attn.out": ("all",)}: where GPTQ is kept."""
    from lmforge.infer.quantize import LINEARS

    chosen: dict[str, tuple[str, ...]] = {}
    for item in filter(None, spec.split(",")):
        name, _, part = item.partition(":")
        if name not in LINEARS or (part and (name != "attn.qkv" or part not in ("q", "k", "v"))):
            raise SystemExit(f"--gptq-only {item!r}: name one of {', '.join(LINEARS)}, or attn.qkv:q|k|v")
        chosen[name] = chosen.get(name, ()) + (part or "all",)
    return chosen


def mixed_gptq_step(chosen: dict[str, tuple[str, ...]], plain_values: bool = False):
    """A `gptq_block` replacement: GPTQ for the chosen products or rows of the fused q/k/v
    product, RTN for the rest, in the same block-by-block order (each Hessian measured with the
    layers before it already quantized). GPTQ treats rows independently, so quantizing a whole
    matrix both ways and taking rows from each is exact. `plain_values`: the value rows get the
    inputs' Hessian 2 X^T X like the other rows (GPTQ before the attention-weighted one)."""
    import torch

    from lmforge.infer.gptq import gptq_fused_qkv, gptq_quantize, value_hessians
    from lmforge.infer.quantize import QuantizedTensor, block_linears, input_stats, rtn

    @torch.no_grad()
    def step(block, xs, extra, grid, options, config) -> dict:
        spans = {"q": (0, config.q_size), "k": (config.q_size, config.q_size + config.kv_size),
                 "v": (config.q_size + config.kv_size, config.q_size + 2 * config.kv_size)}
        tensors = {}
        for name, layer in block_linears(block).items():
            qt = rtn(layer.weight, grid)
            if name in chosen:
                gram, _, n = input_stats(block, [name], xs, extra, stop=True)[name]
                hessian = gram * (2.0 / max(1, n))
                if name == "attn.qkv" and not plain_values:
                    gq = gptq_fused_qkv(block.attn, hessian, value_hessians(block, xs, extra), grid, options)
                else:
                    gq = gptq_quantize(layer.weight, hessian, grid, options.damp, options.block_size,
                                       options.act_order)
                take = torch.zeros(layer.weight.shape[0], dtype=torch.bool)
                for part in chosen[name]:
                    start, stop = spans.get(part, (0, len(take)))
                    take[start:stop] = True
                qt = QuantizedTensor(torch.where(take[:, None], gq.scales, qt.scales),
                                     torch.where(take[:, None], gq.codes, qt.codes), grid)
            layer.weight.copy_(qt.dequantize())
            tensors[name] = qt
        return {"tensors": tensors}
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--calib-rows", type=int, default=32)
    parser.add_argument("--calib-length", type=int, default=512)
    parser.add_argument("--damp", type=float, default=0.01, help="GPTQ's dampening (share of the mean diagonal)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of " + ", ".join(SETTINGS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layer-errors", action="store_true",
                        help="only the held-out error of the MLP down product of layers 0 and 5: RTN against GPTQ "
                             "with 2k/8k/16k calibration tokens and damping 0.01/0.1")
    parser.add_argument("--gptq-only", action="append", default=[], metavar="SPEC",
                        help="one more setting (repeatable): GPTQ-4 for the comma-separated products of SPEC "
                             "(attn.qkv, attn.out, mlp.fc, mlp.proj; attn.qkv:q|k|v for the q, k or v rows of the "
                             "fused product), RTN-4 for the rest; e.g. attn.qkv:q,attn.out")
    parser.add_argument("--plain-value-hessian", action="store_true",
                        help="--gptq-only settings: GPTQ the value rows with the inputs' Hessian 2 X^T X, as "
                             "the other rows (without it: each KV head's attention-weighted Hessian, as gptq-4)")
    parser.add_argument("--value-errors", action="store_true",
                        help="only the held-out error of the attention heads' outputs from the value rows of layers "
                             "5, 12, 20, 24: RTN against GPTQ with the plain and the attention-weighted Hessian")
    args = parser.parse_args()

    import torch

    from lmforge.eval.perplexity import perplexity
    from lmforge.infer.options import QuantizeOptions
    from lmforge.infer.quantize import calibration_rows, quantize_model, write_quantized
    from lmforge.model.gguf_io import load_gguf_model
    from lmforge.model.loading import load_model, load_tokenizer
    from lmforge.model.registry import resolve

    if args.quick:
        args.eval_tokens, args.calib_rows, args.calib_length = min(args.eval_tokens, 4096), 8, 256
    spec = resolve(None)
    base, tokenizer = load_model(spec, dtype=torch.float32), load_tokenizer(spec)
    if args.layer_errors:
        return layer_errors(base.eval(), tokenizer)
    if args.value_errors:
        return value_errors(base.eval(), tokenizer)
    heldout, total = heldout_texts(tokenizer, args.eval_tokens)
    train_texts = list(itertools.islice(wiki_texts("train"), 10_000))
    assert not set(heldout) & set(train_texts)  # the two sides share no document
    rows = calibration_rows(tokenizer, train_texts, args.calib_rows, args.calib_length)
    workdir = Path(tempfile.mkdtemp(prefix="lmforge-quantize-"))
    results = []
    runs = [(name, SETTINGS[name], None) for name in filter(None, args.settings.split(","))]
    runs += [(f"gptq-4-only[{spec}]", SETTINGS["gptq-4"], parse_gptq_only(spec)) for spec in args.gptq_only]
    for name, setting, chosen in runs:
        row: dict = {"setting": name}
        if setting is None:
            model = base
            row.update(bytes=sum(p.numel() * 4 for p in base.parameters()), seconds=0.0)  # tied head counted once
        else:
            options = QuantizeOptions(out=str(workdir / f"{len(results)}.gguf"), damp=args.damp, **setting)
            gptq_module = importlib.import_module("lmforge.infer.gptq")
            plain_step = gptq_module.gptq_block
            if chosen is not None:  # quantize_model imports gptq_block when it runs
                gptq_module.gptq_block = mixed_gptq_step(chosen, args.plain_value_hessian)
            try:
                result = quantize_model(copy.deepcopy(base), options, rows if options.needs_calibration else None)
            finally:
                gptq_module.gptq_block = plain_step
            written = write_quantized(result, options.out, tokenizer=tokenizer, name=spec.name)
            model = load_gguf_model(written.path)
            row.update(bytes=written.nbytes, seconds=round(result.seconds, 1))
            if "alphas" in result.details:
                alphas = result.details["alphas"]
                row["awq_mean_alpha"] = {k: round(sum(a[k] for a in alphas) / len(alphas), 3) for k in alphas[0]}
                ratios = result.details["error_ratio"]
                row["awq_error_vs_rtn"] = {k: round(sum(r[k] for r in ratios) / len(ratios), 3) for k in ratios[0]}
            os.unlink(written.path)
            del result
        with torch.inference_mode():
            ppl = perplexity(model, heldout, tokenizer=tokenizer, window=512, stride=512).ppl
        row["perplexity"] = round(ppl, 3)
        row["mib"] = round(row["bytes"] / 2**20, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
        del model
    base_ppl = next((r["perplexity"] for r in results if r["setting"] == "fp32"), None)
    if base_ppl:
        for r in results:
            r["vs_fp32"] = round(r["perplexity"] / base_ppl, 4)
    print(json.dumps({"benchmark": "quantize", "cpu": cpu_model(), "threads": torch.get_num_threads(),
                      "eval_tokens": total, "calib_tokens": sum(r.numel() for r in rows), "damp": args.damp,
                      "load": os.getloadavg()[0], "results": results}))


if __name__ == "__main__":
    main()
