"""Beam search with length penalty and early stopping (I1), and the encoder-decoder decode loop.

Greedy decoding keeps one hypothesis and takes the arg-max at each step; it can miss a
sequence whose first token is slightly less likely but whose continuation is far more
likely. Beam search keeps the `num_beams` best partial sequences (by summed log-probability)
and extends each with every token, keeping the best `num_beams` again. A hypothesis that
emits EOS (or reaches the length limit) moves to a finished list, scored by

    score = sum(log p) / length ** length_penalty

Without the division longer hypotheses always lose (every token adds a negative term);
``length_penalty`` > 0 favours longer outputs, < 0 shorter ones. The finished list also
keeps `num_beams` entries. When to stop (``early_stopping``):

- ``True``: as soon as `num_beams` hypotheses have finished;
- ``False``: when the best running hypothesis, scored at its current length, can no longer
  beat the worst finished one (a heuristic: with length_penalty > 0 it could still do so later);
- ``"never"``: the same test, but with the best length still possible (max length) when
  length_penalty > 0, so the search only stops when no finished entry can be displaced.

Each step looks at the best ``2 * num_beams`` continuations, so that `num_beams` of them can
keep running even when some just finished; only those ranked among the first `num_beams`
may enter the finished list. These are the rules of transformers' ``generate(num_beams=...)``,
and the tests hold lmforge to its outputs token for token.

The search is written against a *stepper* (log-probabilities of the next token for every
running row, and a way to reorder its cache rows when beams are reselected), so the same
function decodes an encoder-decoder model (`Seq2SeqStepper`: the source encoded once, its
cross keys/values repeated per beam once, the decoder's self-attention cache reordered by
beam) and a decoder-only `Transformer` (`DecoderStepper`).

Greedy and sampled decoding of an encoder-decoder model are in `seq2seq_generate` as well:
one loop over decoder steps for every way of choosing tokens. Decoder-only models are
served by the continuous-batching scheduler (scheduler.py); only their beam search is here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LmforgeError
from .sampling import SamplingParams, sample_next

EARLY_STOPPING = (True, False, "never")


@dataclass
class BeamParams:
    """How a beam search runs (see the module docstring for each rule)."""

    num_beams: int = 4
    max_new_tokens: int = 64
    length_penalty: float = 1.0  # score = sum log p / length ** length_penalty
    early_stopping: bool | str = False  # True | False | "never"

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise LmforgeError("num_beams must be at least 1")
        if self.max_new_tokens < 1:
            raise LmforgeError("max_new_tokens must be at least 1")
        if self.early_stopping not in EARLY_STOPPING:
            raise LmforgeError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, EOS included when it ended the hypothesis
    score: float  # length-penalised log-probability


class Seq2SeqStepper:
    """Next-token log-probabilities of an encoder-decoder model for `rows_per_source` rows per source."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, rows_per_source: int,
                 max_len: int) -> None:
        self.model = model
        memory = model.encode(input_ids, attention_mask)
        cross = model.cross_cache(memory, attention_mask)  # once per source, not per beam or step
        index = torch.arange(input_ids.shape[0], device=input_ids.device).repeat_interleave(rows_per_source)
        self.cross = cross.select(index) if rows_per_source > 1 else cross
        self.cache = model.new_cache(len(index), max_len + 1)
        self.position = 0
        start = model.config.decoder_start_token_id
        if start is None:
            raise LmforgeError("this model's config names no decoder_start_token_id")
        self.first = torch.full((len(index), 1), start, dtype=torch.long, device=input_ids.device)

    def log_probs(self, tokens: torch.Tensor | None) -> torch.Tensor:
        """[rows, V] after feeding `tokens` [rows] (None: the decoder start token)."""
        ids = self.first if tokens is None else tokens.view(-1, 1)
        logits = self.model.decode(ids, self.cross, self.cache, self.position)
        self.position += 1
        return torch.log_softmax(logits[:, -1].float(), dim=-1)

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i of the cache becomes old row rows[i] (beams reselected)."""
        self.cache.k = self.cache.k.index_select(1, rows)
        self.cache.v = self.cache.v.index_select(1, rows)


class DecoderStepper:
    """The same for a decoder-only `Transformer` and prompts of equal length [B, L]."""

    def __init__(self, model, prompt_ids: torch.Tensor, rows_per_source: int, max_len: int) -> None:
        from ..model.kv_cache import KVCache

        self.model = model
        self.prompt = prompt_ids.repeat_interleave(rows_per_source, 0)
        weight = next(model.parameters())
        self.cache = KVCache.for_model(model.config, len(self.prompt), prompt_ids.shape[1] + max_len + 1,
                                       weight.dtype, weight.device)
        self.position = 0

    def log_probs(self, tokens: torch.Tensor | None) -> torch.Tensor:
        ids = self.prompt if tokens is None else tokens.view(-1, 1)
        logits = self.model(ids, cache=self.cache, start=self.position, last_only=True)
        self.position += ids.shape[1]
        return torch.log_softmax(logits[:, -1].float(), dim=-1)

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.k = self.cache.k.index_select(1, rows)
        self.cache.v = self.cache.v.index_select(1, rows)


@torch.no_grad()
def beam_search(stepper, batch: int, params: BeamParams, eos_ids: list[int] | tuple[int, ...]) -> list[Hypothesis]:
    """The best finished hypothesis of each of `batch` inputs (the stepper holds batch x num_beams rows)."""
    k, max_new = params.num_beams, params.max_new_tokens
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long)
    keep = max(2, 1 + len(eos)) * k  # candidates looked at per step
    rows = torch.arange(batch)[:, None] * k  # first cache row of each input
    running = torch.zeros(batch, k, 0, dtype=torch.long)
    running_scores = torch.full((batch, k), -1e9)
    running_scores[:, 0] = 0.0  # all beams start identical: let only the first one expand at step 1
    finished = torch.zeros(batch, k, max_new, dtype=torch.long)
    finished_len = torch.zeros(batch, k, dtype=torch.long)
    finished_scores = torch.full((batch, k), -1e9)
    finished_full = torch.zeros(batch, k, dtype=torch.bool)  # slot holds a real hypothesis
    improvable = torch.ones(batch, dtype=torch.bool)
    in_top_k = torch.arange(keep) < k
    last = None
    for step in range(max_new):
        logp = stepper.log_probs(last).cpu()
        vocab = logp.shape[-1]
        total = (logp.view(batch, k, vocab) + running_scores[:, :, None]).view(batch, k * vocab)
        scores, flat = torch.topk(total, keep, dim=1)
        source_beam, token = flat // vocab, flat % vocab
        candidates = torch.cat([running.gather(1, source_beam[:, :, None].expand(-1, -1, step)), token[:, :, None]], 2)
        ends = torch.isin(token, eos) | (step + 1 == max_new)

        # finished: candidates among the first k that end here, length-penalised, merged with earlier ones
        length = step + 1
        penalised = scores / (length ** params.length_penalty)
        allowed = ends & in_top_k[None, :] & improvable[:, None]
        if params.early_stopping is True:
            allowed &= ~finished_full.all(1, keepdim=True)
        penalised = torch.where(allowed, penalised, penalised - 3e9)
        merged_scores = torch.cat([finished_scores, penalised], 1)
        merged_full = torch.cat([finished_full, allowed], 1)
        padded = torch.zeros(batch, keep, max_new, dtype=torch.long)
        padded[:, :, :length] = candidates
        merged = torch.cat([finished, padded], 1)
        merged_len = torch.cat([finished_len, torch.full((batch, keep), length)], 1)
        best = torch.topk(merged_scores, k, dim=1).indices
        finished_scores = merged_scores.gather(1, best)
        finished_full = merged_full.gather(1, best)
        finished = merged.gather(1, best[:, :, None].expand(-1, -1, max_new))
        finished_len = merged_len.gather(1, best)

        # running: the best k candidates that did not end
        alive = torch.where(ends, scores - 1e9, scores)
        chosen = torch.topk(alive, k, dim=1).indices
        running_scores = alive.gather(1, chosen)
        running = candidates.gather(1, chosen[:, :, None].expand(-1, -1, length))
        device = stepper.cache.k.device
        last = token.gather(1, chosen).reshape(-1).to(device)
        stepper.reorder((rows + source_beam.gather(1, chosen)).reshape(-1).to(device))

        # can a running hypothesis still beat the worst finished one?
        best_length = max_new if (params.early_stopping == "never" and params.length_penalty > 0) else length
        best_running = running_scores[:, 0] / (best_length ** params.length_penalty)
        worst = torch.where(finished_full.all(1), finished_scores.min(1).values, torch.tensor(-1e9))
        improvable &= best_running > worst
        if not improvable.any() or bool(ends.all()):
            break
        if params.early_stopping is True and bool(finished_full.all()):
            break
    return [Hypothesis(finished[b, 0, :int(finished_len[b, 0])].tolist(), float(finished_scores[b, 0]))
            for b in range(batch)]


@torch.no_grad()
def seq2seq_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     max_new_tokens: int = 64, num_beams: int = 1, length_penalty: float = 1.0,
                     early_stopping: bool | str = False, sampling: SamplingParams | None = None) -> list[list[int]]:
    """Target ids for each source row of `input_ids` [B, S] (right-padded, `attention_mask` 1 = real),
    EOS stripped. num_beams > 1: beam search; otherwise greedy, or sampling under `sampling`."""
    config = model.config
    eos = config.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise LmforgeError("input_ids must be a non-empty [batch, length] tensor")
    if num_beams > 1:
        if sampling is not None and not sampling.greedy:
            raise LmforgeError("beam search does not sample: drop the temperature or use num_beams 1")
        params = BeamParams(num_beams, max_new_tokens, length_penalty, early_stopping)
        stepper = Seq2SeqStepper(model, input_ids, attention_mask, num_beams, max_new_tokens)
        hyps = beam_search(stepper, input_ids.shape[0], params, eos_ids)
        return [[t for t in h.tokens if t not in eos_ids] for h in hyps]
    stepper = Seq2SeqStepper(model, input_ids, attention_mask, 1, max_new_tokens)
    batch = input_ids.shape[0]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    generator = sampling.make_generator() if sampling is not None else None
    last = None
    for _ in range(max_new_tokens):
        logp = stepper.log_probs(last)
        if sampling is None or sampling.greedy and sampling.repetition_penalty == 1.0:
            chosen = logp.argmax(-1).tolist()
        else:
            chosen = [sample_next(logp[i], sampling, torch.tensor(outputs[i], dtype=torch.long), generator)
                      for i in range(batch)]
        for i, token in enumerate(chosen):
            if done[i]:
                chosen[i] = config.pad_token_id if config.pad_token_id is not None else token
                continue
            if token in eos_ids:
                done[i] = True
            else:
                outputs[i].append(token)
        if all(done):
            break
        last = torch.tensor(chosen, dtype=torch.long, device=input_ids.device)
    return outputs
