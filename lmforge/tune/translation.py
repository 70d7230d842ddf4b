"""Training an encoder-decoder translator from scratch (S8) on the verse-aligned Bible, with the one loop.

``train_translator(config)`` runs lmforge's training loop (lmforge/train/loop.py) with a
`TranslationTask`: the task builds the data (source/target verse pairs of two SWORD modules,
split by book so that test books are never seen, lmforge/data/bible.py), trains a shared
Unigram tokenizer on the training books of both languages (lmforge/tokenizer/train), makes a
Marian-style `Seq2SeqLM`, hands out padded batches of (source, target) pairs as a pure function
of the data position, and computes the loss itself: cross-entropy of each target token given
the source and the target prefix (teacher forcing), summed and averaged over the step's target
tokens by the loop. Validation reports the loss on held-out verses and corpus BLEU and chrF
(sacrebleu) of greedy translations; the end of the run scores the test books greedily and with
beam search, and plots BLEU against the step.

The loop's own checkpoint writer knows decoder-only configs only, so the task writes the
checkpoints' model files itself (`write_model_files`: the Hugging Face Marian/T5 layout of
lmforge/model/seq2seq_io.py); everything else in a checkpoint (optimizer moments, RNG states,
data position) is the loop's, so an interrupted run continues with ``--resume`` exactly where it
stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch


from lmforge.tune.translation_recipe import (SPECIAL_TOKENS, TranslationConfig, TranslationDataSection,
                                             load_translation_recipe, option_names)

__all__ = ["TranslationConfig", "TranslationTask", "build_corpus", "corpus_scores", "load_translation_recipe",
           "option_names", "train_translator", "translate_texts"]


# -- data --------------------------------------------------------------------------------------

def build_corpus(d: TranslationDataSection, log=print) -> Path:
    """`d.cache`/{train,validation,test}.jsonl ({"source", "target", "reference"}) and the shared
    tokenizer, written once (atomically) and reused while the split is the same."""
    from lmforge.data.bible import BOOKS, parallel_verses, split_books
    from lmforge.io.atomic import atomic_directory
    from lmforge.tokenizer.train import train_tokenizer

    root = Path(d.cache)
    spec = {"source": d.source, "target": d.target, "test": list(d.test_books), "validation": list(d.validation_books),
            "vocab": d.tokenizer_vocab_size}
    if (root / "corpus.json").is_file() and json.loads((root / "corpus.json").read_text()) == spec:
        return root
    split = split_books(BOOKS, tuple(d.test_books), tuple(d.validation_books))
    log(f"reading {d.source} / {d.target} verse pairs")
    pairs = parallel_verses(d.source, d.target)
    book_split = {b: name for name, books in split.items() for b in books}
    records: dict[str, list[dict[str, str]]] = {"train": [], "validation": [], "test": []}
    for s, t in pairs:
        records[book_split[s.book]].append({"source": s.text, "target": t.text, "reference": s.reference})
    log(f"training a {d.tokenizer_vocab_size}-piece Unigram tokenizer on {len(records['train'])} training pairs")
    texts = [r["source"] for r in records["train"]] + [r["target"] for r in records["train"]]
    tokenizer = train_tokenizer(texts, algo="unigram", vocab_size=d.tokenizer_vocab_size, special_tokens=SPECIAL_TOKENS)
    if root.exists():
        shutil.rmtree(root)
    with atomic_directory(root) as staging:
        staging = Path(staging)
        for name, rows in records.items():
            (staging / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                  encoding="utf-8")
        tokenizer.save(staging)
        (staging / "corpus.json").write_text(json.dumps(spec) + "\n", encoding="utf-8")
    return root


def read_pairs(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def encode_side(tokenizer, texts: list[str], max_len: int, eos: int) -> list[list[int]]:
    """Token ids of each text, truncated to max_len - 1, then EOS (what Marian does on both sides)."""
    return [tokenizer.encode(t, add_special_tokens=False)[:max_len - 1] + [eos] for t in texts]


def pad_batch(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def translate_texts(model, tokenizer, texts: list[str], num_beams: int = 1, max_new_tokens: int = 96,
                    length_penalty: float = 1.0, batch_size: int = 32, max_len: int | None = None,
                    progress=None) -> list[str]:
    """Translations of `texts` (greedy, or beam search with num_beams > 1), batched by length."""
    from lmforge.infer.beam import seq2seq_generate

    config = model.config
    limit = max_len or config.max_position_embeddings
    encoded = encode_side(tokenizer, texts, limit, config.eos_token_id)
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(texts)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = pad_batch([encoded[i] for i in chunk], config.pad_token_id)
        limit_new = min(max_new_tokens, config.max_position_embeddings - 1) if config.position != "relative" \
            else max_new_tokens
        done = seq2seq_generate(model, ids.to(device), mask.to(device), max_new_tokens=limit_new,
                                num_beams=num_beams, length_penalty=length_penalty)
        for i, tokens in zip(chunk, done):
            out[i] = tokenizer.decode(tokens, skip_special_tokens=True)
        if progress is not None:
            progress(len(chunk))
    return out


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    import sacrebleu

    return {"bleu": float(sacrebleu.corpus_bleu(hypotheses, [references]).score),
            "chrf": float(sacrebleu.corpus_chrf(hypotheses, [references]).score)}


# -- the task ------------------------------------------------------------------------------------

class TranslationTask:
    """The loop's task (lmforge/train/loop.py `TrainingTask`) for source -> target translation."""

    title = "Translation run (encoder-decoder, from scratch)"
    token_mean = True

    def __init__(self, config: TranslationConfig) -> None:
        self.config = config
        self.eval_log: list[dict[str, Any]] = []

    def setup(self, trainer) -> None:
        from lmforge.tokenizer import Tokenizer

        c = self.config
        root = build_corpus(c.data, trainer.log) if trainer.runtime.is_main else Path(c.data.cache)
        self.tokenizer = Tokenizer.from_pretrained_dir(root)
        self.pad, self.eos = self.tokenizer.token_to_id("<pad>"), self.tokenizer.token_to_id("</s>")
        train = read_pairs(root / "train.jsonl")[:c.data.max_pairs]
        self.validation = read_pairs(root / "validation.jsonl")
        self.test = read_pairs(root / "test.jsonl")
        trainer.log(f"{len(train)} training pairs, {len(self.validation)} validation, {len(self.test)} test "
                    f"(held-out books: {', '.join(c.data.test_books)})")
        self.src = encode_side(self.tokenizer, [r["source"] for r in train], c.data.max_len, self.eos)
        self.tgt = encode_side(self.tokenizer, [r["target"] for r in train], c.data.max_len, self.eos)
        self.seq_len = c.data.max_len

    def build_model(self, trainer):
        from lmforge.model.seq2seq import Seq2SeqConfig, Seq2SeqLM

        m = self.config.model
        if m.family == "t5":  # the T5 layout: pre-norm RMSNorm, relative buckets, no biases or attention scale
            family = dict(norm="rmsnorm", norm_eps=1e-6, position="relative", bias=False, attention_scale=False,
                          scale_decoder_outputs=True, final_logits_bias=False)
        else:
            family = dict(norm="layernorm", position="sinusoidal", bias=True, final_logits_bias=True)
        config = Seq2SeqConfig(**dataclasses.asdict(m), **family, vocab_size=self.tokenizer.vocab_size,
                               tie_word_embeddings=True, pad_token_id=self.pad, eos_token_id=self.eos,
                               decoder_start_token_id=self.pad)
        return Seq2SeqLM(config)

    def write_model_files(self, trainer, model_state, directory) -> None:
        """A checkpoint's model files: the Hugging Face Marian or T5 layout, as the final model is written."""
        from lmforge.model.seq2seq_io import write_seq2seq_files

        write_seq2seq_files(trainer.model, Path(directory), trainer.tokenizer, state=model_state)

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.config.train.seed, epoch]).permutation(len(self.src))

    def _pick(self, position: int, count: int) -> list[int]:
        """Training pairs position..position+count-1 of the stream: each epoch a seeded permutation,
        cut into pools of `bucket_batches` batches; each pool is sorted by length so that a batch
        holds verses of similar length (about half the padding of random batches)."""
        n, pool = len(self.src), count * self.config.data.bucket_batches
        picked = []
        for p in range(position, position + count):
            epoch, offset = divmod(p, n)
            order = self._order(epoch)
            first = offset // pool * pool
            members = order[first:first + pool]
            ranked = sorted(members.tolist(), key=lambda i: (len(self.src[i]) + len(self.tgt[i]), i))
            picked.append(int(ranked[offset - first]))
        return picked

    def batch(self, position: int, count: int):
        from lmforge.train.loop import Batch

        picked = self._pick(position, count)
        src, src_mask = pad_batch([self.src[i] for i in picked], self.pad)
        labels, _ = pad_batch([self.tgt[i] for i in picked], -100)
        count_targets = int((labels != -100).sum())
        return Batch(src, labels=labels, tokens=int(src_mask.sum()) + count_targets,
                     extra={"attention_mask": src_mask}, count=count_targets)

    def loss(self, model, batch):
        labels = batch.labels
        logits = model(batch.input_ids, model.shift_right(labels), batch.extra["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        return loss, {}

    def baseline(self, trainer) -> float | None:
        """Cross-entropy of a unigram model of the training targets: the loss with no context."""
        counts = np.bincount(np.concatenate([np.array(t) for t in self.tgt]),
                             minlength=self.tokenizer.vocab_size).astype(np.float64) + 1.0
        logp = np.log(counts / counts.sum())
        return float(-sum(logp[t].sum() for t in self.tgt) / sum(len(t) for t in self.tgt))

    @torch.no_grad()
    def evaluate(self, trainer) -> dict[str, Any] | None:
        c = self.config
        model = trainer.model
        device = trainer.runtime.device
        rows = self.validation[:c.eval.loss_examples]
        nats, tokens = 0.0, 0
        for start in range(0, len(rows), c.eval.eval_batch):
            chunk = rows[start:start + c.eval.eval_batch]
            src, mask = pad_batch(encode_side(self.tokenizer, [r["source"] for r in chunk], c.data.max_len, self.eos),
                                  self.pad)
            labels, _ = pad_batch(encode_side(self.tokenizer, [r["target"] for r in chunk], c.data.max_len, self.eos),
                                  -100)
            src, mask, labels = src.to(device), mask.to(device), labels.to(device)
            logits = model(src, model.shift_right(labels), mask)
            nats += float(torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                            labels.reshape(-1), ignore_index=-100, reduction="sum"))
            tokens += int((labels != -100).sum())
        result: dict[str, Any] = {"val_loss": nats / max(tokens, 1)}
        result["val_ppl"] = math.exp(min(result["val_loss"], 50.0))
        rows = self.validation[:c.eval.validation_examples]
        if rows:
            hyps = translate_texts(model, self.tokenizer, [r["source"] for r in rows],
                                   max_new_tokens=c.eval.max_new_tokens, batch_size=c.eval.eval_batch,
                                   max_len=c.data.max_len)
            result.update(corpus_scores(hyps, [r["target"] for r in rows]))
            trainer.log(f"step {trainer.step}: {rows[0]['source']} => {hyps[0]}")
        self.eval_log.append({"step": trainer.step, **result})
        return result

    def report_extra(self, trainer) -> dict[str, Any]:
        """Test-book scores (greedy and beam search), example translations and the BLEU plot."""
        c = self.config
        out: dict[str, Any] = {"title": self.title, "held_out_books": list(c.data.test_books)}
        rows = self.test[::max(1, len(self.test) // c.eval.test_examples)][:c.eval.test_examples] \
            if c.eval.test_examples else []
        if rows:
            model = trainer.model
            model.eval()
            sources, refs = [r["source"] for r in rows], [r["target"] for r in rows]
            greedy = translate_texts(model, self.tokenizer, sources, max_new_tokens=c.eval.max_new_tokens,
                                     batch_size=c.eval.eval_batch, max_len=c.data.max_len)
            beam = translate_texts(model, self.tokenizer, sources, num_beams=c.eval.num_beams,
                                   max_new_tokens=c.eval.max_new_tokens, length_penalty=c.eval.length_penalty,
                                   batch_size=max(1, c.eval.eval_batch // c.eval.num_beams), max_len=c.data.max_len)
            out["test"] = {"verses": len(rows), "greedy": corpus_scores(greedy, refs),
                           f"beam{c.eval.num_beams}": corpus_scores(beam, refs)}
            out["test_examples"] = [{"reference": r["reference"], "source": r["source"], "target": r["target"],
                                     "greedy": g, "beam": b} for r, g, b in list(zip(rows, greedy, beam))[:8]]
        plot = plot_bleu(self.eval_log, Path(c.train.out) / "plots" / "bleu.png")
        out["bleu_plot"] = str(plot) if plot else None
        return out

    def format_report(self, r: dict[str, Any]) -> str:
        from lmforge.train.loop import format_report

        text = format_report({**r, "samples": []})
        lines = [text.rstrip("\n")]
        if r.get("test"):
            t = r["test"]
            lines += ["", f"## Held-out test books ({', '.join(r['held_out_books'])}; {t['verses']} verses)", "",
                      "| decoding | BLEU | chrF |", "|---|---:|---:|"]
            lines += [f"| {k} | {v['bleu']:.2f} | {v['chrf']:.2f} |" for k, v in t.items() if isinstance(v, dict)]
            lines += ["", "## Examples", ""]
            for e in r.get("test_examples", []):
                lines += [f"- **{e['reference']}** {e['source']}", f"  - reference: {e['target']}",
                          f"  - greedy: {e['greedy']}", f"  - beam: {e['beam']}"]
        if r.get("bleu_plot"):
            lines += ["", "![BLEU against steps](plots/bleu.png)"]
        return "\n".join(lines) + "\n"


def plot_bleu(evals: list[dict[str, Any]], out: Path) -> Path | None:
    from lmforge.io.plots import pyplot

    plt = pyplot()
    scored = [e for e in evals if "bleu" in e]
    if plt is None or not scored:
        return None
    from lmforge.io.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [e["step"] for e in scored]
    ax.plot(steps, [e["bleu"] for e in scored], "o-", label="BLEU")
    ax.plot(steps, [e["chrf"] for e in scored], "s--", label="chrF")
    ax.set(xlabel="step", ylabel="score (validation books, greedy)", title="translation quality while training")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out


# -- the run ---------------------------------------------------------------------------------------

def train_translator(config: TranslationConfig, progress: bool = True, log=None, resume: bool = False) -> dict[str, Any]:
    """Run the recipe (``resume``: from the newest complete checkpoint in OUT/checkpoints); the final
    model (HF Marian or T5 layout + tokenizer) is OUT/model."""
    from lmforge.io.atomic import write_json_atomic
    from lmforge.model.seq2seq_io import save_seq2seq
    from lmforge.train.distributed import shutdown
    from lmforge.train.loop import Trainer

    config.validate()
    kwargs = {"log": log} if log is not None else {}
    trainer = Trainer(config, resume=resume, progress=progress, task=TranslationTask(config), **kwargs)
    try:
        report = trainer.run()
        if trainer.runtime.is_main:
            report["output"] = str(save_seq2seq(trainer.model, Path(config.train.out) / "model", trainer.tokenizer,
                                                overwrite=True))
            write_json_atomic(Path(config.train.out) / "report.json", report)
        return report
    finally:
        shutdown(trainer.runtime)
