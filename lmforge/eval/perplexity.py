"""Perplexity and bits per byte of long texts, scored with a sliding window (E1).

A text longer than the model's context is cut into overlapping slices. The model reads
at most `window` tokens per slice; consecutive slices start `stride` tokens apart, and
each slice scores only the targets that no earlier slice scored, so every token is
predicted exactly once and, after the first slice, with at least `window - stride`
tokens of context. `stride == window` gives disjoint slices (cheapest, least context);
`stride == 1` gives every token the full window (most expensive, best estimate).

This is the usual Hugging Face recipe with one difference in how the window is counted:
here `window` is what the model reads, and the slice handed to the scorer also carries
the next token (the last target). The recipe's `max_length` counts that token too, so
window W, stride S here is `max_length = W + 1`, stride S there, and with
`stride == window` no token goes unscored.

Scoring is a plain callable, so anything that returns log-probabilities can be measured:

    Scorer: tokens [t0, t1, ..., tn] -> [log p(t1 | t0), ..., log p(tn | t0..tn-1)]

`ModelScorer` wraps a local `Transformer` (batched); a remote OpenAI-compatible
completions endpoint with `echo=True, logprobs=0, max_tokens=0` returns exactly this list
for a prompt of token ids, so it can be plugged in as a function.

The first token of a text has nothing to be predicted from. By default the tokenizer's BOS
token (else its EOS token) is put in front as context, so every token of the text is
scored and bits per byte divide by all the bytes of the text; with no such token the
first text token serves as context and its bytes are left out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol, Sequence

from ..errors import LmforgeError

Scorer = Callable[[Sequence[int]], Sequence[float]]
DEFAULT_MAX_WINDOW = 2048  # a larger context costs memory (logits) more than it improves the estimate on CPU


class BatchScorer(Protocol):
    """A scorer that can also take many slices at once (what `ModelScorer` offers)."""

    def __call__(self, tokens: Sequence[int]) -> Sequence[float]: ...

    def score_batch(self, slices: Sequence[Sequence[int]], last: Sequence[int]) -> list[list[float]]: ...


@dataclass(frozen=True)
class Window:
    """One slice tokens[start:end]; the scorer's last `new` log-probs are counted."""

    start: int
    end: int
    new: int


def plan_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """Slices that score each of tokens[1:] exactly once (tokens[0] is context only)."""
    if window < 1:
        raise LmforgeError(f"window must be at least 1 token, got {window}")
    if not 1 <= stride <= window:
        raise LmforgeError(f"stride must be between 1 and the window ({window}), got {stride}")
    plans: list[Window] = []
    begin, scored_until = 0, 1
    while scored_until < n_tokens:
        end = min(begin + window + 1, n_tokens)
        plans.append(Window(begin, end, end - scored_until))
        scored_until = end
        begin += stride
    return plans


@dataclass
class PerplexityResult:
    """Totals over all scored tokens; the ratios are properties."""

    tokens: int  # scored tokens
    bytes: int | None  # UTF-8 bytes those tokens stand for (None when only ids were given)
    nll: float  # sum of -log p over the scored tokens, in nats
    windows: int
    documents: int = 1

    @property
    def mean_nll(self) -> float:
        """Cross-entropy in nats per token."""
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll) if self.tokens else math.nan

    @property
    def bits_per_token(self) -> float:
        return self.mean_nll / math.log(2)

    @property
    def bpb(self) -> float | None:
        """Bits per UTF-8 byte: comparable across tokenizers, unlike perplexity."""
        if not self.bytes:
            return None
        return self.nll / math.log(2) / self.bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean_nll": self.mean_nll, "ppl": self.ppl,
                "bits_per_token": self.bits_per_token, "bpb": self.bpb}


class ModelScorer:
    """Log-probabilities from a local `Transformer`, many slices per forward pass.

    Slices of equal length are stacked into one batch of at most `batch_tokens` tokens
    (logits take batch x length x vocabulary floats, which bounds the batch on CPU).
    """

    def __init__(self, model, batch_tokens: int = 4096) -> None:
        self.model = model
        self.batch_tokens = batch_tokens
        self.context = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0)) or None

    def __call__(self, tokens: Sequence[int]) -> list[float]:
        return self.score_batch([tokens], [len(tokens) - 1])[0]

    def score_batch(self, slices: Sequence[Sequence[int]], last: Sequence[int]) -> list[list[float]]:
        """For each slice, the log-probs of its last `last[i]` tokens given everything before."""
        import torch

        device = next(self.model.parameters()).device
        out: list[list[float] | None] = [None] * len(slices)
        by_length: dict[int, list[int]] = {}
        for i, s in enumerate(slices):
            if len(s) < 2 or not 0 <= last[i] <= len(s) - 1:
                raise ValueError(f"slice {i} of {len(s)} tokens cannot score its last {last[i]}")
            by_length.setdefault(len(s), []).append(i)
        for length, members in by_length.items():
            rows = max(1, self.batch_tokens // length)
            for at in range(0, len(members), rows):
                group = members[at : at + rows]
                ids = torch.tensor([list(slices[i]) for i in group], dtype=torch.long, device=device)
                n = max(last[i] for i in group)
                values: list[list[float]] = [[] for _ in group]
                if n:
                    with torch.inference_mode():
                        logits = self.model(ids[:, :-1])[:, -n:].float()
                        picked = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, -n:, None])[..., 0]
                        values = picked.double().cpu().tolist()
                for row, i in enumerate(group):
                    out[i] = values[row][n - last[i]:] if last[i] else []
        return out  # type: ignore[return-value]


