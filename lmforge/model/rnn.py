"""Recurrent language models: LSTM and GRU (M10), the baselines Transformers replaced.

    ids -> embedding -> dropout -> stacked recurrent layers (dropout between them) -> dropout
        -> [projection to the embedding width] -> output head (tied to the embedding or not) -> logits

A recurrent layer reads one token at a time and carries a fixed-size state forward. The
gates, with x the layer's input, h the previous output and sigma the logistic function
(weights in PyTorch's layout, so the same tensors drive both paths below)::

    LSTM  i = sigma(W_ii x + b_ii + W_hi h + b_hi)     input gate
          f = sigma(W_if x + b_if + W_hf h + b_hf)     forget gate
          g = tanh(W_ig x + b_ig + W_hg h + b_hg)      candidate cell
          o = sigma(W_io x + b_io + W_ho h + b_ho)     output gate
          c' = f * c + i * g          h' = o * tanh(c')
    GRU   r = sigma(W_ir x + b_ir + W_hr h + b_hr)     reset gate
          z = sigma(W_iz x + b_iz + W_hz h + b_hz)     update gate
          n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
          h' = (1 - z) * n + z * h

The additive cell update (``f * c + i * g``) is what lets gradients flow over many steps
where a plain RNN's repeated multiplication by the same matrix makes them vanish or
explode. The state is still one vector per layer, and the steps must run one after the
other: that sequential dependency, not the quality of the cell, is what Transformers removed.

`lstm_cell` / `gru_cell` and `RecurrentLM.forward(..., fused=False)` are the written-out
math; the default path calls PyTorch's fused ``nn.LSTM`` / ``nn.GRU`` on the same
parameters, and tests hold the two to 1e-5. Checkpoints: a directory with
``rnn_config.json`` and ``model.safetensors`` (a tied head is stored once, as the embedding).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError

CELLS = ("lstm", "gru")
CONFIG_FILE = "rnn_config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class RNNConfig:
    """A recurrent LM. With ``tie_weights`` the head reuses the embedding matrix (Press & Wolf);
    if ``hidden_size`` differs from ``embed_dim`` a linear projection bridges them."""

    cell: str = "lstm"  # lstm | gru
    vocab_size: int = 4096
    embed_dim: int = 256
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.1  # on the embeddings, between recurrent layers and on the last layer's output
    tie_weights: bool = True

    def validate(self) -> None:
        if self.cell not in CELLS:
            raise LmforgeError(f"unknown recurrent cell {self.cell!r}; choose one of {', '.join(CELLS)}")
        for name in ("vocab_size", "embed_dim", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise LmforgeError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RNNConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def lstm_cell(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
              b_ih: torch.Tensor, b_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step; ``x`` may already be ``x @ w_ih.T + b_ih`` (pass w_ih=None)."""
    gates = (x if w_ih is None else x @ w_ih.T + b_ih) + h @ w_hh.T + b_hh
    i, f, g, o = gates.chunk(4, dim=-1)  # PyTorch's order of the stacked gate weights
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c + i * g
    return o * torch.tanh(c), c


def gru_cell(x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
             b_hh: torch.Tensor) -> torch.Tensor:
    """One GRU step; ``x`` may already be ``x @ w_ih.T + b_ih`` (pass w_ih=None)."""
    gi = x if w_ih is None else x @ w_ih.T + b_ih
    gh = h @ w_hh.T + b_hh
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)  # the reset gate scales the recurrent part only (PyTorch's variant)
    return (1 - z) * n + z * h


State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def run_recurrent_layers(rnn: nn.LSTM | nn.GRU, x: torch.Tensor, state: State | None = None,
                         dropout: float = 0.0, training: bool = False) -> tuple[torch.Tensor, State]:
    """The written-out equivalent of ``rnn(x, state)`` for a batch-first ``nn.LSTM`` / ``nn.GRU``:
    the same parameters, the cell math above, step by step; dropout between layers as ``rnn`` does."""
    is_lstm = isinstance(rnn, nn.LSTM)
    batch, steps, _ = x.shape
    layers, hidden = rnn.num_layers, rnn.hidden_size
    if state is None:
        zeros = x.new_zeros(layers, batch, hidden)
        state = (zeros, zeros.clone()) if is_lstm else zeros
    h0 = state[0] if is_lstm else state
    c0 = state[1] if is_lstm else None
    final_h, final_c = [], []
    layer_input = x
    for layer in range(layers):
        w_ih, w_hh = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}")
        b_ih, b_hh = getattr(rnn, f"bias_ih_l{layer}"), getattr(rnn, f"bias_hh_l{layer}")
        projected = layer_input @ w_ih.T + b_ih  # the input part of every step at once
        h = h0[layer]
        c = c0[layer] if is_lstm else None
        outputs = []
        for t in range(steps):
            if is_lstm:
                h, c = lstm_cell(projected[:, t], h, c, None, w_hh, None, b_hh)
            else:
                h = gru_cell(projected[:, t], h, None, w_hh, None, b_hh)
            outputs.append(h)
        layer_input = torch.stack(outputs, dim=1)
        if layer < layers - 1 and dropout > 0:
            layer_input = F.dropout(layer_input, dropout, training)
        final_h.append(h)
        final_c.append(c)
    h_n = torch.stack(final_h)
    return layer_input, ((h_n, torch.stack(final_c)) if is_lstm else h_n)


