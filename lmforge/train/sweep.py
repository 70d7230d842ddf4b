"""Scaling-law sweep (P8): many small pretraining runs, one fitted law.

Each run takes a base recipe and changes two things: the model width (``n_embd``, with
the SwiGLU width and head count scaled along) and the number of steps (so the token
budget D). After each run the final validation loss is recorded as a point
(N, D, loss); the points are fitted with `lmforge.train.scaling.fit_scaling_law`
(L(N, D) when the sweep has several token budgets, L(N) otherwise) and plotted.

N is the non-embedding parameter count by default: at these tiny sizes the embedding
table is a large share of the parameters but adds almost no compute per token, and
Kaplan et al. found the trend much cleaner without it. ``count="total"`` uses all
parameters, as Hoffmann et al. did for large models.

Finished runs are skipped when the sweep is started again, so an interrupted sweep
continues where it stopped.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from lmforge.errors import LmforgeError
from lmforge.train.recipe import PretrainConfig


def scaled_recipe(base: PretrainConfig, width: int, steps: int, out: Path) -> PretrainConfig:
    """``base`` with width ``width`` (head size kept at 32 where possible) and ``steps`` steps."""
    config = copy.deepcopy(base)
    m, t, s = config.model, config.train, config.schedule
    head_dim = 32 if width % 32 == 0 else 16 if width % 16 == 0 else width
    m.n_embd, m.n_head = width, max(1, width // head_dim)
    m.n_kv_head = m.n_head
    m.intermediate_size = 8 * ((8 * width // 3 + 7) // 8)  # ~8/3 of the width, as in Llama
    t.max_steps = steps
    t.out = str(out)
    t.stop_at_step = None
    t.eval_interval = t.save_interval = steps  # evaluate and checkpoint once, at the end
    t.sample_tokens = 0
    s.warmup_steps = min(s.warmup_steps, max(1, steps // 10))
    config.validate()
    return config


def non_embedding_parameters(model) -> int:
    embedding = {id(p) for name, p in model.named_parameters() if name.startswith(("embed.", "pos_embed.", "lm_head."))}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen and id(p) not in embedding:
            seen.add(id(p))
            total += p.numel()
    return total


def run_sweep(base: PretrainConfig, widths: Sequence[int], steps: Sequence[int], out: str | Path,
              count: str = "non-embedding", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every (width, steps) pair, fit the law, write sweep.json, sweep.md and scaling.png."""
    from lmforge.io.atomic import write_json_atomic, write_text_atomic
    from lmforge.train.loop import Trainer
    from lmforge.train.scaling import fit_scaling_law, plot_scaling

    if count not in ("non-embedding", "total"):
        raise LmforgeError("count must be 'non-embedding' or 'total'")
    if not widths or not steps or min(widths) < 8 or min(steps) < 1:
        raise LmforgeError("give at least one width (>= 8) and one step count (>= 1)")
    out = Path(out)
    points = []
    for width in widths:
        for n_steps in steps:
            run_dir = out / "runs" / f"width{width}-steps{n_steps}"
            report_file = run_dir / "report.json"
            if report_file.is_file():
                report = json.loads(report_file.read_text(encoding="utf-8"))
                log(f"width {width}, {n_steps} steps: done before, loss {report['final_val_loss']:.4f}")
            else:
                trainer = Trainer(scaled_recipe(base, width, n_steps, run_dir), resume=True, progress=False,
                                  log=lambda _m: None)
                result = trainer.run()
                if not result["validation"]:
                    raise LmforgeError(f"{base.data.path} has no validation split: a sweep needs validation loss")
                report = {"width": width, "steps": n_steps, "tokens": result["tokens"],
                          "params_total": result["parameters"],
                          "params_non_embedding": non_embedding_parameters(trainer.model),
                          "final_val_loss": result["validation"][-1]["val_loss"], "train_seconds": result["train_seconds"]}
                write_json_atomic(report_file, report)
                log(f"width {width}, {n_steps} steps: N={report['params_non_embedding']:,} "
                    f"D={report['tokens']:,} loss {report['final_val_loss']:.4f}")
            points.append({"params": report["params_non_embedding" if count == "non-embedding" else "params_total"],
                           "tokens": report["tokens"], "loss": report["final_val_loss"],
                           "width": width, "steps": n_steps})
    with_tokens = len(set(steps)) > 1
    try:
        fit = fit_scaling_law(points, with_tokens=with_tokens)
    except ValueError as exc:
        raise LmforgeError(f"cannot fit the scaling law: {exc}") from None
    plot = None
    try:
        plot = plot_scaling(points, fit, str(out / "scaling.png"), title=f"loss vs N ({count} parameters)")
    except ValueError:
        pass
    result = {"count": count, "law": "L(N, D)" if with_tokens else "L(N)", "fit": fit.to_dict(), "points": points,
              "plot": plot}
    write_json_atomic(out / "sweep.json", result)
    write_text_atomic(out / "sweep.md", format_sweep(result))
    return result


def law_text(fit: dict[str, Any]) -> str:
    """``L = E + A / N^alpha [+ B / D^beta]`` with the fitted constants."""
    law = f"L = {fit['E']:.3f} + {fit['A']:.3g} / N^{fit['alpha']:.3f}"
    if fit.get("B") is not None:
        law += f" + {fit['B']:.3g} / D^{fit['beta']:.3f}"
    return law


def format_sweep(result: dict[str, Any]) -> str:
    law = law_text(result["fit"])
    lines = ["# Scaling sweep", "", f"Fitted {result['law']} over {len(result['points'])} runs "
             f"(N = {result['count']} parameters): `{law}`", "",
             "| width | steps | N | D (tokens) | validation loss |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {p['width']} | {p['steps']} | {p['params']:,} | {p['tokens']:,} | {p['loss']:.4f} |"
              for p in result["points"]]
    if result["plot"]:
        lines += ["", "![loss against N](scaling.png)"]
    return "\n".join(lines) + "\n"