def score_tokens(
    tokens: Sequence[int],
    scorer: Scorer | BatchScorer,
    window: int,
    stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[float, int, int]:
    """(sum of -log p in nats, scored tokens, slices) for tokens[1:] given their predecessors."""
    stride = stride or max(1, window // 2)
    plans = plan_windows(len(tokens), window, stride)
    total, count = [], 0
    batched = getattr(scorer, "score_batch", None)
    capacity = max(1, getattr(scorer, "batch_tokens", 4096) // (window + 1))
    # Batches as large as the scorer allows, but at least ten progress steps on long texts.
    chunk = 1 if batched is None else max(1, min(capacity, math.ceil(len(plans) / 10)))
    for at in range(0, len(plans), chunk):
        part = plans[at : at + chunk]
        slices = [tokens[w.start : w.end] for w in part]
        if batched is not None:
            results = batched(slices, [w.new for w in part])
        else:
            results = []
            for w, s in zip(part, slices):
                logprobs = list(scorer(s))
                if len(logprobs) != len(s) - 1:
                    raise LmforgeError(f"the scorer returned {len(logprobs)} log-probs for {len(s)} tokens "
                                       f"(expected one per token after the first)")
                results.append(logprobs[len(logprobs) - w.new:])
        for w, logprobs in zip(part, results):
            if len(logprobs) != w.new:
                raise LmforgeError(f"the scorer returned {len(logprobs)} log-probs, expected {w.new}")
            if any(v is None or math.isnan(v) or v > 1e-6 for v in logprobs):
                raise LmforgeError("the scorer returned a missing, NaN or positive log-probability")
            total.extend(logprobs)
            count += w.new
        if progress is not None:
            progress(min(at + chunk, len(plans)), len(plans))
    return -math.fsum(total), count, len(plans)


def _context_token(tokenizer, prefix_token: int | str | None) -> int | None:
    if prefix_token != "auto":
        return prefix_token  # type: ignore[return-value]
    for token_id in (tokenizer.bos_id, tokenizer.eos_id):
        if token_id is not None:
            return token_id
    return None


def _unpack(source) -> tuple[Scorer | BatchScorer, Any, int | None]:
    """(scorer, tokenizer or None, model context or None) from a LoadedModel, a Transformer or a scorer."""
    if isinstance(source, ModelScorer):
        return source, None, source.context
    model = getattr(source, "model", None)
    tokenizer = getattr(source, "tokenizer", None)
    if model is not None and hasattr(model, "parameters"):  # a LoadedModel
        scorer = ModelScorer(model)
        return scorer, tokenizer, scorer.context
    if hasattr(source, "parameters") and callable(source):  # a bare torch module
        scorer = ModelScorer(source)
        return scorer, None, scorer.context
    if callable(source):
        return source, tokenizer, getattr(source, "context", None)
    raise LmforgeError(f"cannot score with a {type(source).__name__}: pass a loaded model or a scorer function")


def perplexity(
    source,
    texts: str | Sequence[str],
    *,
    tokenizer=None,
    window: int | None = None,
    stride: int | None = None,
    prefix_token: int | str | None = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity and bits per byte of one text or the concatenated totals of several.

    `source` is what `lmforge.load()` returns, a `Transformer` (then pass `tokenizer`), or
    any scorer function (then pass `tokenizer` and `window`). `window` defaults to the
    model's context, at most 2048 tokens; `stride` to half the window. `prefix_token`:
    "auto" puts BOS (else EOS) before each text so its first token is scored too; an id
    uses that token; None scores from the second token on. Each text is scored on its
    own (no context crosses from one text into the next).
    """
    scorer, own_tokenizer, context = _unpack(source)
    tokenizer = tokenizer or own_tokenizer
    if tokenizer is None:
        raise LmforgeError("perplexity needs a tokenizer to turn the text into tokens")
    if window is None:
        if context is None:
            raise LmforgeError("pass window= (the number of tokens the scorer reads per slice)")
        window = min(context, DEFAULT_MAX_WINDOW)
    if context is not None and window > context:
        raise LmforgeError(f"window {window} exceeds the model's context of {context} tokens")
    stride = stride or max(1, window // 2)
    plan_windows(0, window, stride)  # validate before any work
    docs = [texts] if isinstance(texts, str) else list(texts)
    prefix = _context_token(tokenizer, prefix_token)

    encoded = []
    for text in docs:
        ids = tokenizer.encode(text, add_special_tokens=False)
        n_bytes = len(text.encode("utf-8"))
        if prefix is not None:
            ids = [prefix] + ids
        elif ids:
            n_bytes -= len(tokenizer.decode(ids[:1]).encode("utf-8"))
        encoded.append((ids, n_bytes))
    plans_total = sum(len(plan_windows(len(ids), window, stride)) for ids, _ in encoded)

    nll, tokens, windows, n_bytes = 0.0, 0, 0, 0
    for ids, doc_bytes in encoded:
        done_before = windows

        def report(done: int, _total: int, base: int = done_before) -> None:
            if progress is not None:
                progress(base + done, plans_total)

        doc_nll, doc_tokens, doc_windows = score_tokens(ids, scorer, window, stride, report)
        nll += doc_nll
        tokens += doc_tokens
        windows += doc_windows
        n_bytes += max(doc_bytes, 0) if doc_tokens else 0
    return PerplexityResult(tokens=tokens, bytes=n_bytes, nll=nll, windows=windows, documents=len(docs))
