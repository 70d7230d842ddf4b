"""Figures and the self-contained HTML report of ``lmforge explain``.

Every figure is drawn with matplotlib (Agg, files only) into PNG bytes and inlined in the
HTML as a data URL, so the report is one file that opens anywhere; the same PNGs can also
be written to a folder, and the numbers behind them go to a JSON file. All files are
written atomically.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.io.atomic import atomic_path, write_json_atomic, write_text_atomic
from lmforge.io.plots import pyplot

from .explain import Explanation

SITE_TITLES = {"resid": "residual stream entering the block", "attn": "attention output", "mlp": "feed-forward output"}


def _plt():
    plt = pyplot()
    if plt is None:
        raise LmforgeError("drawing the report needs matplotlib; install it with: pip install matplotlib")
    return plt


def _png(fig) -> bytes:
    plt = _plt()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _tick_tokens(ax, tokens: list[str], axis: str = "both", limit: int = 40) -> None:
    if len(tokens) > limit:
        return
    if axis in ("x", "both"):
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
    if axis in ("y", "both"):
        ax.set_yticks(range(len(tokens)), tokens, fontsize=7)


def head_mosaic(probs, cols: int):
    """Heads [H, T, T] tiled `cols` to a row into one image, one blank (NaN) cell between heads."""
    import numpy as np

    heads, length, _ = probs.shape
    rows = (heads + cols - 1) // cols
    step = length + 1
    mosaic = np.full((rows * step - 1, cols * step - 1), np.nan)
    for h in range(heads):
        r, c = divmod(h, cols)
        mosaic[r * step:r * step + length, c * step:c * step + length] = probs[h]
    return mosaic


def attention_figure(ex: Explanation, layer: int) -> bytes:
    """One layer's heads as a grid of heatmaps (rows: queries, columns: keys), drawn as one image:
    a figure with one axes per head takes several times longer to render."""
    plt = _plt()
    probs = ex.attention[layer].numpy()
    heads, length, _ = probs.shape
    cols = min(heads, 3 if heads % 3 == 0 and heads <= 9 else 4)
    rows = (heads + cols - 1) // cols
    step = length + 1
    scale = max(0.12, min(0.35, 9.0 / (cols * step)))
    fig, ax = plt.subplots(figsize=(1.5 + cols * step * scale, 1.0 + rows * step * scale))
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    ax.imshow(head_mosaic(probs, cols), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    for h in range(heads):
        r, c = divmod(h, cols)
        ax.text(c * step + length / 2 - 0.5, r * step - 0.7, f"head {h}", ha="center", va="bottom", fontsize=7)
    if length <= 40:
        ax.set_yticks(range(length), ex.tokens, fontsize=6)
        ax.set_xticks(range(length), ex.tokens, rotation=90, fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_frame_on(False)
    ax.set_title(f"layer {layer}: attention probabilities (row = query, column = key)", fontsize=9, pad=14)
    return _png(fig)


def lens_figure(ex: Explanation) -> bytes:
    """Probability of the finally predicted token at every layer and position (cells: each layer's top-1)."""
    plt = _plt()
    lens = ex.lens
    probs = lens.final_prob.numpy()
    layers, length = probs.shape
    fig, ax = plt.subplots(figsize=(1.4 + 0.75 * length, 1.0 + 0.28 * layers))
    image = ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    if length * layers <= 1200:
        for layer in range(layers):
            for t in range(length):
                top = ex.label(lens.top_ids[layer, t, 0])
                ax.text(t, layer, top[:8], ha="center", va="center", fontsize=6,
                        color="white" if probs[layer, t] > 0.5 else "black")
    ax.set_xticks(range(length), [f"{tok}\n→{ex.label(nxt)}" for tok, nxt in zip(ex.tokens, lens.final_ids)],
                  rotation=90, fontsize=7)
    ax.set_ylabel("layer (0 = embeddings)")
    ax.set_title("logit lens: probability of the final prediction (text: each layer's top token)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    return _png(fig)


def target_figure(ex: Explanation) -> bytes:
    """Rank and probability of the explained token at the last position, per layer."""
    plt = _plt()
    lens = ex.lens
    layers = list(range(lens.target_rank.shape[0]))
    fig, left = plt.subplots(figsize=(6.5, 3.2))
    left.plot(layers, (lens.target_rank + 1).numpy(), marker="o", color="tab:red", label="rank (1 = top)")
    left.set_yscale("log")
    left.invert_yaxis()
    left.set_xlabel("layer (0 = embeddings)")
    left.set_ylabel("rank of the target", color="tab:red")
    right = left.twinx()
    right.plot(layers, lens.target_prob.numpy(), marker="s", color="tab:blue", label="probability")
    right.set_ylim(0, 1)
    right.set_ylabel("probability", color="tab:blue")
    left.set_title(f"logit lens on the target {ex.target_text!r} after the last token", fontsize=9)
    return _png(fig)


def explained_quantity(ex: Explanation) -> str:
    """What the attributions explain: the target's logit, or its difference from the contrast's."""
    contrast = ex.attributions[0].contrast if ex.attributions else None
    if contrast is None:
        return f"the logit of {ex.target_text!r}"
    return f"logit({ex.target_text!r}) - logit({ex.label(contrast).replace('␣', ' ')!r})"


def attribution_figure(ex: Explanation) -> bytes:
    plt = _plt()
    methods = ex.attributions
    length = len(ex.tokens)
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 0.9 + 0.3 * length), squeeze=False)
    for ax, attribution in zip(axes[0], methods):
        scores = attribution.scores.numpy()
        ax.barh(range(length), scores, color=["tab:green" if s >= 0 else "tab:red" for s in scores])
        ax.set_yticks(range(length), ex.tokens, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_title(attribution.method.replace("_", " "), fontsize=9)
    fig.suptitle(f"attribution of {explained_quantity(ex)} at the last position", fontsize=10, y=1.06)
    return _png(fig)


def patching_figure(ex: Explanation) -> bytes:
    plt = _plt()
    restored = ex.patching.restored
    sites = list(restored)
    layers, length = restored[sites[0]].shape
    fig, axes = plt.subplots(1, len(sites), figsize=(0.9 + (1.2 + 0.45 * length) * len(sites), 1.2 + 0.2 * layers),
                             squeeze=False)
    labels = [f"{c}|{k}" if c != k else c for c, k in zip(ex.tokens, ex.compare_tokens)]
    for ax, site in zip(axes[0], sites):
        image = ax.imshow(restored[site].numpy(), cmap="RdBu", vmin=-1.0, vmax=1.0, aspect="auto", origin="lower")
        ax.set_xticks(range(length), labels, rotation=90, fontsize=7)
        ax.set_title(SITE_TITLES.get(site, site), fontsize=9)
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=list(axes[0]), fraction=0.02)
    fig.suptitle(f"share of logit({ex.target_text!r}) - logit({ex.wrong_text!r}) restored by patching clean into "
                 "corrupted", fontsize=10)
    return _png(fig)


