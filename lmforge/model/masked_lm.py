"""A BERT encoder with its masked-language-model head (P1), in the layout of ``BertForMaskedLM``.

The encoder is lmforge's one `Transformer` built as the BERT family builds it (bidirectional
attention, post-norm blocks, learned positions, token types, no vocabulary head); `MaskedLM`
adds BERT's prediction head on top of the final hidden states h:

    t      = LayerNorm(gelu(W_t h + b_t))          the "transform"
    logits = E t + b                               E: the input embedding table (tied)

so predicting a token reuses the table that embeds it; the head adds only D x D + 3D + V
parameters. `save_masked_lm` writes a Hugging Face directory with the body under ``bert.`` and
the head under ``cls.predictions.`` (the names transformers' ``BertForMaskedLM`` uses, the
decoder weight tied to the word embeddings); lmforge's own loaders read the same directory
as a plain encoder (they drop the ``bert.`` prefix and ignore the head), which is how the
task heads of lmforge/tune/ fine-tune it, and `load_masked_lm` reads it with its head.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

HEAD_NAMES = {  # lmforge name -> BertForMaskedLM name
    "mlm_head.dense.weight": "cls.predictions.transform.dense.weight",
    "mlm_head.dense.bias": "cls.predictions.transform.dense.bias",
    "mlm_head.norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm_head.norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm_head.bias": "cls.predictions.bias",
}


def bert_config(vocab_size: int, n_layer: int = 4, n_embd: int = 128, n_head: int = 4, intermediate_size: int = 512,
                max_position_embeddings: int = 512, pad_token_id: int | None = 0, **extra) -> ModelConfig:
    """The `ModelConfig` of a BERT encoder of this shape, as the BERT family reads one from config.json."""
    from lmforge.model.families import FAMILIES

    hf = {"vocab_size": vocab_size, "num_hidden_layers": n_layer, "hidden_size": n_embd,
          "num_attention_heads": n_head, "intermediate_size": intermediate_size,
          "max_position_embeddings": max_position_embeddings, "pad_token_id": pad_token_id,
          "hidden_act": "gelu", "layer_norm_eps": 1e-12, "type_vocab_size": 2, **extra}
    try:
        return FAMILIES["bert"].to_config(hf)
    except ValueError as exc:
        raise LmforgeError(f"model: {exc}") from None


class MLMHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then the tied embedding table plus a bias."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.norm = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.approximate = config.gelu_approximate

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        t = self.norm(F.gelu(self.dense(hidden), approximate=self.approximate))
        return F.linear(t, embedding, self.bias)


class MaskedLM(Transformer):
    """An encoder `Transformer` plus `MLMHead`: ``forward(ids, attention_mask)`` -> logits [B, L, V];
    ``predict(hidden)`` maps chosen hidden states [N, D] to logits [N, V] (training computes
    the vocabulary projection only at the masked positions)."""

    def __init__(self, config: ModelConfig) -> None:
        if config.causal or config.lm_head:
            raise LmforgeError("a masked language model is an encoder: causal=False and no next-token head")
        super().__init__(config)
        self.mlm_head = MLMHead(config)
        if not self.embed.weight.is_meta:
            self.mlm_head.apply(self._init_weights)

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlm_head(hidden, self.embed.weight)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return self.predict(self.encode(input_ids, attention_mask, token_type_ids))

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith("mlm_head.")}


def save_masked_lm(model: MaskedLM, directory: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """``model`` as a ``BertForMaskedLM`` directory (config.json, model.safetensors, tokenizer), atomically."""
    from safetensors.torch import save_file

    from lmforge.io.atomic import atomic_directory
    from lmforge.model.checkpoint import write_hf_files

    target = Path(directory)
    if target.exists() and not overwrite:
        raise LmforgeError(f"{target} already exists (choose another path or remove it)")
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    with atomic_directory(target) as staging:
        write_hf_files(model.config, {k: v for k, v in state.items() if not k.startswith("mlm_head.")}, staging,
                       tokenizer)
        from safetensors.torch import load_file

        body = load_file(staging / "model.safetensors")
        hf = {"bert." + k: v for k, v in body.items()}
        hf.update({HEAD_NAMES[k]: v.contiguous() for k, v in state.items() if k in HEAD_NAMES})
        save_file(hf, staging / "model.safetensors", metadata={"format": "pt"})
        config_file = staging / "config.json"
        hf_config = json.loads(config_file.read_text(encoding="utf-8"))
        hf_config.update({"architectures": ["BertForMaskedLM"], "tie_word_embeddings": True})
        config_file.write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        tokenizer_config = staging / "tokenizer_config.json"
        if tokenizer is not None and tokenizer_config.is_file():  # so that transformers knows the roles too
            roles = json.loads(tokenizer_config.read_text(encoding="utf-8"))
            for role in ("cls", "sep", "mask", "pad", "unk"):
                token = f"[{role.upper()}]"
                if tokenizer.token_to_id(token) is not None:
                    roles.setdefault(f"{role}_token", token)
            tokenizer_config.write_text(json.dumps(roles, indent=2) + "\n", encoding="utf-8")
    return target


def load_masked_lm(directory: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> MaskedLM:
    """A `MaskedLM` from a directory `save_masked_lm` wrote (or any BertForMaskedLM checkpoint)."""
    from lmforge.model.checkpoint import read_hf_config, read_safetensors
    from lmforge.model.families import hf_to_lmforge

    directory = Path(directory)
    config = read_hf_config(directory)
    if config.family != "bert":
        raise LmforgeError(f"{directory} holds a {config.family} model; a masked language model is a BERT encoder")
    hf_state = read_safetensors(directory)
    missing = [name for name in HEAD_NAMES.values() if name not in hf_state]
    if missing:
        raise LmforgeError(f"{directory} has no masked-LM head (missing {missing[0]}): an encoder without one "
                           "can be fine-tuned with a task head, not asked to fill in masks")
    state = hf_to_lmforge(config, hf_state)
    state.update({ours: hf_state[theirs] for ours, theirs in HEAD_NAMES.items()})
    model = MaskedLM(config)
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()