class RecurrentLM(nn.Module):
    """Embedding -> LSTM/GRU stack -> head; ``forward(ids, state) -> (logits, state)``."""

    def __init__(self, config: RNNConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim)
        rnn_class = nn.LSTM if c.cell == "lstm" else nn.GRU
        self.rnn = rnn_class(c.embed_dim, c.hidden_size, c.num_layers, batch_first=True,
                             dropout=c.dropout if c.num_layers > 1 else 0.0)
        head_in = c.hidden_size
        self.proj = None
        if c.tie_weights and c.hidden_size != c.embed_dim:
            self.proj = nn.Linear(c.hidden_size, c.embed_dim, bias=False)
            head_in = c.embed_dim
        self.head = nn.Linear(head_in, c.vocab_size)
        if c.tie_weights:
            self.head.weight = self.embed.weight
        self.drop = nn.Dropout(c.dropout)
        nn.init.normal_(self.embed.weight, std=0.3)  # a tied head needs logits that are not all ~0 (measured: 0.05 stalls at the unigram)
        nn.init.zeros_(self.head.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied matrix is listed once

    def forward(self, input_ids: torch.Tensor, state: State | None = None,
                fused: bool = True) -> tuple[torch.Tensor, State]:
        x = self.drop(self.embed(input_ids))
        if fused:
            out, state = self.rnn(x, state)
        else:
            out, state = run_recurrent_layers(self.rnn, x, state, self.rnn.dropout, self.training)
        out = self.drop(out)
        if self.proj is not None:
            out = self.proj(out)
        return self.head(out), state

    @torch.no_grad()
    def generate(self, prompt: list[int], max_tokens: int = 32, temperature: float = 1.0, seed: int = 0,
                 stop_ids: tuple[int, ...] = ()) -> list[int]:
        """Sample ``max_tokens`` ids after ``prompt`` (temperature 0: greedy), one step per token
        with the state carried over: no recomputation of the prompt."""
        if not prompt:
            raise LmforgeError("the recurrent model needs at least one prompt token")
        was_training = self.training
        self.eval()
        generator = torch.Generator().manual_seed(seed)
        device = self.embed.weight.device
        logits, state = self(torch.tensor([prompt], device=device))
        last, out = logits[0, -1], []
        for _ in range(max_tokens):
            if temperature <= 0:
                token = int(last.argmax())
            else:
                probs = torch.softmax(last.float() / temperature, dim=-1).cpu()
                token = int(torch.multinomial(probs, 1, generator=generator))
            out.append(token)
            if token in stop_ids:
                break
            logits, state = self(torch.tensor([[token]], device=device), state)
            last = logits[0, -1]
        self.train(was_training)
        return out

    # -- persistence ------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """``rnn_config.json`` + ``model.safetensors`` in ``directory``, each written atomically."""
        from safetensors.torch import save_file

        from lmforge.io.atomic import atomic_path, write_json_atomic

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_weights:
            state.pop("head.weight")
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": "lmforge-rnn/1"})
        write_json_atomic(directory / CONFIG_FILE, self.config.to_dict())
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "RecurrentLM":
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise LmforgeError(f"{directory} is not a recurrent LM checkpoint ({CONFIG_FILE} + {WEIGHTS_FILE})")
        try:
            config = RNNConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8")))
            state = load_file(str(directory / WEIGHTS_FILE))
        except (OSError, ValueError, TypeError) as exc:
            raise LmforgeError(f"cannot read the recurrent LM in {directory}: {exc}") from None
        model = cls(config)
        if config.tie_weights:
            state["head.weight"] = state["embed.weight"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise LmforgeError(f"{directory} does not match its config (missing {missing}, unexpected {unexpected})")
        return model
