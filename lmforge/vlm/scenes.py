"""Generated scenes for captioning and visual question answering (V4, V5).

A scene is a few coloured shapes on a plain background, drawn from seeded parameters, so
every fact about the image is known exactly: the captions and the answers to questions are
computed from the parameters, not annotated. That makes the data free, unlimited and
noise-free, and lets an evaluation ask questions whose answers need counting and spatial
relations (CLEVR's idea, Johnson et al. 2017, at toy scale).

Scene rules (what keeps every caption and answer unambiguous):

- 1 to 4 objects; each a circle, square or triangle, in one of five colours and two sizes;
- no two objects share both colour and shape, so "the red circle" names one object;
- each object sits in its own column (four columns of 16 px at 64 px), so left/right
  between any two objects is well defined and "left to right" is one order.

Splits are fixed by seed: scene ``i`` of split ``s`` comes from the random generator seeded
with ``(SPLIT_CODES[s], i)``, so train, val and test are disjoint streams and a scene is
the same on every machine and run.

Captions: five references per image, in different phrasings (left to right with sizes, a
count and a list, right to left, shape counts, relations), like COCO's five human
captions. Questions: nine types (counting, counting by colour or shape, existence,
colour, shape, size, the colour of a left/right neighbour, and yes/no relations), with the
yes/no answers drawn 50/50.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (45, 85, 215), "yellow": (225, 195, 25),
           "purple": (145, 60, 185)}
SIZES = ("small", "large")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
MAX_OBJECTS = 4
BASE = 64  # layout coordinates are in a 64-pixel frame, scaled to the rendered size
RADIUS = {"small": 4.5, "large": 7.0}
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
QUESTION_TYPES = ("count", "count_colour", "count_shape", "exist", "colour", "shape", "size", "relation_colour",
                  "relation_yesno")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    x: float  # centre, in the 64-pixel frame
    y: float

    def phrase(self, size: bool = True) -> str:
        return f"a {self.size + ' ' if size else ''}{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # left to right
    background: int  # grey level of the background

    def counts(self) -> tuple[Counter, Counter]:
        return Counter(o.colour for o in self.objects), Counter(o.shape for o in self.objects)


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    type: str


def scene_rng(split: str, index: int, salt: int = 0) -> np.random.Generator:
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}: use {', '.join(SPLIT_CODES)}")
    return np.random.default_rng([SPLIT_CODES[split], int(index), salt])


def make_scene(split: str, index: int) -> Scene:
    """Scene ``index`` of ``split``: the same parameters on every call."""
    rng = scene_rng(split, index)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    columns = np.sort(rng.choice(4, size=n, replace=False))
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    picked = rng.choice(len(combos), size=n, replace=False)
    objects = []
    for column, k in zip(columns, picked):
        colour, shape = combos[int(k)]
        size = SIZES[int(rng.integers(2))]
        x = 8.0 + 16.0 * float(column) + float(rng.uniform(-1.0, 1.0))
        r = RADIUS[size]
        y = float(rng.uniform(r + 2, BASE - r - 2))
        objects.append(SceneObject(shape, colour, size, round(x, 2), round(y, 2)))
    return Scene(tuple(objects), int(rng.integers(225, 256)))


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as an RGB image [size, size, 3] uint8."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)
    scale = size / BASE
    for o in scene.objects:
        x, y, r = o.x * scale, o.y * scale, RADIUS[o.size] * scale
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif o.shape == "square":
            s = r * 0.9
            draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
        else:
            draw.polygon([(x, y - r), (x - r, y + r * 0.85), (x + r, y + r * 0.85)], fill=fill)
    return np.asarray(image, dtype=np.uint8)


def render_batch(scenes: Sequence[Scene], size: int = 64) -> np.ndarray:
    return np.stack([render(s, size) for s in scenes])


# ---- captions ---------------------------------------------------------------------------

def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def captions(scene: Scene) -> list[str]:
    """Five reference captions, each a different phrasing of the same facts."""
    objs = scene.objects
    n = len(objs)
    noun = _plural("shape", n)
    verb = "is" if n == 1 else "are"
    _, shapes = scene.counts()
    shape_counts = [f"{NUMBERS[shapes[s]]} {_plural(s, shapes[s])}" for s in SHAPES if shapes[s]]
    if n == 1:
        relation = f"{objs[0].phrase()} on its own"
    else:
        relation = " left of ".join(o.phrase(size=False) for o in objs)
    return [
        _join([o.phrase() for o in objs]),
        f"there {verb} {NUMBERS[n]} {noun} : " + _join([o.phrase(size=False) for o in objs]),
        "from right to left : " + _join([o.phrase() for o in reversed(objs)]),
        f"{_join(shape_counts)} : " + _join([f"{o.colour} {o.shape}" for o in objs]),
        relation,
    ]


# ---- questions --------------------------------------------------------------------------

def referring(scene: Scene, obj: SceneObject, allow_colour: bool = True) -> str | None:
    """The shortest unambiguous name of ``obj`` in ``scene`` ("the circle", "the large circle",
    "the red circle"), or None when none exists."""
    others = [o for o in scene.objects if o is not obj]
    candidates = [(obj.shape,), (obj.size, obj.shape)]
    if allow_colour:
        candidates.append((obj.colour, obj.shape))
    for words in candidates:
        if not any(all(w in (o.shape, o.size, o.colour) for w in words) for o in others):
            return "the " + " ".join(words)
    return None


def _neighbour(scene: Scene, obj: SceneObject, side: str) -> SceneObject | None:
    i = scene.objects.index(obj)
    j = i - 1 if side == "left" else i + 1
    return scene.objects[j] if 0 <= j < len(scene.objects) else None


def ask(scene: Scene, kind: str, rng: np.random.Generator) -> Question | None:
    """One question of type ``kind`` about ``scene`` (None when the scene cannot support it)."""
    objs = scene.objects
    colours, shapes = scene.counts()
    if kind == "count":
        return Question("how many shapes are there ?", NUMBERS[len(objs)], kind)
    if kind == "count_colour":
        present = rng.random() < 0.5
        colour = objs[int(rng.integers(len(objs)))].colour if present else list(COLOURS)[int(rng.integers(5))]
        return Question(f"how many {colour} shapes are there ?", NUMBERS[colours[colour]], kind)
    if kind == "count_shape":
        shape = SHAPES[int(rng.integers(3))]
        return Question(f"how many {shape}s are there ?", NUMBERS[shapes[shape]], kind)
    if kind == "exist":
        present = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5:
            colour, shape = sorted(present)[int(rng.integers(len(present)))]
        else:
            absent = sorted((c, s) for c in COLOURS for s in SHAPES if (c, s) not in present)
            # half of the absent ones share a colour or shape with an object: harder negatives
            close = [p for p in absent if any(p[0] == c or p[1] == s for c, s in present)]
            pool = close if close and rng.random() < 0.5 else absent
            colour, shape = pool[int(rng.integers(len(pool)))]
        return Question(f"is there a {colour} {shape} ?", "yes" if (colour, shape) in present else "no", kind)
    order = list(rng.permutation(len(objs)))
    if kind in ("colour", "size"):
        for i in order:
            name = referring(scene, objs[i], allow_colour=kind == "size")
            if name is not None and (kind == "colour" or name != f"the {objs[i].size} {objs[i].shape}"):
                if kind == "colour":
                    return Question(f"what colour is {name} ?", objs[i].colour, kind)
                return Question(f"what size is {name} ?", objs[i].size, kind)
        return None
    if kind == "shape":
        for i in order:
            if colours[objs[i].colour] == 1:
                return Question(f"what shape is the {objs[i].colour} one ?", objs[i].shape, kind)
        return None
    if kind == "relation_colour":
        for i in order:
            side = ("left", "right")[int(rng.integers(2))]
            for s in (side, "right" if side == "left" else "left"):
                other = _neighbour(scene, objs[i], s)
                name = referring(scene, objs[i])
                if other is not None and name is not None:
                    return Question(f"what colour is the shape just {s} of {name} ?", other.colour, kind)
        return None
    if kind == "relation_yesno":
        if len(objs) < 2:
            return None
        i, j = (int(v) for v in rng.choice(len(objs), size=2, replace=False))
        a, b = referring(scene, objs[i]), referring(scene, objs[j])
        if a is None or b is None:
            return None
        side = ("left", "right")[int(rng.integers(2))]
        truth = (i < j) if side == "left" else (i > j)
        return Question(f"is {a} {side} of {b} ?", "yes" if truth else "no", kind)
    raise ValueError(f"unknown question type {kind!r}")


def questions(scene: Scene, rng: np.random.Generator, n: int) -> list[Question]:
    """``n`` questions of distinct types drawn uniformly among those the scene supports."""
    out: list[Question] = []
    for kind in rng.permutation(QUESTION_TYPES):
        q = ask(scene, str(kind), rng)
        if q is not None:
            out.append(q)
            if len(out) == n:
                break
    return out


def split_questions(split: str, index: int, n: int = 3) -> list[Question]:
    """The fixed questions of scene ``index`` of ``split`` (the evaluation set)."""
    return questions(make_scene(split, index), scene_rng(split, index, salt=1), n)


def vocabulary_texts() -> list[str]:
    """Every word the captions, questions and answers can use (for training a tokenizer)."""
    words = ["there is are shapes shape on its own from right to left of and just what how many",
             "colour size is the one yes no", " ".join(NUMBERS), " ".join(SIZES), " ".join(COLOURS),
             " ".join(SHAPES) + " " + " ".join(s + "s" for s in SHAPES), ": , ?"]
    texts = list(words)
    for i in range(200):
        scene = make_scene("train", i)
        texts += captions(scene)
        texts += [q.text + " " + q.answer for q in questions(scene, scene_rng("train", i, 1), len(QUESTION_TYPES))]
    return texts


def mentioned_objects(text: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption names ("a small red circle" -> ("red", "circle"))."""
    words = text.lower().replace(",", " ").split()
    return {(a, b.rstrip("s")) for a, b in zip(words, words[1:]) if a in COLOURS and b.rstrip("s") in SHAPES}


def object_mention_scores(captions_: Sequence[str], scene_list: Sequence[Scene]) -> dict[str, float]:
    """How faithful captions are to the scene: precision of the named (colour, shape) objects
    (1 - precision is CHAIR's hallucination rate, Rohrbach et al. 2018), recall of the objects
    present, and the share of captions naming exactly the scene's objects."""
    named = present = hits = exact = 0
    for text, scene in zip(captions_, scene_list):
        said, truth = mentioned_objects(text), {(o.colour, o.shape) for o in scene.objects}
        named, present, hits = named + len(said), present + len(truth), hits + len(said & truth)
        exact += said == truth
    precision = hits / max(1, named)
    return {"object_precision": precision, "object_recall": hits / max(1, present),
            "hallucination_rate": 1 - precision, "exact_object_set": exact / max(1, len(captions_))}
