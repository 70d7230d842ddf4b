"""Hyperparameter search (P10): random search and successive halving over pretraining recipes.

A *search space* names recipe fields and how to draw each (a TOML file)::

    "optim.lr"              = { log_uniform = [1e-4, 1e-2] }   # exp(U(log a, log b))
    "schedule.warmup_steps" = { int_uniform = [0, 40] }        # an integer in [a, b]
    "optim.weight_decay"    = { uniform = [0.0, 0.2] }
    "model.n_embd"          = { choice = [64, 96, 128] }       # one of the values
    "train.batch_size"      = { choice = [4, 8, 16] }

(sections may also be TOML tables: ``[optim]`` then ``lr = { log_uniform = [...] }``). Trial i
draws its values from a generator seeded by ``(seed, i)``, so a search is reproducible and
asking for more trials keeps the first ones. A sampled ``model.n_embd`` keeps the recipe's
ratio of feed-forward width to model width unless ``model.intermediate_size`` is sampled too.

Two methods, both on the one pretraining loop (lmforge/train/loop.py), every trial a run
directory ``OUT/trials/NNN`` with its checkpoints and log:

- ``random`` (Bergstra & Bengio, 2012): every trial trains the full budget R steps. Against a
  grid it tries a new value of every important parameter in every trial.
- ``halving`` (successive halving, the inner loop of Hyperband; Jamieson & Talwalkar 2016,
  Li et al. 2017): all n trials train r0 = ``min_steps`` steps; the best 1/eta by validation
  loss are *promoted* and continue to r0 * eta steps, and so on, until the survivors reach R.
  The cost is about n r0 (1 + 1/eta^0 ... ) ~ rungs x n r0 instead of n R: many configurations
  are tried for the price of a few full runs, on the bet that a bad one is visible early.

A promoted trial is not restarted: it resumes from its own checkpoint at the rung's step (the
loop's exact resume: weights, optimizer moments, RNG, data position), and its schedule was laid
out for R steps from the start (``train.max_steps = R``, stopped at each rung with
``train.stop_at_step``), so a trial that reaches R equals one trained to R without stops.

The search's state is its trials' own logs and checkpoints, so an interrupted search started
again with the same arguments continues where it stopped (OUT/search.json records the
arguments and refuses different ones). Results: OUT/trials.csv, OUT/hpsearch.md (the table,
best first), OUT/hpsearch.json and OUT/plots/hpsearch.png (loss against step of every trial,
the promoted ones highlighted).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from lmforge.errors import LmforgeError
from lmforge.options import option

METHODS = ("random", "halving")
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "choice")
_SEARCH_OWNS = ("train.max_steps", "train.stop_at_step", "train.out", "train.eval_interval", "train.save_interval")


@dataclass
class SearchOptions:
    """How to search (the recipe says what a trial is; the space what varies)."""

    space: str | None = option(None, help="TOML file of the recipe fields to vary and their ranges or choices")
    method: str = option("halving", choices=METHODS, help="random: every trial trains the full budget; halving: "
                                                          "successive halving (keep the best 1/eta at each rung)")
    trials: int = option(9, help="configurations drawn")
    eta: int = option(3, help="halving: keep the best 1/eta of the trials at each rung")
    min_steps: int = option(20, help="halving: the steps every trial trains before the first cut")
    max_steps: int | None = option(None, help="a finished trial's steps (default: the recipe's train.max_steps)")
    seed: int = option(0, help="seed of the draws (trial i uses (seed, i))")
    out: str = option("runs/hpsearch", help="the search directory (trials/, trials.csv, hpsearch.md, plots/)")

    def validate(self) -> None:
        if self.method not in METHODS:
            raise LmforgeError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.trials < 1:
            raise LmforgeError("trials must be at least 1")
        if self.method == "halving" and (self.eta < 2 or self.min_steps < 1):
            raise LmforgeError("halving needs eta >= 2 and min_steps >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise LmforgeError("max_steps must be positive")


# -- the space ------------------------------------------------------------------------------------

def read_space(path: str | Path) -> dict[str, dict[str, list]]:
    """``{"section.field": {kind: values}}`` from a TOML file, checked against the recipe's fields."""
    import tomllib

    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"no such search space file: {file}") from None
    except tomllib.TOMLDecodeError as exc:
        raise LmforgeError(f"{file}: not valid TOML ({exc})") from None
    return parse_space(data, str(file))