def probe_figure(ex: Explanation) -> bytes:
    plt = _plt()
    probe = ex.probe
    layers = list(range(len(probe.accuracy)))
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.plot(layers, probe.accuracy.numpy(), marker="o", label="probe (real labels)")
    ax.plot(layers, probe.control.numpy(), marker="x", linestyle="--", label="control (shuffled labels)")
    if probe.random_model is not None:
        ax.plot(layers, probe.random_model.numpy(), marker=".", linestyle=":", label="control (untrained model)")
    ax.axhline(probe.majority, color="grey", linewidth=0.8, label="majority class")
    ax.set_ylim(0.3, 1.0)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel(f"{probe.folds}-fold accuracy")
    ax.set_title(f"sentiment probe on mean-pooled hidden states ({probe.examples} sentences)", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def figures(ex: Explanation, progress=None) -> dict[str, bytes]:
    """File name -> PNG bytes of every figure of the report; `progress(done, total)` after each attention map."""
    # Tokens are arbitrary text: a "$" must not start matplotlib's math mode.
    with _plt().rc_context({"text.parse_math": False}):
        out = {}
        layers = sorted(ex.attention)
        for done, layer in enumerate(layers, 1):
            out[f"attention-layer{layer:02d}.png"] = attention_figure(ex, layer)
            if progress is not None:
                progress(done, len(layers))
        out["logit-lens.png"] = lens_figure(ex)
        out["logit-lens-target.png"] = target_figure(ex)
        out["attributions.png"] = attribution_figure(ex)
        if ex.patching is not None:
            out["patching.png"] = patching_figure(ex)
        if ex.probe is not None:
            out["probe.png"] = probe_figure(ex)
    return out


def summary(ex: Explanation) -> dict[str, Any]:
    """The numbers behind the figures, as JSON-ready values."""
    lens = ex.lens
    data: dict[str, Any] = {
        "model": ex.model_name, "prompt": ex.prompt, "ids": ex.ids, "tokens": ex.tokens,
        "target": {"id": ex.target, "text": ex.target_text, "note": ex.target_note},
        "config": ex.config, "seconds": ex.seconds,
        "logit_lens": {
            "final_ids": lens.final_ids.tolist(),
            "top_ids": lens.top_ids.tolist(), "top_probs": _round(lens.top_probs.tolist()),
            "final_rank": lens.final_rank.tolist(), "final_prob": _round(lens.final_prob.tolist()),
            "target_rank": lens.target_rank.tolist(), "target_prob": _round(lens.target_prob.tolist()),
            "first_layer_on_top": lens.first_layer_on_top(),
        },
        "attributions": {a.method: {"scores": _round(a.scores.tolist()), "score": a.score, "contrast": a.contrast,
                                    "baseline_score": a.baseline_score, "completeness_error": a.completeness_error}
                         for a in ex.attributions},
        "attention_layers": sorted(ex.attention),
        "labels": {str(k): v for k, v in ex.labels.items()},
    }
    if ex.patching is not None:
        p = ex.patching
        data["patching"] = {"compare": ex.compare, "compare_tokens": ex.compare_tokens, "answer": p.answer,
                            "wrong": p.wrong, "wrong_text": ex.wrong_text, "clean_diff": p.clean_diff,
                            "corrupted_diff": p.corrupted_diff,
                            "restored": {site: _round(r.tolist()) for site, r in p.restored.items()}}
    if ex.probe is not None:
        data["probe"] = {"task": "sentiment", "accuracy": _round(ex.probe.accuracy.tolist()),
                         "control": _round(ex.probe.control.tolist()), "majority": ex.probe.majority,
                         "examples": ex.probe.examples, "folds": ex.probe.folds, "best_layer": ex.probe.best_layer,
                         "random_model": None if ex.probe.random_model is None else
                         _round(ex.probe.random_model.tolist())}
    if ex.activations is not None:
        data["neuron"] = {"layer": ex.neuron[0], "index": ex.neuron[1],
                          "top": [{"value": a.value, "text": a.text, "position": a.position, "token": a.token,
                                   "context": a.context} for a in ex.activations]}
    return data


def _round(values, digits: int = 5):
    if isinstance(values, list):
        return [_round(v, digits) for v in values]
    return round(float(values), digits)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
img{max-width:100%;border:1px solid #ddd;margin:.4em 0}table{border-collapse:collapse;font-size:13px;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}code{background:#f3f3f3;padding:0 3px}
details{margin:.3em 0}.note{color:#666;font-size:13px}"""


def render_html(ex: Explanation, pngs: dict[str, bytes]) -> str:
    lens = ex.lens
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>lmforge explain: {esc(ex.prompt[:60])}</title>",
             f"<style>{STYLE}</style></head><body>",
             f"<h1>Why does {esc(ex.model_name)} predict {esc(repr(ex.target_text))}?</h1>",
             f"<p>Prompt: <code>{esc(ex.prompt)}</code> ({len(ex.ids)} tokens: "
             f"{esc(' | '.join(ex.tokens))}). Explained token: <code>{esc(repr(ex.target_text))}</code> "
             f"(id {ex.target}) after the last token.</p>"]
    if ex.target_note:
        parts.append(f"<p class='note'>{esc(ex.target_note)}</p>")
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in ex.seconds.items())
    parts.append(f"<p class='note'>{ex.config['n_layer']} layers, {ex.config['n_head']} query heads "
                 f"({ex.config['n_kv_head']} key/value heads). Time: {esc(timing)}.</p>")

    parts.append("<h2>Logit lens</h2><p>Each layer's residual stream read through the final norm and the "
                 "vocabulary head. Colour: probability of the token the model finally predicts at that position; "
                 "text: the layer's own top token.</p>")
    parts.append(_img(pngs["logit-lens.png"], "logit lens"))
    parts.append(_img(pngs["logit-lens-target.png"], "target rank per layer"))
    on_top = lens.first_layer_on_top()
    parts.append(f"<p>The target is the top token from layer {on_top} on.</p>" if on_top is not None else
                 "<p>The target never stays the top token.</p>")
    rows = []
    for layer in range(lens.top_ids.shape[0]):
        tops = ", ".join(f"{ex.label(i)} {p:.2f}" for i, p in zip(lens.top_ids[layer, -1].tolist(),
                                                                    lens.top_probs[layer, -1].tolist()))
        rows.append([layer, int(lens.target_rank[layer]) + 1, f"{float(lens.target_prob[layer]):.4f}", tops])
    parts.append("<details open><summary>Target rank and top tokens at the last position, per layer</summary>"
                 + _table(["layer", "target rank", "target prob", "top tokens"], rows) + "</details>")

    parts.append("<h2>Token attributions</h2><p>How much each prompt token contributes to "
                 f"{esc(explained_quantity(ex))} at the last position: gradient x input, integrated gradients from the "
                 f"{esc(ex.config['baseline'])} baseline ({ex.config['ig_steps']} steps, {esc(ex.config['ig_rule'])} "
                 "rule), and occlusion (its drop when the token is replaced by the baseline)."
                 + (" The first token stays itself in the baseline (the attention sink), so it gets no attribution "
                    "from integrated gradients and occlusion." if ex.config.get("keep_first") else "") + "</p>")
    parts.append(_img(pngs["attributions.png"], "attributions"))
    ig = next(a for a in ex.attributions if a.method == "integrated_gradients")
    gap = ig.score - ig.baseline_score
    parts.append(f"<p>Completeness: the integrated-gradients scores sum to {float(ig.scores.sum()):.4f}; "
                 f"f(prompt) - f(baseline) = {ig.score:.4f} - {ig.baseline_score:.4f} = {gap:.4f} "
                 f"(error {ig.completeness_error:.2e}, {ig.completeness_error / max(abs(gap), 1e-12):.1%} of the gap;"
                 " more --ig-steps shrink it).</p>")
    rows = [[i, tok] + [f"{float(a.scores[i]):+.4f}" for a in ex.attributions] for i, tok in enumerate(ex.tokens)]
    parts.append(_table(["position", "token"] + [a.method.replace("_", " ") for a in ex.attributions], rows))

    if ex.patching is not None:
        p = ex.patching
        parts.append("<h2>Activation patching</h2>"
                     f"<p>Clean: <code>{esc(ex.prompt)}</code>; corrupted: <code>{esc(ex.compare)}</code>. "
                     f"Metric: logit({esc(repr(ex.target_text))}) - logit({esc(repr(ex.wrong_text))}) at the last "
                     f"position: {p.clean_diff:.3f} clean, {p.corrupted_diff:.3f} corrupted. Each cell runs the "
                     "corrupted prompt with one activation (layer, position) taken from the clean run and shows "
                     "the share of the difference it restores (1 = all, 0 = none).</p>")
        parts.append(_img(pngs["patching.png"], "activation patching"))

    if ex.probe is not None:
        probe = ex.probe
        best = probe.best_layer
        parts.append("<h2>Linear probes</h2>"
                     f"<p>Logistic regression on each layer's mean-pooled hidden states, {probe.folds}-fold "
                     f"cross-validated on {probe.examples} sentences; the control is the same probe on shuffled "
                     f"labels. Best selectivity at layer {best}: {float(probe.accuracy[best]):.1%} against "
                     f"{float(probe.control[best]):.1%} for the control."
                     + (f" An untrained model of the same architecture reaches at most "
                        f"{float(probe.random_model.max()):.1%}." if probe.random_model is not None else "")
                     + "</p>")
        parts.append(_img(pngs["probe.png"], "probe accuracy per layer"))

    if ex.activations is not None:
        layer, index = ex.neuron
        parts.append(f"<h2>Neuron {layer}:{index}</h2><p>The tokens of the Pang &amp; Lee polarity sentences on "
                     f"which feed-forward neuron {index} of layer {layer} fires most (the value entering the down "
                     "projection), with the text before them.</p>")
        rows = [[f"{a.value:.3f}", a.token, a.context] for a in ex.activations]
        parts.append(_table(["activation", "token", "context"], rows))

    parts.append("<h2>Attention maps</h2><p>Probabilities recomputed from each layer's queries and keys "
                 "(RoPE, grouped-query heads and the causal mask as the model applies them).</p>")
    for layer in sorted(ex.attention):
        parts.append(f"<details{' open' if layer == min(ex.attention) else ''}><summary>layer {layer}</summary>"
                     + _img(pngs[f"attention-layer{layer:02d}.png"], f"attention layer {layer}") + "</details>")
    parts.append("</body></html>\n")
    return "".join(parts)


def check_output(out: str | Path) -> Path:
    """The report's path, refused before any work when it cannot be written."""
    out = Path(out)
    if out.is_dir():
        raise LmforgeError(f"--out {out} is a directory; give a file name such as report.html")
    if not out.parent.is_dir():
        raise LmforgeError(f"the folder of --out {out} does not exist")
    return out


def write_report(ex: Explanation, out: str | Path, figures_dir: str | Path | None = None,
                 progress=None) -> dict[str, Path]:
    """The HTML report at `out`, its numbers at `out` with .json, and the PNGs in `figures_dir` if given."""
    out = check_output(out)
    pngs = figures(ex, progress)
    written = {"html": write_text_atomic(out, render_html(ex, pngs))}
    json_path = out.with_suffix(".json") if out.suffix.lower() != ".json" else out.with_suffix(".data.json")
    written["json"] = write_json_atomic(json_path, summary(ex))
    if figures_dir is not None:
        folder = Path(figures_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for name, png in pngs.items():
            with atomic_path(folder / name) as tmp:
                tmp.write_bytes(png)
        written["figures"] = folder
    return written
