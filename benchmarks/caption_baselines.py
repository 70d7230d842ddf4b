"""Trivial captioning baselines on the generated scenes, scored like the trained captioner.

Two captioners that do not look at the image the way a model does:
- constant: every test image gets the training split's most frequent caption (its first
  reference phrasing);
- nearest neighbour: every test image gets the first reference caption of the training image
  closest to it in pixel space (L2 over the 64x64 RGB pixels), among `--train` scenes.

Both are scored with lmforge/vlm/caption_metrics.py's `caption_scores` (CIDEr-D, BLEU-4,
METEOR-light) and the object check of lmforge/vlm/scenes.py, on the same test scenes as
`lmforge vlm eval` (test:0 ... test:N-1), and printed as one JSON line.

    python benchmarks/caption_baselines.py --test 1000 --train 5000
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lmforge.vlm import scenes as sc  # noqa: E402
from lmforge.vlm.caption_metrics import caption_scores  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--test", type=int, default=1000, help="test scenes (test:0 ... test:N-1)")
    ap.add_argument("--train", type=int, default=5000, help="training scenes searched by the nearest-neighbour baseline")
    args = ap.parse_args()
    started = time.perf_counter()
    test = [sc.make_scene("test", i) for i in range(args.test)]
    train = [sc.make_scene("train", i) for i in range(args.train)]
    references = [sc.captions(s) for s in test]
    train_first = [sc.captions(s)[0] for s in train]
    constant = collections.Counter(train_first).most_common(1)[0][0]
    x_test = sc.render_batch(test).reshape(len(test), -1).astype(np.float32)
    x_train = sc.render_batch(train).reshape(len(train), -1).astype(np.float32)
    nearest = []
    for start in range(0, len(x_test), 100):
        block = x_test[start:start + 100]
        d = (block ** 2).sum(1)[:, None] - 2 * block @ x_train.T + (x_train ** 2).sum(1)[None, :]
        nearest += [train_first[int(j)] for j in d.argmin(1)]
    out = {"benchmark": "caption-baselines", "test_scenes": args.test, "train_scenes": args.train,
           "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")}
    for name, predictions in (("constant", [constant] * len(test)), ("nearest_neighbour", nearest)):
        scores = caption_scores(predictions, references)
        objects = sc.object_mention_scores(predictions, test)
        out[name] = {"cider_d": round(scores["cider_d"], 4), "bleu4": round(scores["bleu4"], 2),
                     "meteor_light": round(scores["meteor_light"], 4), "objects": objects,
                     "example": predictions[0]}
    out["constant_caption"] = constant
    out["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
