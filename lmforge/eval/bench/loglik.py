"""Log-likelihood of continuations given contexts, with batched forward passes (E3).

A multiple-choice item becomes one request per choice: (context tokens, continuation
tokens). The score of a choice is the sum over its tokens of log p(token | everything
before it). To get those, the model reads context + continuation[:-1] once; the logits
at the last len(continuation) positions predict the continuation.

Work is shared where it is free:
- requests whose inputs are identical run once; for MMLU-style single-token choices
  (" A", " B", " C", " D") every choice has the same input (the prompt), so one row of one
  forward pass scores all four;
- a request whose input is a prefix of another's, with the same context, is read off
  the longer row (the model is causal, so the shared positions see the same tokens);
- rows of different lengths go in one batch, padded on the right: with causal attention
  padding after a position cannot change that position's logits;
- only the needed positions go through the output head (a pre-hook on `lm_head` picks
  them), so a batch never materializes batch x length x vocabulary logits.

Rows are batched longest first under a token budget; the order and batch layout depend
only on the requests, so two runs give identical numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


@dataclass(frozen=True)
class LoglikResult:
    logprob: float  # sum of log-probabilities of the continuation tokens (nats)
    greedy: bool  # True when every continuation token was the arg-max at its position
    tokens: int


@dataclass
class _Row:
    ids: list[int]
    needs: dict[int, None]  # positions whose logits are read (insertion-ordered set)


class LoglikelihoodScorer:
    """Scores (context, continuation) requests with a local `Transformer` (forward: ids -> logits)."""

    def __init__(self, model, batch_tokens: int = 4096, pad_id: int = 0) -> None:
        self.model = model
        self.batch_tokens = max(1, int(batch_tokens))
        self.pad_id = pad_id
        config = getattr(model, "config", None)
        self.max_length = int(getattr(config, "max_position_embeddings", 0) or 0) or None

    def _plan(self, requests: Sequence[Request]) -> tuple[list[_Row], list[tuple[int, int, list[int]]]]:
        """Rows to run, and for each request: (row index, first position, target ids)."""
        rows: list[_Row] = []
        placed: list[tuple[int, int, list[int]] | None] = [None] * len(requests)
        by_input: dict[tuple[int, ...], int] = {}
        by_context: dict[tuple[int, ...], list[int]] = {}
        # Longest inputs first, so that shorter inputs with the same context can ride on them.
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
        for i in order:
            context, continuation = list(requests[i][0]), list(requests[i][1])
            if not context:
                raise ValueError("a log-likelihood request needs at least one context token (e.g. BOS)")
            if not continuation:
                raise ValueError("a log-likelihood request needs at least one continuation token")
            ids = context + continuation[:-1]
            if self.max_length and len(ids) > self.max_length:
                if len(continuation) > self.max_length:
                    raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the "
                                     f"{self.max_length}-token context")
                ids = ids[len(ids) - self.max_length:]  # keep the end: the continuation and nearest context
            first = len(ids) - len(continuation)
            key = tuple(ids)
            row = by_input.get(key)
            if row is None:
                ctx_key = tuple(context)
                for candidate in by_context.get(ctx_key, ()):
                    longer = rows[candidate].ids
                    if len(longer) > len(ids) and longer[: len(ids)] == ids:
                        row = candidate
                        break
            if row is None:
                row = len(rows)
                rows.append(_Row(ids, {}))
                by_context.setdefault(tuple(context), []).append(row)
            by_input[key] = row
            for p in range(first, first + len(continuation)):
                rows[row].needs[p] = None
            placed[i] = (row, first, continuation)
        return rows, placed  # type: ignore[return-value]

    def score(self, requests: Sequence[Request], progress: Callable[[int, int], None] | None = None
              ) -> list[LoglikResult]:
        """One `LoglikResult` per request, in order. `progress(done, total)` counts requests."""
        import torch

        rows, placed = self._plan(requests)
        by_row: dict[int, list[int]] = {}
        for i, (row, _, _) in enumerate(placed):
            by_row.setdefault(row, []).append(i)
        results: list[LoglikResult | None] = [None] * len(requests)
        device = next(self.model.parameters()).device
        done = 0
        order = sorted(range(len(rows)), key=lambda r: (-len(rows[r].ids), r))
        at = 0
        while at < len(order):
            width = len(rows[order[at]].ids)
            count = max(1, min(len(order) - at, self.batch_tokens // width))
            batch = order[at : at + count]
            at += count
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            pairs: list[tuple[int, int]] = []
            for b, r in enumerate(batch):
                ids[b, : len(rows[r].ids)] = torch.tensor(rows[r].ids, dtype=torch.long)
                pairs.extend((b, p) for p in rows[r].needs)
            logprobs = self._logprobs(ids.to(device), pairs)
            where = {pair: k for k, pair in enumerate(pairs)}
            for b, r in enumerate(batch):
                for i in by_row[r]:
                    _, first, targets = placed[i]
                    picks = [where[(b, first + j)] for j in range(len(targets))]
                    rows_lp = logprobs[picks]
                    target = torch.tensor(targets, dtype=torch.long, device=rows_lp.device)
                    chosen = rows_lp.gather(-1, target[:, None])[:, 0]
                    greedy = bool((rows_lp.argmax(-1) == target).all())
                    results[i] = LoglikResult(float(chosen.double().sum()), greedy, len(targets))
                    done += 1
            if progress is not None:
                progress(done, len(requests))
        return results  # type: ignore[return-value]

    def _logprobs(self, ids, pairs: list[tuple[int, int]]):
        """log-softmax over the vocabulary at the (row, position) pairs: [len(pairs), V] float32."""
        import torch

        rows = torch.tensor([b for b, _ in pairs], dtype=torch.long, device=ids.device)
        cols = torch.tensor([p for _, p in pairs], dtype=torch.long, device=ids.device)
        head = getattr(self.model, "lm_head", None)
        with torch.inference_mode():
            if head is None:
                logits = self.model(ids)[rows, cols]
            else:
                def keep_needed(module, args):
                    return (args[0][rows, cols].unsqueeze(0),) + tuple(args[1:])

                handle = head.register_forward_pre_hook(keep_needed)
                try:
                    logits = self.model(ids)[0]
                finally:
                    handle.remove()
            return torch.log_softmax(logits.float(), dim=-1)


def split_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, tokenized the way the model would see the joined text.

    The joined text is encoded once and split where the context's own encoding ends; if the
    tokenizer merges across the boundary (so the context is not a prefix), the parts are
    encoded separately instead.
    """
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    if len(whole) > len(ctx) and whole[: len(ctx)] == ctx:
        return ctx, whole[len(ctx):]
    return ctx, tokenizer.encode(continuation, add_special_tokens=False)
