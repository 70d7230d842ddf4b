"""Do exported captioning/VQA checkpoints decode in transformers exactly as in lmforge?

    lmforge vlm export runs/vlm-caption --out runs/vlm-caption-hf
    lmforge vlm export runs/vlm-vqa-2stage-long --out runs/vlm-vqa-hf
    python benchmarks/vlm_hf_export.py --caption runs/vlm-caption --caption-hf runs/vlm-caption-hf \
        --vqa runs/vlm-vqa-2stage-long --vqa-hf runs/vlm-vqa-hf --scenes 50
    lmforge vlm export runs/vlm-vit --out runs/vlm-vit-hf
    python benchmarks/vlm_hf_export.py --caption "" --vit runs/vlm-vit --vit-hf runs/vlm-vit-hf

For the first ``--scenes`` test scenes, lmforge's greedy caption (and its answers to the scene's
test questions) are compared with ``LlavaForConditionalGeneration.generate`` on the exported
directory, fed the way a transformers user would: pixel values from the directory's own image
processor (AutoImageProcessor on the rendered uint8 image) and the prompt ``<image>`` x
image_seq_length, then lmforge's prompt ids. Prints one JSON line: how many outputs agree token
for token, and the largest logit difference on the first decoding step.

With ``--vit``/``--vit-hf`` it also classifies the Fashion-MNIST test split with lmforge's ViT
classifier and with ``ViTForImageClassification`` on its export (pixels from the exported
image processor) and reports both accuracies, how many predictions agree and the largest
logit difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lmforge.vlm import scenes as sc  # noqa: E402
from lmforge.vlm.captioner import generate, load_vlm, prompt_ids, to_tensor  # noqa: E402


def compare(original: str, exported: str, n_scenes: int, questions: int) -> dict:
    from PIL import Image
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    loaded = load_vlm(original)
    hf = LlavaForConditionalGeneration.from_pretrained(exported).eval()
    processor = AutoImageProcessor.from_pretrained(exported)
    ids, task = loaded.ids, loaded.meta["task"]
    size, prefix = loaded.meta["image_size"], loaded.model.prefix_length
    scene_list = [sc.make_scene("test", i) for i in range(n_scenes)]
    rendered = sc.render_batch(scene_list, size)
    items = ([(i, None) for i in range(n_scenes)] if task == "caption" else
             [(i, q.text) for i in range(n_scenes)
              for q in sc.questions(scene_list[i], sc.scene_rng("test", i, 1), questions)])
    max_new = 40 if task == "caption" else 8
    agree, max_diff, seconds = 0, 0.0, {"lmforge": 0.0, "transformers": 0.0}
    examples = []
    for i, question in items:
        prompt = prompt_ids(loaded.tokenizer, ids, None if question is None else question.lower())
        image = to_tensor(rendered[i:i + 1])
        started = time.perf_counter()
        ours = generate(loaded.model, image, [prompt], ids["eos"], max_new_tokens=max_new)[0]
        seconds["lmforge"] += time.perf_counter() - started
        pixels = processor(images=Image.fromarray(rendered[i]), return_tensors="pt")["pixel_values"]
        input_ids = torch.tensor([[hf.config.image_token_id] * prefix + prompt])
        started = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(input_ids=input_ids, pixel_values=pixels, max_new_tokens=max_new, do_sample=False)
            theirs_logits = hf(input_ids=input_ids, pixel_values=pixels).logits[0, -1, :-1]
        seconds["transformers"] += time.perf_counter() - started
        row = out[0, input_ids.shape[1]:].tolist()
        theirs = row[:row.index(ids["eos"])] if ids["eos"] in row else row
        with torch.no_grad():
            ours_logits = loaded.model(image, torch.tensor([prompt]))[0, -1]
        max_diff = max(max_diff, float((ours_logits - theirs_logits).abs().max()))
        agree += ours == theirs
        if len(examples) < 3:
            examples.append({"image": f"test:{i}", "question": question, "lmforge": loaded.decode(ours),
                             "transformers": loaded.decode(theirs)})
    return {"task": task, "outputs": len(items), "identical": agree, "max_first_step_logit_diff": max_diff,
            "seconds": {k: round(v, 2) for k, v in seconds.items()}, "examples": examples}


@torch.no_grad()
def compare_vit(original: str, exported: str, batch: int = 500) -> dict:
    from transformers import AutoImageProcessor, ViTForImageClassification

    from lmforge.vlm import fashion_mnist as fm
    from lmforge.vlm.train import load_checkpoint

    ours_model = load_checkpoint(original).model
    hf = ViTForImageClassification.from_pretrained(exported).eval()
    processor = AutoImageProcessor.from_pretrained(exported)
    raw, labels = fm.load_split("test")
    agree = correct_ours = correct_theirs = 0
    max_diff = 0.0
    for i in range(0, len(raw), batch):
        chunk = raw[i:i + batch]
        ours = ours_model(fm.to_tensor(chunk))
        pixels = processor(images=list(chunk[..., None]), return_tensors="pt", input_data_format="channels_last",
                           do_resize=False)["pixel_values"]
        theirs = hf(pixel_values=pixels).logits
        max_diff = max(max_diff, float((ours - theirs).abs().max()))
        truth = torch.from_numpy(labels[i:i + batch].astype("int64"))
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        correct_ours += int((ours.argmax(-1) == truth).sum())
        correct_theirs += int((theirs.argmax(-1) == truth).sum())
    n = len(raw)
    return {"images": n, "same_prediction": agree, "accuracy_lmforge": correct_ours / n,
            "accuracy_transformers": correct_theirs / n, "max_logit_diff": max_diff}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--caption", default="runs/vlm-caption")
    p.add_argument("--caption-hf", default="runs/vlm-caption-hf")
    p.add_argument("--vqa", default=None)
    p.add_argument("--vqa-hf", default=None)
    p.add_argument("--vit", default=None, help="a ViT classifier checkpoint")
    p.add_argument("--vit-hf", default=None, help="its export")
    p.add_argument("--scenes", type=int, default=50)
    p.add_argument("--questions", type=int, default=2, help="vqa: test questions per scene")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    if args.caption and args.caption_hf:
        results["caption"] = compare(args.caption, args.caption_hf, args.scenes, args.questions)
    if args.vqa and args.vqa_hf:
        results["vqa"] = compare(args.vqa, args.vqa_hf, args.scenes, args.questions)
    if args.vit and args.vit_hf:
        v = results["vit"] = compare_vit(args.vit, args.vit_hf)
        print(f"vit: {v['same_prediction']}/{v['images']} predictions identical; accuracy lmforge "
              f"{v['accuracy_lmforge']:.4f}, transformers {v['accuracy_transformers']:.4f}; logits within "
              f"{v['max_logit_diff']:.2e}")
    for name, r in ((k, r) for k, r in results.items() if k != "vit"):
        print(f"{name}: {r['identical']}/{r['outputs']} greedy outputs identical; first-step logits within "
              f"{r['max_first_step_logit_diff']:.2e}")
        for e in r["examples"]:
            print(f"  {e['image']} {e['question'] or ''} lmforge: {e['lmforge']!r}  transformers: {e['transformers']!r}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
