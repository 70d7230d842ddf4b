"""Human evaluation (E5): Likert ratings, pairwise A/B preferences, ratings and agreement.

Annotations are JSON lines, one judgement per line, of two kinds:

    {"item": "q7", "rater": "ana", "system": "model-a", "rating": 4, "criterion": "helpfulness"}
    {"item": "q7", "rater": "ana", "a": "model-a", "b": "model-b", "winner": "a",
     "prompt": "...", "response_a": "...", "response_b": "..."}

`winner` is "a", "b" or "tie" (or the name of system a or b). `criterion` defaults to
"overall"; prompt and responses are needed only to export preference data.

From these, lmforge computes:

- Likert summaries per criterion and system (mean, bootstrap interval, distribution);
- win rates with ties as half a win, with Wilson or bootstrap intervals;
- Elo ratings: online updates in file order, R_a += K * (S_a - E_a) with
  E_a = 1 / (1 + 10 ** ((R_b - R_a) / 400)) and S_a in {1, 0.5, 0}. Cheap and incremental,
  but the result depends on the order of the games and a recent game weighs more;
- Bradley-Terry strengths: the maximum-likelihood p with P(i beats j) = p_i / (p_i + p_j),
  fitted by the MM iteration p_i <- W_i / sum_j n_ij / (p_i + p_j) (Hunter, 2004), ties as
  half a win for each side. Order-free, it uses all games at once; shown on the Elo
  scale as 1000 + 400 * log10(p_i / geometric mean of p);
- agreement between raters: Cohen's kappa (two raters), Fleiss' kappa (any fixed number
  of raters per unit);
- preference pairs (prompt, chosen, rejected) for reward-model or DPO training.

What these numbers cannot tell: whether the raters were the right people for the task,
whether the prompts represent real use, or why a system won. Low agreement (kappa below
about 0.4) means the rubric or the task is ambiguous and the ratings should not be
trusted as they are, however narrow the intervals.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Iterable, Sequence

from ..errors import LmforgeError
from ..io import text_files
from .stats import bootstrap_interval, wilson_interval

WINNERS = {"a": "a", "b": "b", "tie": "tie", "draw": "tie", "equal": "tie"}


@dataclass(frozen=True)
class Rating:
    item: str
    rater: str
    system: str
    rating: float
    criterion: str = "overall"


@dataclass(frozen=True)
class Comparison:
    item: str
    rater: str
    a: str
    b: str
    winner: str  # "a", "b" or "tie"
    prompt: str | None = None
    response_a: str | None = None
    response_b: str | None = None

    @property
    def score_a(self) -> float:
        return {"a": 1.0, "b": 0.0, "tie": 0.5}[self.winner]


@dataclass
class Annotations:
    ratings: list[Rating] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)


# ---------------------------------------------------------------------------- loading
def parse_record(record: dict[str, Any], where: str = "record") -> Rating | Comparison:
    if not isinstance(record, dict):
        raise LmforgeError(f"{where}: expected a JSON object, got {type(record).__name__}")
    item, rater = record.get("item", record.get("id")), record.get("rater", record.get("annotator", "anonymous"))
    if item is None:
        raise LmforgeError(f"{where}: missing 'item' (the id of the prompt or example judged)")
    if "rating" in record:
        if "system" not in record:
            raise LmforgeError(f"{where}: a Likert rating needs 'system' (which output was rated)")
        value = record["rating"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LmforgeError(f"{where}: 'rating' must be a number, got {value!r}")
        return Rating(str(item), str(rater), str(record["system"]), float(value),
                      str(record.get("criterion", "overall")))
    if "winner" in record:
        if "a" not in record or "b" not in record:
            raise LmforgeError(f"{where}: a pairwise judgement needs 'a' and 'b' (the two systems)")
        a, b, winner = str(record["a"]), str(record["b"]), str(record["winner"])
        if a == b:
            raise LmforgeError(f"{where}: 'a' and 'b' are the same system {a!r}")
        key = WINNERS.get(winner.lower()) or ("a" if winner == a else "b" if winner == b else None)
        if key is None:
            raise LmforgeError(f"{where}: 'winner' must be 'a', 'b', 'tie' or one of the two systems, got {winner!r}")
        return Comparison(str(item), str(rater), a, b, key, record.get("prompt"),
                          record.get("response_a"), record.get("response_b"))
    raise LmforgeError(f"{where}: neither a Likert rating ('rating') nor a pairwise judgement ('winner')")


def load_annotations(path: str | Path) -> Annotations:
    """Read a JSONL file of ratings and pairwise judgements (blank lines are skipped)."""
    path = Path(path)
    found = Annotations()
    for number, record in text_files.read_jsonl(path, "annotation"):
        parsed = parse_record(record, f"{path}:{number}")
        (found.ratings if isinstance(parsed, Rating) else found.comparisons).append(parsed)
    if not found.ratings and not found.comparisons:
        raise LmforgeError(f"{path} contains no annotations")
    return found


# ---------------------------------------------------------------------------- Likert
def likert_summary(ratings: Sequence[Rating], confidence: float = 0.95, seed: int = 0) -> list[dict[str, Any]]:
    """Per criterion and system: count, mean, standard deviation, bootstrap interval, distribution."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in ratings:
        groups[(r.criterion, r.system)].append(r.rating)
    rows = []
    for (criterion, system), values in sorted(groups.items()):
        n = len(values)
        mean = sum(values) / n
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
        low, high = bootstrap_interval(values, confidence=confidence, seed=seed)
        distribution = {_label(k): c for k, c in sorted(Counter(values).items())}
        rows.append({"criterion": criterion, "system": system, "n": n, "mean": mean, "sd": sd,
                     "ci_low": low, "ci_high": high, "distribution": distribution})
    return rows


