"""Pre-Transformer baselines measured against a Transformer on the same data and tokens (M10).

The experiment behind ``lmforge baseline``:

1. *Corpus* (`prepare_corpus`): the offline English Wikipedia excerpt (gensim's test dump,
   read by lmforge.data.corpora), cleaned and deduplicated by ``data prepare``'s pipeline
   and split by article with the pipeline's content hash (10% validation, 10% test by
   default: whole articles, so no test article is seen in training). One byte-level BPE
   tokenizer (4,096 ids) is trained on the training split only, and every split is packed
   into rows of ``seq_len`` tokens with an end-of-text id after each article.
2. *Models*, all on those ids: the Kneser-Ney n-gram model (lmforge/model/ngram.py) counted
   on the training rows; an LSTM and a GRU (lmforge/model/rnn.py) trained with truncated
   BPTT (lmforge/train/bptt.py); a small Llama-style Transformer trained by the
   pretraining loop (lmforge/train/loop.py), of about the same parameter count.
3. *Evaluation*, identical for all: every test row is scored on its own, each token after
   the first predicted from the tokens before it in that row (at most ``seq_len - 1``; the
   recurrent models start each row from a zero state). Perplexity is exp(mean nats) over
   exactly those targets; bits per byte divides the same nats by the UTF-8 bytes the targets
   stand for. Decode speed is batch-1 generation, each model with its own decoding path
   (the Transformer through the scheduler's engine, with its KV cache).

Every model writes ``ROOT/NAME/result.json``; `compare` turns them into a table
(``comparison.md``/``.json``) and a plot of validation perplexity against training time.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from lmforge.errors import LmforgeError
from lmforge.options import option

if TYPE_CHECKING:
    import numpy as np

KINDS = ("ngram", "lstm", "gru", "transformer")


@dataclass
class BaselineConfig:
    """Every option of ``lmforge baseline``: each field is also its flag."""

    root: str = option("runs/baselines", help="directory for the corpus, every model and the comparison")
    source: str = option("wiki", help="corpus (a source lmforge data prepare reads; default the Wikipedia excerpt)")
    vocab_size: int = option(4096, help="BPE vocabulary trained on the training split")
    seq_len: int = option(256, help="tokens per row: the context limit of every model's evaluation")
    val_fraction: float = option(0.1, help="share of articles for validation")
    test_fraction: float = option(0.1, help="share of articles for test")
    order: int = option(4, help="n-gram order")
    lstm_hidden: int = option(176, help="LSTM width (embedding = hidden, tied head)")
    gru_hidden: int = option(192, help="GRU width (embedding = hidden, tied head)")
    rnn_layers: int = option(2, help="stacked recurrent layers")
    dropout: float = option(0.1, help="recurrent models' dropout")
    n_layer: int = option(4, help="Transformer layers")
    n_embd: int = option(128, help="Transformer width")
    n_head: int = option(4, help="Transformer attention heads")
    n_kv_head: int = option(2, help="Transformer key/value heads")
    intermediate_size: int = option(352, help="Transformer SwiGLU width")
    steps: int = option(300, help="optimizer steps of a neural model")
    batch_size: int = option(32, help="recurrent models: parallel streams per step")
    bptt: int = option(64, help="recurrent models: tokens back-propagated through per step")
    transformer_rows: int = option(8, help="Transformer: rows of seq_len tokens per step")
    lr: float = option(3e-3, help="Transformer: peak learning rate (cosine schedule, 20 warmup steps)")
    rnn_lr: float = option(1e-2, help="recurrent models: peak learning rate (cosine schedule, 20 warmup steps)")
    eval_interval: int = option(25, help="steps between validation evaluations")
    eval_rows: int = option(32, help="validation rows scored during training")
    threads: int = option(1, help="CPU threads")
    seed: int = option(0, help="seed")
    gen_tokens: int = option(64, help="tokens generated to measure decode speed")
    progress: bool = option(True, flag="--quiet", help="no progress on stderr")

    def validate(self) -> None:
        if self.seq_len < 2:
            raise LmforgeError("seq_len must be at least 2")
        if self.order < 1:
            raise LmforgeError("the n-gram order must be at least 1")
        for name in ("steps", "batch_size", "bptt", "transformer_rows", "eval_interval", "eval_rows", "threads",
                     "gen_tokens", "vocab_size"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"--{name.replace('_', '-')} must be positive")

    @property
    def data_dir(self) -> Path:
        return Path(self.root) / "data"


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


# -- corpus ------------------------------------------------------------------------------------

def prepare_corpus(config: BaselineConfig, log: Callable[[str], None] = _stderr) -> Path:
    """``ROOT/data``: cleaned, split, tokenized and packed rows (built once; see the module docstring)."""
    from lmforge.data.pack import pack_text_splits
    from lmforge.data.pipeline import PrepareConfig, run_prepare
    from lmforge.io.atomic import atomic_directory
    from lmforge.tokenizer.train import read_training_texts, train_tokenizer

    config.validate()
    path = config.data_dir
    if (path / "index.json").is_file():
        return path
    with atomic_directory(path) as staging:
        log(f"building {path}: cleaning and splitting {config.source} by article")
        run_prepare(PrepareConfig(sources=[config.source], out=str(staging / "prepared"), pack=False,
                                  val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                                  progress=config.progress))
        text = staging / "prepared" / "text"
        log(f"training a {config.vocab_size}-token byte-level BPE tokenizer on the training split")
        tokenizer = train_tokenizer(read_training_texts([text / "train.jsonl"]), "bpe", config.vocab_size)
        tokenizer.save(staging)
        index = pack_text_splits(text, tokenizer, staging, config.seq_len, tokenizer.eos_id, "tokenizer.json")
        missing = [s for s in ("train", "validation", "test") if s not in index["splits"]]
        if missing:
            raise LmforgeError(f"the corpus has no {', '.join(missing)} rows: use more text or larger fractions")
    return path


def load_rows(config: BaselineConfig, split: str) -> np.ndarray:
    """All rows of one split, int64 [rows, seq_len]."""
    import numpy as np

    from lmforge.data.pack import PackedDataset

    data = PackedDataset(config.data_dir, split)
    return np.stack([data[i] for i in range(len(data))]).astype(np.int64)


def load_tokenizer(config: BaselineConfig):
    from lmforge.train.data import dataset_tokenizer

    index = json.loads((config.data_dir / "index.json").read_text(encoding="utf-8"))
    return dataset_tokenizer(config.data_dir, index, None)


def _require_corpus(config: BaselineConfig) -> None:
    if not (config.data_dir / "index.json").is_file():
        raise LmforgeError(f"no corpus in {config.data_dir}: run `lmforge baseline prepare --root {config.root}` first")


# -- scoring -------------------------------------------------------------------------------------

def ngram_rows_nll(model, rows: np.ndarray) -> tuple[float, int]:
    nats, count = 0.0, 0
    for row in rows:
        lp = model.token_logprobs(row)
        nats -= float(lp.sum())
        count += len(lp)
    return nats, count


def transformer_rows_nll(model, rows: np.ndarray, batch_size: int = 8) -> tuple[float, int]:
    import torch

    from lmforge.train.loss import causal_lm_loss

    nats, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = torch.from_numpy(rows[i:i + batch_size])
            nats += float(causal_lm_loss(model, chunk, reduction="sum"))
            count += chunk[:, 1:].numel()
    return nats, count


def recurrent_rows_nll(model, rows: np.ndarray) -> tuple[float, int]:
    import torch

    from lmforge.train.bptt import rows_nll

    return rows_nll(model, torch.from_numpy(rows))


def test_figures(nats: float, count: int, rows: np.ndarray, byte_lengths: np.ndarray) -> dict[str, float]:
    nbytes = int(byte_lengths[rows[:, 1:]].sum())
    return {"nats_per_token": nats / count, "perplexity": math.exp(nats / count), "tokens": count,
            "bits_per_byte": nats / math.log(2) / nbytes}


def _prompt(test: np.ndarray) -> list[int]:
    return [int(t) for t in test[0, :16]]


def _time_decode(generate: Callable[[], list[int]]) -> tuple[float, list[int]]:
    """Generated tokens per CPU second of this (one-thread) process: unlike wall time, not
    stretched by whatever else shares the cores."""
    generate()  # warm-up (allocations, lazy imports)
    started = time.process_time()
    ids = generate()
    return len(ids) / max(time.process_time() - started, 1e-9), ids


def _decoder(kind: str, model, tokenizer, config: BaselineConfig, test: "np.ndarray") -> Callable[[], list[int]]:
    """Greedy batch-1 generation of ``gen_tokens`` after the first test row's first 16 tokens,
    each model on its own decoding path (the Transformer through the scheduler's engine)."""
    prompt = _prompt(test)
    if kind == "ngram":
        return lambda: model.generate(prompt, config.gen_tokens, temperature=0)
    if kind in ("lstm", "gru"):
        model.eval()
        return lambda: model.generate(prompt, config.gen_tokens, temperature=0)
    from lmforge.infer import SamplingParams
    from lmforge.infer.engine import Generator

    params = SamplingParams(max_tokens=config.gen_tokens, temperature=0.0, ignore_eos=True)
    generator = Generator(model, tokenizer)
    return lambda: list(generator.generate([prompt], params)[0].token_ids)


# -- training ----------------------------------------------------------------------------------

def model_name(kind: str, config: BaselineConfig) -> str:
    return f"ngram-{config.order}" if kind == "ngram" else kind


def train(kind: str, config: BaselineConfig, log: Callable[[str], None] = _stderr) -> dict[str, Any]:
    """Train (or count) one model on the corpus, evaluate it on the test rows, write its result.json."""
    import torch

    if kind not in KINDS:
        raise LmforgeError(f"unknown baseline {kind!r}; choose one of {', '.join(KINDS)}")
    config.validate()
    _require_corpus(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train_and_score(kind, config, log)
    finally:
        torch.set_num_threads(threads)


def _train_and_score(kind: str, config: BaselineConfig, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from lmforge.train.data import token_byte_lengths

    name = model_name(kind, config)
    out = Path(config.root) / name
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(config)
    train_rows, val_rows, test = load_rows(config, "train"), load_rows(config, "validation"), load_rows(config, "test")
    val_rows = val_rows[:config.eval_rows]
    byte_lengths = token_byte_lengths(tokenizer)
    result: dict[str, Any] = {"model": name, "kind": kind, "vocab_size": tokenizer.vocab_size,
                              "train_tokens": int(train_rows.size), "config": asdict(config)}
    # One thread: CPU time is the budget, whatever else runs on the machine (see below).
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    if kind == "ngram":
        from lmforge.model.ngram import NGramLM

        started = time.perf_counter()
        model = NGramLM(config.order, tokenizer.vocab_size).fit([train_rows.reshape(-1)])
        seconds = time.perf_counter() - started
        cpu_seconds, wall_seconds = time.process_time() - cpu_started, time.perf_counter() - wall_started
        model.save(out / "ngram.safetensors")
        nats, count = ngram_rows_nll(model, test)
        vnats, vcount = ngram_rows_nll(model, val_rows)
        described = model.describe()
        result.update({"parameters": int(sum(described["ngrams"])), "ngrams": described["ngrams"],
                       "discounts": described["discounts"], "train_seconds": seconds,
                       "validation": [{"step": 0, "seconds": seconds, "val_loss": vnats / vcount,
                                       "val_ppl": math.exp(vnats / vcount)}]})
    elif kind in ("lstm", "gru"):
        from lmforge.model.rnn import RecurrentLM, RNNConfig
        from lmforge.train.bptt import BPTTConfig, train_bptt

        hidden = config.lstm_hidden if kind == "lstm" else config.gru_hidden
        torch.manual_seed(config.seed)
        model = RecurrentLM(RNNConfig(cell=kind, vocab_size=tokenizer.vocab_size, embed_dim=hidden,
                                      hidden_size=hidden, num_layers=config.rnn_layers, dropout=config.dropout))
        report = train_bptt(model, train_rows.reshape(-1), torch.from_numpy(val_rows),
                            BPTTConfig(out=str(out), batch_size=config.batch_size, bptt=config.bptt,
                                       max_steps=config.steps, lr=config.rnn_lr, eval_interval=config.eval_interval,
                                       seed=config.seed, threads=config.threads, progress=config.progress), log)
        cpu_seconds, wall_seconds = time.process_time() - cpu_started, time.perf_counter() - wall_started
        nats, count = recurrent_rows_nll(model, test)
        result.update({"parameters": model.num_parameters(), "train_seconds": report["train_seconds"],
                       "steps": report["steps"], "tokens_seen": report["tokens"], "validation": report["validation"]})
    else:
        model, report = _train_transformer(config, out, log)
        cpu_seconds, wall_seconds = time.process_time() - cpu_started, time.perf_counter() - wall_started
        nats, count = transformer_rows_nll(model, test)
        result.update({"parameters": model.num_parameters(), "train_seconds": report["train_seconds"],
                       "steps": report["steps"], "tokens_seen": report["tokens"],
                       "validation": report["validation_curve"]})
    rate, ids = _time_decode(_decoder(kind, model, tokenizer, config, test))
    # Wall-clock step times stretch when other work shares the cores. The share of wall time this
    # process actually ran (CPU / wall over the whole training call, evaluations included) turns the
    # training seconds and the curve's x axis into CPU seconds, comparable between runs.
    result["cpu_per_wall"] = min(1.0, cpu_seconds / max(wall_seconds, 1e-9))
    result["cpu_seconds"] = result["train_seconds"] * result["cpu_per_wall"]
    for point in result["validation"]:
        point["cpu_seconds"] = point["seconds"] * result["cpu_per_wall"]
    result["test"] = test_figures(nats, count, test, byte_lengths)
    result["decode_tokens_per_s"] = rate
    result["sample"] = {"prompt": tokenizer.decode(_prompt(test)), "greedy": tokenizer.decode(ids)}
    from lmforge.io.atomic import write_json_atomic

    write_json_atomic(out / "result.json", result)
    log(f"{name}: test perplexity {result['test']['perplexity']:.2f} "
        f"({result['test']['bits_per_byte']:.3f} bits/byte), {result['parameters']:,} parameters, "
        f"{result['train_seconds']:.0f} s training, {rate:.0f} tokens/s decode")
    return result


def _train_transformer(config: BaselineConfig, out: Path, log: Callable[[str], None]):
    """The pretraining loop on the corpus rows; returns the trained model and the loop's report with a
    validation curve against training seconds."""
    from lmforge.train.loop import pretrain
    from lmforge.train.recipe import (DataSection, ModelSection, OptimSection, PretrainConfig, ScheduleSection,
                                      TrainSection)
    from lmforge.train.telemetry import read_log

    run = out / "run"
    if run.exists():
        import shutil

        shutil.rmtree(run)  # a fresh run each time, like the other baselines
    recipe = PretrainConfig(
        model=ModelSection(n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head,
                           n_kv_head=config.n_kv_head, intermediate_size=config.intermediate_size),
        data=DataSection(path=str(config.data_dir), seq_len=config.seq_len),
        optim=OptimSection(lr=config.lr),
        schedule=ScheduleSection(warmup_steps=min(20, config.steps // 10)),
        train=TrainSection(out=str(run), max_steps=config.steps, batch_size=config.transformer_rows,
                           precision="fp32", device="cpu", threads=config.threads, distributed="none",
                           eval_interval=config.eval_interval,
                           eval_batches=max(1, config.eval_rows // config.transformer_rows),
                           save_interval=config.steps, keep_last=1, sample_prompts=[], seed=config.seed),
    )
    report = pretrain(recipe, progress=config.progress)
    seconds, curve = 0.0, []
    evals = {r["step"]: r for r in read_log(run / "logs" / "train.jsonl") if r["kind"] == "eval"}
    for record in read_log(run / "logs" / "train.jsonl"):
        if record["kind"] == "train":
            seconds += record["step_seconds"]
            if record["step"] in evals:
                e = evals[record["step"]]
                curve.append({"step": e["step"], "seconds": seconds, "val_loss": e["val_loss"], "val_ppl": e["val_ppl"]})
    report["validation_curve"] = curve
    from lmforge.model.loading import load_model
    from lmforge.model.registry import resolve

    model = load_model(resolve(report["checkpoint"]))
    return model, report


# -- evaluation of saved models and the comparison -----------------------------------------------

def export_arpa(name: str, config: BaselineConfig, out: str | None = None) -> Path:
    """Write the trained n-gram model ``name`` as an ARPA file (lmforge/model/arpa.py), its words
    the baseline tokenizer's token strings; default ROOT/NAME/model.arpa."""
    from lmforge.model.arpa import write_arpa
    from lmforge.model.ngram import NGramLM

    folder = Path(config.root) / name
    if not (folder / "ngram.safetensors").is_file():
        raise LmforgeError(f"no trained n-gram model {name!r} in {config.root} "
                           "(train one with `lmforge baseline train ngram`)")
    model = NGramLM.load(folder / "ngram.safetensors")
    tokenizer = load_tokenizer(config)
    tokens = [tokenizer.id_to_token(i) or "" for i in range(model.vocab_size)]
    return write_arpa(model, out or folder / "model.arpa", tokens)


def evaluate(name: str, config: BaselineConfig) -> dict[str, float]:
    """Test figures and decode speed of a trained model ``name`` (ngram-N, lstm, gru, transformer)
    from its saved files; its result.json is updated with them."""
    import torch

    from lmforge.io.atomic import write_json_atomic
    from lmforge.train.data import token_byte_lengths

    _require_corpus(config)
    out = Path(config.root) / name
    result_path = out / "result.json"
    if not result_path.is_file():
        raise LmforgeError(f"no trained model {name!r} in {config.root} (train it with `lmforge baseline train`)")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    test = load_rows(config, "test")
    tokenizer = load_tokenizer(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        if result["kind"] == "ngram":
            from lmforge.model.ngram import NGramLM

            model = NGramLM.load(out / "ngram.safetensors")
            nats, count = ngram_rows_nll(model, test)
        elif result["kind"] in ("lstm", "gru"):
            from lmforge.model.rnn import RecurrentLM

            model = RecurrentLM.load(out / "model")
            nats, count = recurrent_rows_nll(model, test)
        else:
            from lmforge.model.loading import load_model
            from lmforge.model.registry import resolve
            from lmforge.train.checkpoint import latest_checkpoint

            checkpoint = latest_checkpoint(out / "run" / "checkpoints")
            if checkpoint is None:
                raise LmforgeError(f"{out} holds no complete Transformer checkpoint")
            model = load_model(resolve(str(checkpoint)))
            nats, count = transformer_rows_nll(model, test)
        rate, _ = _time_decode(_decoder(result["kind"], model, tokenizer, config, test))
    finally:
        torch.set_num_threads(threads)
    figures = test_figures(nats, count, test, token_byte_lengths(tokenizer))
    result.update({"test": figures, "decode_tokens_per_s": rate})
    write_json_atomic(result_path, result)
    return {**figures, "decode_tokens_per_s": rate}


def _order_key(result: dict[str, Any]) -> tuple[int, str]:
    return (KINDS.index(result["kind"]), result["model"])


def compare(config: BaselineConfig) -> dict[str, Any]:
    """``comparison.json``, ``comparison.md`` and ``comparison.png`` from every ``ROOT/*/result.json``."""
    from lmforge.io.atomic import write_json_atomic, write_text_atomic

    root = Path(config.root)
    results = sorted((json.loads(p.read_text(encoding="utf-8")) for p in root.glob("*/result.json")), key=_order_key)
    if not results:
        raise LmforgeError(f"no trained baselines in {root}: run `lmforge baseline train ...` first")
    rows = [{"model": r["model"], "parameters": r["parameters"], "train_seconds": r["train_seconds"],
             "train_cpu_seconds": r.get("cpu_seconds", r["train_seconds"]),
             "test_perplexity": r["test"]["perplexity"], "bits_per_byte": r["test"]["bits_per_byte"],
             "test_tokens": r["test"]["tokens"], "decode_tokens_per_s": r["decode_tokens_per_s"]} for r in results]
    if len({r["test_tokens"] for r in rows}) > 1:
        raise LmforgeError("the results were scored on different test tokens: retrain them on one corpus")
    lines = ["| model | parameters | training CPU s (wall s) | test perplexity | bits/byte | decode tokens/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        params = f"{r['parameters']:,}" + (" (counts)" if r["model"].startswith("ngram") else "")
        lines.append(f"| {r['model']} | {params} | {r['train_cpu_seconds']:.0f} ({r['train_seconds']:.0f}) | {r['test_perplexity']:.2f} | "
                     f"{r['bits_per_byte']:.3f} | {r['decode_tokens_per_s']:.0f} |")
    table = "\n".join(lines) + "\n"
    plot = _plot(results, root / "comparison.png")
    summary = {"rows": rows, "test_tokens": rows[0]["test_tokens"], "plot": str(plot) if plot else None}
    write_json_atomic(root / "comparison.json", summary)
    write_text_atomic(root / "comparison.md", "# Baselines on the same test tokens\n\n" + table
                      + (f"\n![validation perplexity against training time]({plot.name})\n" if plot else ""))
    summary["table"] = table
    return summary


def _plot(results: list[dict[str, Any]], path: Path) -> Path | None:
    from lmforge.io.atomic import atomic_path
    from lmforge.io.plots import pyplot

    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ngram_labels = []
    for r in results:
        curve = [c for c in r.get("validation", []) if c.get("val_ppl") is not None]
        if r["kind"] == "ngram":
            if curve:
                ax.axhline(curve[-1]["val_ppl"], linestyle=":", linewidth=1, color="grey")
                ngram_labels.append(f"{r['model']} {curve[-1]['val_ppl']:.0f}")
            continue
        ax.plot([c.get("cpu_seconds", c["seconds"]) for c in curve], [c["val_ppl"] for c in curve], marker=".", label=r["model"])
    if ngram_labels:  # the lines lie close together: one legend-like note instead of labels on them
        ax.text(0.98, 0.6, "n-gram (dotted), validation:\n" + "\n".join(ngram_labels), transform=ax.transAxes,
                ha="right", va="top", fontsize=8, color="dimgrey")
    ax.set_yscale("log")
    ax.set_xlabel("training time (CPU seconds, one thread)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Validation perplexity against training time (dotted: n-gram models)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