def parse_space(data: dict[str, Any], source: str = "space") -> dict[str, dict[str, list]]:
    from lmforge.train.recipe import _HINTS

    space: dict[str, dict[str, list]] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS:
            space[prefix] = value
        elif isinstance(value, dict):
            for key, inner in value.items():
                visit(f"{prefix}.{key}" if prefix else key, inner)
        else:
            raise LmforgeError(f"{source}: {prefix} must be a table with one of {', '.join(DISTRIBUTIONS)}, "
                               f"e.g. {{ log_uniform = [1e-4, 1e-2] }}")

    visit("", data)
    if not space:
        raise LmforgeError(f"{source}: the search space names no recipe fields")
    for key, dist in space.items():
        section, _, name = key.partition(".")
        if section not in _HINTS or name not in _HINTS[section]:
            raise LmforgeError(f"{source}: {key} is not a recipe field (SECTION.FIELD, e.g. optim.lr)")
        if key in _SEARCH_OWNS:
            raise LmforgeError(f"{source}: {key} is set by the search itself (the budget is --max-steps)")
        (kind, values), = dist.items()
        if not isinstance(values, list) or not values:
            raise LmforgeError(f"{source}: {key}: {kind} takes a list")
        if kind != "choice":
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
                    or values[0] > values[1]:
                raise LmforgeError(f"{source}: {key}: {kind} takes [low, high] numbers with low <= high")
            if kind == "log_uniform" and values[0] <= 0:
                raise LmforgeError(f"{source}: {key}: log_uniform needs low > 0")
            if kind == "int_uniform" and not all(isinstance(v, int) for v in values):
                raise LmforgeError(f"{source}: {key}: int_uniform takes two integers")
    return space


def sample(space: dict[str, dict[str, list]], seed: int, trial: int) -> dict[str, Any]:
    """Trial ``trial``'s values: a pure function of (space, seed, trial)."""
    rng = random.Random(f"hpsearch:{seed}:{trial}")
    values: dict[str, Any] = {}
    for key in sorted(space):
        (kind, v), = space[key].items()
        if kind == "uniform":
            values[key] = rng.uniform(v[0], v[1])
        elif kind == "log_uniform":
            values[key] = math.exp(rng.uniform(math.log(v[0]), math.log(v[1])))
        elif kind == "int_uniform":
            values[key] = rng.randint(v[0], v[1])
        else:
            values[key] = v[rng.randrange(len(v))]
    return values


def trial_config(base, values: dict[str, Any], out: Path, max_steps: int, eval_interval: int):
    """``base`` (a PretrainConfig) with ``values`` set, trained for ``max_steps`` into ``out``."""
    from lmforge.train.recipe import _HINTS, coerce

    config = copy.deepcopy(base)
    for key, value in values.items():
        section, _, name = key.partition(".")
        setattr(getattr(config, section), name, coerce(value, _HINTS[section][name], key))
    m = config.model
    if "model.n_embd" in values and "model.intermediate_size" not in values:
        ratio = base.model.intermediate_size / base.model.n_embd
        m.intermediate_size = max(8, 8 * round(ratio * m.n_embd / 8))
    t = config.train
    t.max_steps, t.out, t.stop_at_step = max_steps, str(out), None
    t.eval_interval = min(eval_interval, max_steps)
    t.save_interval = max_steps  # checkpoints only where a rung stops (and at the end)
    t.keep_last, t.sample_tokens, t.plots = 1, 0, False
    if config.schedule.warmup_steps > max_steps:
        config.schedule.warmup_steps = max_steps
    if m.n_embd % m.n_head:
        raise LmforgeError(f"model.n_embd {m.n_embd} is not divisible by model.n_head {m.n_head}: "
                           "choose widths that are multiples of the head count")
    config.validate()
    return config


def rungs(min_steps: int, max_steps: int, eta: int) -> list[int]:
    """Successive halving's step budgets: min_steps x eta^k below max_steps, then max_steps."""
    out, steps = [], min_steps
    while steps < max_steps:
        out.append(steps)
        steps *= eta
    return out + [max_steps]


# -- the trials' state (read from their own logs and checkpoints) ---------------------------------

def _records(run: Path) -> list[dict[str, Any]]:
    from lmforge.train.telemetry import read_log

    log = run / "logs" / "train.jsonl"
    return read_log(log) if log.is_file() else []


def _checkpoint_step(run: Path) -> int:
    from lmforge.train.checkpoint import list_checkpoints

    found = list_checkpoints(run / "checkpoints")
    return found[-1][0] if found else 0


def _loss_at(run: Path, step: int) -> float | None:
    """The trial's validation loss at ``step`` if it has been trained (and checkpointed) that far."""
    if _checkpoint_step(run) < step:
        return None
    for r in reversed(_records(run)):
        if r["kind"] == "eval" and r["step"] == step:
            return r["val_loss"]
    return None