def _label(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# ---------------------------------------------------------------------------- pairwise
def systems_of(comparisons: Iterable[Comparison]) -> list[str]:
    return sorted({c.a for c in comparisons} | {c.b for c in comparisons})


def win_rates(comparisons: Sequence[Comparison], method: str = "wilson", confidence: float = 0.95,
              seed: int = 0) -> list[dict[str, Any]]:
    """Per system: games, wins, losses, ties, win rate (ties count half) and its interval."""
    if method not in ("wilson", "bootstrap"):
        raise LmforgeError(f"unknown interval method {method!r} (use wilson or bootstrap)")
    outcomes: dict[str, list[float]] = defaultdict(list)
    for c in comparisons:
        outcomes[c.a].append(c.score_a)
        outcomes[c.b].append(1.0 - c.score_a)
    rows = []
    for system in sorted(outcomes):
        scores = outcomes[system]
        n, points = len(scores), sum(scores)
        low, high = (wilson_interval(points, n, confidence) if method == "wilson"
                     else bootstrap_interval(scores, confidence=confidence, seed=seed))
        rows.append({"system": system, "games": n, "wins": scores.count(1.0), "losses": scores.count(0.0),
                     "ties": scores.count(0.5), "win_rate": points / n, "ci_low": low, "ci_high": high})
    return sorted(rows, key=lambda r: -r["win_rate"])


def head_to_head(comparisons: Sequence[Comparison]) -> dict[str, dict[str, float]]:
    """matrix[x][y]: share of x's games against y that x won (ties half)."""
    points: dict[tuple[str, str], float] = defaultdict(float)
    games: Counter = Counter()
    for c in comparisons:
        points[(c.a, c.b)] += c.score_a
        points[(c.b, c.a)] += 1.0 - c.score_a
        games[(c.a, c.b)] += 1
        games[(c.b, c.a)] += 1
    matrix: dict[str, dict[str, float]] = defaultdict(dict)
    for (x, y), n in games.items():
        matrix[x][y] = points[(x, y)] / n
    return dict(matrix)


def elo_ratings(comparisons: Sequence[Comparison], k: float = 32.0, initial: float = 1000.0,
                scale: float = 400.0) -> dict[str, float]:
    """Online Elo in the order given; a tie scores 0.5 for both sides."""
    ratings: dict[str, float] = {}
    for c in comparisons:
        ra, rb = ratings.setdefault(c.a, initial), ratings.setdefault(c.b, initial)
        expected_a = 1.0 / (1.0 + 10.0 ** ((rb - ra) / scale))
        delta = k * (c.score_a - expected_a)
        ratings[c.a], ratings[c.b] = ra + delta, rb - delta
    return ratings


def _strongly_connected(systems: list[str], beats: dict[str, set[str]]) -> bool:
    def reach(start: str, edges: dict[str, set[str]]) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    backwards: dict[str, set[str]] = defaultdict(set)
    for x, ys in beats.items():
        for y in ys:
            backwards[y].add(x)
    everyone = set(systems)
    return reach(systems[0], beats) == everyone and reach(systems[0], backwards) == everyone


def bradley_terry(comparisons: Sequence[Comparison], prior: float = 0.0, max_iter: int = 10_000,
                  tol: float = 1e-12) -> dict[str, float]:
    """Bradley-Terry strengths (geometric mean 1) by the MM iteration; ties are half a win each.

    `prior` adds that many virtual games, split evenly, between every pair of systems: it
    keeps strengths finite when a system won (or lost) every game and pulls small samples
    toward equality. With prior=0 every system must be reachable from every other through
    "won or tied against" links, otherwise the maximum likelihood is at infinity.
    """
    systems = systems_of(comparisons)
    if len(systems) < 2:
        raise LmforgeError("Bradley-Terry needs comparisons between at least two systems")
    index = {s: i for i, s in enumerate(systems)}
    size = len(systems)
    wins = [0.0] * size
    games = [[0.0] * size for _ in range(size)]
    beats: dict[str, set[str]] = defaultdict(set)
    for c in comparisons:
        i, j = index[c.a], index[c.b]
        wins[i] += c.score_a
        wins[j] += 1.0 - c.score_a
        games[i][j] += 1
        games[j][i] += 1
        if c.score_a > 0:
            beats[c.a].add(c.b)
        if c.score_a < 1:
            beats[c.b].add(c.a)
    if prior > 0:
        for i in range(size):
            wins[i] += prior / 2 * (size - 1)
            for j in range(size):
                if i != j:
                    games[i][j] += prior
    elif not _strongly_connected(systems, beats):
        raise LmforgeError("Bradley-Terry strengths are unbounded: some system won or lost all its games "
                           "against the rest; add a prior (e.g. prior=0.5) or more comparisons")
    strength = [1.0] * size
    for _ in range(max_iter):
        updated = []
        for i in range(size):
            denominator = sum(games[i][j] / (strength[i] + strength[j]) for j in range(size) if games[i][j])
            updated.append(wins[i] / denominator)
        log_mean = sum(math.log(p) for p in updated) / size
        updated = [p / math.exp(log_mean) for p in updated]
        change = max(abs(math.log(u / s)) for u, s in zip(updated, strength))
        strength = updated
        if change < tol:
            break
    return dict(zip(systems, strength))


def elo_scale(strengths: dict[str, float], base: float = 1000.0, scale: float = 400.0) -> dict[str, float]:
    """Bradley-Terry strengths as Elo-like ratings: a 400-point gap means 10:1 odds."""
    log_mean = sum(math.log10(p) for p in strengths.values()) / len(strengths)
    return {s: base + scale * (math.log10(p) - log_mean) for s, p in strengths.items()}


# ---------------------------------------------------------------------------- agreement
def cohen_kappa(first: Sequence[Hashable], second: Sequence[Hashable], weights: str | None = None) -> float:
    """Cohen's kappa of two raters' labels on the same units.

    kappa = (p_o - p_e) / (1 - p_e): observed agreement corrected by the agreement the two
    raters' label frequencies would give by chance. `weights` "linear" or "quadratic" gives
    the weighted kappa for ordinal labels (numbers), where near misses count partly.
    NaN when chance agreement is already perfect (both always use one and the same label).
    """
    if len(first) != len(second):
        raise LmforgeError(f"the raters labelled {len(first)} and {len(second)} units")
    if not first:
        raise LmforgeError("no units rated by both raters")
    labels = sorted(set(first) | set(second), key=lambda x: (str(type(x)), x))
    position = {label: i for i, label in enumerate(labels)}
    k, n = len(labels), len(first)
    if weights is None:
        disagreement = [[0.0 if i == j else 1.0 for j in range(k)] for i in range(k)]
    elif weights in ("linear", "quadratic"):
        values = [float(x) for x in labels]
        span = (max(values) - min(values)) or 1.0
        power = 1 if weights == "linear" else 2
        disagreement = [[(abs(values[i] - values[j]) / span) ** power for j in range(k)] for i in range(k)]
    else:
        raise LmforgeError(f"unknown kappa weights {weights!r} (use linear or quadratic)")
    observed = [[0.0] * k for _ in range(k)]
    for x, y in zip(first, second):
        observed[position[x]][position[y]] += 1 / n
    row = [sum(observed[i]) for i in range(k)]
    col = [sum(observed[i][j] for i in range(k)) for j in range(k)]
    seen = sum(disagreement[i][j] * observed[i][j] for i in range(k) for j in range(k))
    chance = sum(disagreement[i][j] * row[i] * col[j] for i in range(k) for j in range(k))
    return 1.0 - seen / chance if chance > 0 else math.nan


def fleiss_kappa(table: Sequence[Sequence[float]]) -> float:
    """Fleiss' kappa from a units x categories table of counts (each row sums to the raters per unit).

    P_i = (sum_j n_ij^2 - n) / (n (n - 1)) is the agreement on unit i; p_j the share of all
    labels in category j; kappa = (mean P_i - sum p_j^2) / (1 - sum p_j^2).
    """
    if not table:
        raise LmforgeError("Fleiss' kappa needs at least one unit")
    raters = sum(table[0])
    if raters < 2 or any(abs(sum(row) - raters) > 1e-9 for row in table):
        raise LmforgeError("Fleiss' kappa needs the same number (at least 2) of ratings for every unit")
    units = len(table)
    agreement = sum((sum(c * c for c in row) - raters) / (raters * (raters - 1)) for row in table) / units
    shares = [sum(row[j] for row in table) / (units * raters) for j in range(len(table[0]))]
    chance = sum(p * p for p in shares)
    return (agreement - chance) / (1 - chance) if chance < 1 else math.nan


def label_table(units: dict[Hashable, Sequence[Hashable]]) -> list[list[int]]:
    """{unit: labels from its raters} -> Fleiss count table (categories in sorted order)."""
    categories = sorted({label for labels in units.values() for label in labels}, key=lambda x: (str(type(x)), x))
    return [[Counter(labels)[c] for c in categories] for labels in units.values()]


def agreement(units: dict[Hashable, dict[str, Hashable]]) -> dict[str, Any]:
    """Agreement of raters' labels on shared units ({unit: {rater: label}}).

    Two raters: Cohen's kappa on the units both labelled. More: Fleiss' kappa on the units
    labelled by the most common number of raters (others are counted as skipped).
    Also the raw share of agreeing rater pairs, which kappa corrects for chance.
    """
    shared = {u: labels for u, labels in units.items() if len(labels) >= 2}
    raters = sorted({r for labels in shared.values() for r in labels})
    result: dict[str, Any] = {"raters": len(raters), "units": len(shared), "skipped_units": len(units) - len(shared)}
    if not shared:
        return {**result, "method": None, "kappa": None, "observed_agreement": None}
    pairs = agree = 0
    for labels in shared.values():
        values = list(labels.values())
        for i in range(len(values)):
            for j in range(i + 1, len(values)):
                pairs += 1
                agree += values[i] == values[j]
    result["observed_agreement"] = agree / pairs
    if len(raters) == 2:
        a, b = raters
        keys = [u for u, labels in shared.items() if a in labels and b in labels]
        result.update(method="cohen", kappa=cohen_kappa([shared[u][a] for u in keys], [shared[u][b] for u in keys]))
        return result
    size = Counter(len(labels) for labels in shared.values()).most_common(1)[0][0]
    kept = {u: list(labels.values()) for u, labels in shared.items() if len(labels) == size}
    result["skipped_units"] += len(shared) - len(kept)
    result["units"] = len(kept)
    result.update(method="fleiss", raters_per_unit=size, kappa=fleiss_kappa(label_table(kept)))
    return result


def rating_units(ratings: Sequence[Rating], criterion: str) -> dict[Hashable, dict[str, Hashable]]:
    units: dict[Hashable, dict[str, Hashable]] = defaultdict(dict)
    for r in ratings:
        if r.criterion == criterion:
            units[(r.item, r.system)][r.rater] = r.rating
    return dict(units)


def comparison_units(comparisons: Sequence[Comparison]) -> dict[Hashable, dict[str, Hashable]]:
    """Judgements keyed by (item, systems in sorted order); labels say which system won."""
    units: dict[Hashable, dict[str, Hashable]] = defaultdict(dict)
    for c in comparisons:
        first, second = sorted((c.a, c.b))
        label = "tie" if c.winner == "tie" else (c.a if c.winner == "a" else c.b)
        units[(c.item, first, second)][c.rater] = label
    return dict(units)


# ---------------------------------------------------------------------------- export
def preference_pairs(comparisons: Sequence[Comparison]) -> list[dict[str, Any]]:
    """prompt/chosen/rejected records, one per (item, pair of systems) with a majority winner.

    Votes of several raters on the same pair are added up (ties count for neither side);
    pairs without a majority are left out, because a tie is no preference to learn from.
    """
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for c in comparisons:
        if c.prompt is None or c.response_a is None or c.response_b is None:
            raise LmforgeError(f"item {c.item!r}: exporting preference pairs needs 'prompt', 'response_a' "
                               f"and 'response_b' in every pairwise judgement")
        first, second = sorted((c.a, c.b))
        group = groups.setdefault((c.item, first, second),
                                  {"prompt": c.prompt, "texts": {}, "votes": Counter(), "raters": 0})
        group["texts"][c.a], group["texts"][c.b] = c.response_a, c.response_b
        group["raters"] += 1
        if c.winner != "tie":
            group["votes"][c.a if c.winner == "a" else c.b] += 1
    pairs = []
    for (item, first, second), group in groups.items():
        votes = group["votes"]
        if votes[first] == votes[second]:
            continue
        chosen, rejected = (first, second) if votes[first] > votes[second] else (second, first)
        pairs.append({"prompt": group["prompt"], "chosen": group["texts"][chosen],
                      "rejected": group["texts"][rejected], "item": item, "chosen_system": chosen,
                      "rejected_system": rejected, "votes": [votes[chosen], votes[rejected]],
                      "judgements": group["raters"]})
    return pairs


# ---------------------------------------------------------------------------- all at once
def summarize(annotations: Annotations, interval: str = "wilson", confidence: float = 0.95, k: float = 32.0,
              initial: float = 1000.0, bt_prior: float = 0.0, seed: int = 0) -> dict[str, Any]:
    """Everything above for one annotation set, as one JSON-ready dict."""
    out: dict[str, Any] = {"ratings": len(annotations.ratings), "comparisons": len(annotations.comparisons)}
    if annotations.ratings:
        criteria = sorted({r.criterion for r in annotations.ratings})
        out["likert"] = likert_summary(annotations.ratings, confidence, seed)
        out["likert_agreement"] = {c: agreement(rating_units(annotations.ratings, c)) for c in criteria}
    comparisons = annotations.comparisons
    if comparisons:
        out["win_rates"] = win_rates(comparisons, interval, confidence, seed)
        out["interval"] = {"method": interval, "confidence": confidence}
        out["head_to_head"] = head_to_head(comparisons)
        out["elo"] = {"k": k, "initial": initial, "ratings": elo_ratings(comparisons, k, initial)}
        try:
            strengths = bradley_terry(comparisons, prior=bt_prior)
            out["bradley_terry"] = {"prior": bt_prior, "strengths": strengths, "ratings": elo_scale(strengths)}
        except LmforgeError as exc:
            out["bradley_terry"] = {"prior": bt_prior, "error": str(exc)}
        out["pairwise_agreement"] = agreement(comparison_units(comparisons))
    return out