def _train_to(config, stop: int) -> None:
    """Train (or continue, from the newest checkpoint) one trial up to ``stop`` steps."""
    from lmforge.train.distributed import shutdown
    from lmforge.train.loop import Trainer

    config.train.stop_at_step = stop if stop < config.train.max_steps else None
    trainer = Trainer(config, resume=True, progress=False, log=lambda _m: None)
    try:
        result = trainer.run()
    finally:
        shutdown(trainer.runtime)
    if not result.get("validation"):
        raise LmforgeError(f"{config.data.path} has no validation split: a search needs validation loss")


# -- the search -----------------------------------------------------------------------------------

def run_search(base, options: SearchOptions, space: dict[str, dict[str, list]] | None = None,
               log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Run (or continue) the search; returns the result that hpsearch.json holds."""
    from lmforge.io.atomic import write_json_atomic, write_text_atomic
    from lmforge.io.progress import Progress

    options.validate()
    if space is None:
        if options.space is None:
            raise LmforgeError("give a search space (--space FILE.toml)")
        space = read_space(options.space)
    else:
        space = parse_space(space)
    out = Path(options.out)
    budget = options.max_steps or base.train.max_steps
    plan = rungs(min(options.min_steps, budget), budget, options.eta) if options.method == "halving" else [budget]
    eval_interval = plan[0] if options.method == "halving" else min(base.train.eval_interval, budget)
    base_recipe = base.to_dict()
    base_recipe["train"] = {k: v for k, v in base_recipe["train"].items() if k != "out"}
    identity = {"options": {k: v for k, v in asdict(options).items() if k not in ("out", "space")},
                "budget": budget, "space": space, "recipe": base_recipe}
    state_file = out / "search.json"
    if state_file.is_file():
        before = json.loads(state_file.read_text(encoding="utf-8"))
        if before != json.loads(json.dumps(identity)):
            raise LmforgeError(f"{out} holds a search with other settings, space or recipe: continue it with the "
                               "same ones, or choose another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(state_file, identity)

    values = [sample(space, options.seed, i) for i in range(options.trials)]
    runs = [out / "trials" / f"{i:03d}" for i in range(options.trials)]
    configs = [trial_config(base, v, run, budget, eval_interval) for v, run in zip(values, runs)]
    losses: list[dict[int, float]] = [{} for _ in runs]
    reached = [0] * options.trials  # the highest rung index each trial was trained for
    alive = list(range(options.trials))
    total = _planned_steps(options.trials, plan, options.eta) if options.method == "halving" else options.trials * budget
    bar = Progress("hpsearch", total, unit="steps", enabled=progress)
    done = 0
    for level, steps in enumerate(plan):
        log(f"rung {level}: {len(alive)} trial(s) to {steps} steps")
        for i in alive:
            previous = plan[level - 1] if level else 0
            loss = _loss_at(runs[i], steps)
            if loss is None:
                _train_to(configs[i], steps)
                loss = _loss_at(runs[i], steps)
                if loss is None:
                    raise LmforgeError(f"trial {i} ({runs[i]}) has no validation loss at step {steps}")
                how = "trained"
            else:
                how = "done before"
            losses[i][steps] = loss
            reached[i] = level
            done += steps - previous
            bar.update(done, info=f"trial {i} rung {level}")
            log(f"  trial {i:3d} {_describe(values[i])}: validation loss {loss:.4f} at step {steps} ({how})")
        if level + 1 < len(plan):
            keep = max(1, len(alive) // options.eta)
            alive = sorted(alive, key=lambda i: (_finite(losses[i][steps]), i))[:keep]
    bar.close()

    final_steps = plan[-1]
    order = sorted(range(options.trials), key=lambda i: (-reached[i], _finite(losses[i][plan[reached[i]]]), i))
    trials = []
    for i in range(options.trials):
        last = plan[reached[i]]
        trials.append({"trial": i, "params": values[i], "losses": {str(k): v for k, v in losses[i].items()},
                       "steps": last, "loss": losses[i][last], "rung": reached[i],
                       "status": "best" if i == order[0] else ("finished" if last == final_steps else
                                                               f"stopped after {last} steps")})
    trained = sum(t["steps"] for t in trials)
    result = {"method": options.method, "trials": trials, "ranking": order, "best": trials[order[0]],
              "rungs": plan, "eta": options.eta if options.method == "halving" else None, "seed": options.seed,
              "budget": budget, "steps_trained": trained, "steps_if_all_finished": options.trials * budget,
              "space": space, "out": str(out)}
    plot = plot_search(result, runs, out / "plots" / "hpsearch.png")
    result["plot"] = str(plot) if plot else None
    write_text_atomic(out / "trials.csv", trials_csv(result))
    write_text_atomic(out / "hpsearch.md", format_search(result))
    write_json_atomic(out / "hpsearch.json", result)
    return result


def _planned_steps(n: int, plan: list[int], eta: int) -> int:
    total, alive, previous = 0, n, 0
    for level, steps in enumerate(plan):
        total += alive * (steps - previous)
        previous = steps
        if level + 1 < len(plan):
            alive = max(1, alive // eta)
    return total


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _describe(params: dict[str, Any]) -> str:
    return " ".join(f"{k.split('.', 1)[1]}={_format_value(v)}" for k, v in params.items())


def trials_csv(result: dict[str, Any]) -> str:
    """One row per trial: its values, its validation loss at every rung it reached, its status."""
    keys = sorted(result["space"])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial", *keys, *[f"val_loss@{s}" for s in result["rungs"]], "steps", "status"])
    for t in result["trials"]:
        writer.writerow([t["trial"], *[t["params"][k] for k in keys],
                         *[t["losses"].get(str(s), "") for s in result["rungs"]], t["steps"], t["status"]])
    return buffer.getvalue()


def format_search(result: dict[str, Any]) -> str:
    keys = sorted(result["space"])
    title = "Successive halving" if result["method"] == "halving" else "Random search"
    best = result["best"]
    lines = [f"# {title}: {len(result['trials'])} trials", "",
             f"Rungs (steps): {', '.join(map(str, result['rungs']))}"
             + (f"; eta {result['eta']} (the best 1/{result['eta']} go on at each rung)" if result["eta"] else ""),
             f"Steps trained: {result['steps_trained']:,} (all trials to the end: {result['steps_if_all_finished']:,}).",
             f"Best: trial {best['trial']}, validation loss {best['loss']:.4f} after {best['steps']} steps with "
             + ", ".join(f"`{k}` = {_format_value(v)}" for k, v in best["params"].items()) + ".", "",
             "| trial | " + " | ".join(f"`{k}`" for k in keys) + " | "
             + " | ".join(f"loss @ {s}" for s in result["rungs"]) + " | status |",
             "|---:|" + "---:|" * (len(keys) + len(result["rungs"])) + "---|"]
    for i in result["ranking"]:
        t = result["trials"][i]
        cells = [_format_value(t["params"][k]) for k in keys]
        cells += [f"{t['losses'][str(s)]:.4f}" if str(s) in t["losses"] else "" for s in result["rungs"]]
        lines.append(f"| {t['trial']} | " + " | ".join(cells) + f" | {t['status']} |")
    if result.get("plot"):
        lines += ["", "![loss against step](plots/hpsearch.png)"]
    return "\n".join(lines) + "\n"


def plot_search(result: dict[str, Any], runs: list[Path], out: Path) -> Path | None:
    """Training loss (smoothed) and validation loss against step for every trial; the further a
    trial was promoted, the stronger its line; the best in red."""
    from lmforge.io.atomic import atomic_path
    from lmforge.io.plots import pyplot

    plt = pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    top = max(t["rung"] for t in result["trials"]) or 1
    best = result["best"]["trial"]
    for t, run in zip(result["trials"], runs):
        records = _records(run)
        train = [r for r in records if r["kind"] == "train" and r["step"] <= t["steps"]]
        evals = [r for r in records if r["kind"] == "eval" and r["step"] <= t["steps"]]
        smooth, value = [], None
        for r in train:
            value = r["loss"] if value is None else 0.9 * value + 0.1 * r["loss"]
            smooth.append(value)
        strength = t["rung"] / top
        style = {"color": "tab:red", "lw": 2.2, "alpha": 1.0, "zorder": 3} if t["trial"] == best else \
            {"color": "tab:blue" if t["rung"] else "grey", "lw": 0.8 + 1.2 * strength, "alpha": 0.35 + 0.5 * strength}
        label = f"best (trial {best})" if t["trial"] == best else None
        left.plot([r["step"] for r in train], smooth, label=label, **style)
        right.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3, label=label, **style)
    for axis in (left, right):
        for s in result["rungs"][:-1]:
            axis.axvline(s, color="black", ls=":", lw=0.8)
        axis.set_xlabel("step")
    left.set(ylabel="training loss (smoothed)", title="all trials (grey: stopped at the first rung)")
    right.set(ylabel="validation loss", title="validation loss at evaluations")
    left.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out
