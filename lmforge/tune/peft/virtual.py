"""Prompt tuning and prefix tuning: learned vectors the real tokens attend to.

Prompt tuning (Lester et al., 2021) prepends P learned embedding rows to the input. Here
they are P extra rows of the embedding table, reached by ids vocab_size .. vocab_size+P-1
that `VirtualTokenModel` puts before every row; the outputs at those positions are dropped,
so callers see logits (and hidden states) for their own tokens only.

Prefix tuning (Li & Liang, 2021) gives every layer P learned key and value vectors per KV
head. They reach attention through the model's KV-cache interface: `PrefixCache.update`
returns the prefix concatenated before the new keys/values (no in-place writes, so
gradients flow), and the real tokens sit at positions P .. P+L-1, as in PEFT (the prefix
keys carry no rotary rotation).

Both keep the base model untouched; `VirtualTokenModel` forwards every other attribute to
it. They work on decoders through `forward` and `hidden_states`; generation with the
engine's own cache is not wired.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError


class VirtualEmbedding(nn.Module):
    """The base embedding table, plus `prompt` [P, D] rows for ids >= vocab_size."""

    def __init__(self, base: nn.Embedding, prompt: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.vocab_size = base.num_embeddings
        self.prompt_embeddings = nn.Parameter(prompt)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        virtual = ids >= self.vocab_size
        if not bool(virtual.any()):
            return self.base(ids)
        table = torch.cat([self.base.weight, self.prompt_embeddings])
        return F.embedding(ids, table)


class PrefixCache:
    """Duck-typed KV cache holding per-layer prefix keys/values [B, kv_heads, P, d]."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], max_len: int) -> None:
        self.keys, self.values, self.max_len = keys, values, max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start, end: int):
        return torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)


class VirtualTokenModel(nn.Module):
    """A decoder with a learned prompt or prefix; forward/hidden_states see only the real tokens."""

    def __init__(self, model: nn.Module, method: str, num_virtual_tokens: int, init: torch.Tensor | None = None) -> None:
        super().__init__()
        config = model.config
        if not config.causal or model.lm_head is None:
            raise LmforgeError(f"{method} tuning is implemented for decoder models; this {config.family} model is an encoder")
        if num_virtual_tokens < 1:
            raise LmforgeError(f"num_virtual_tokens must be at least 1, got {num_virtual_tokens}")
        self.model = model
        self.method = method
        self.num_virtual_tokens = n = num_virtual_tokens
        ref = model.embed.weight
        if method == "prompt":
            if init is None:
                # Rows of the embedding table itself: vectors of the right scale (PEFT's
                # default initializes from a random normal; either trains).
                g = torch.Generator().manual_seed(0)
                init = ref.detach()[torch.randint(0, ref.shape[0], (n,), generator=g)].clone()
            model.embed = VirtualEmbedding(model.embed, init.to(ref))
        elif method == "prefix":
            width = config.n_layer * 2 * config.kv_size
            if init is None:
                init = torch.randn(n, width, dtype=ref.dtype, device=ref.device)
            self.prompt_embeddings = nn.Parameter(init.to(ref))
        else:
            raise ValueError(method)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    @property
    def prompt(self) -> torch.Tensor:
        """The learned tensor PEFT saves as ``prompt_embeddings``."""
        return self.model.embed.prompt_embeddings if self.method == "prompt" else self.prompt_embeddings

    def prefix_cache(self, batch: int) -> PrefixCache:
        c = self.model.config
        n = self.num_virtual_tokens
        # [P, layers * 2 * kv_heads * d] -> per layer [B, kv_heads, P, d] (PEFT's layout: layer, k|v, head, dim).
        kv = self.prompt_embeddings.view(n, c.n_layer, 2, c.n_kv_head, c.head_dim).permute(1, 2, 3, 0, 4)
        keys = [kv[i, 0].unsqueeze(0).expand(batch, -1, -1, -1) for i in range(c.n_layer)]
        values = [kv[i, 1].unsqueeze(0).expand(batch, -1, -1, -1) for i in range(c.n_layer)]
        return PrefixCache(keys, values, n + c.max_position_embeddings)

    def _prompted(self, input_ids: torch.Tensor) -> torch.Tensor:
        n, vocab = self.num_virtual_tokens, self.model.embed.vocab_size
        virtual = torch.arange(vocab, vocab + n, device=input_ids.device).expand(input_ids.shape[0], n)
        return torch.cat([virtual, input_ids], dim=1)

    def forward(self, input_ids: torch.Tensor, cache=None, start=0, last_only: bool = False,
                select: torch.Tensor | None = None) -> torch.Tensor:
        if cache is not None or (isinstance(start, torch.Tensor) or start != 0):
            raise LmforgeError(f"{self.method}-tuned models run whole sequences (no KV cache yet); "
                               "merge-free adapters such as LoRA serve generation")
        return self.model.lm_head(self.hidden_states(input_ids, select=select, last_only=last_only))

    def hidden_states(self, input_ids: torch.Tensor, select: torch.Tensor | None = None,
                      last_only: bool = False) -> torch.Tensor:
        n = self.num_virtual_tokens
        if self.method == "prompt":
            x = self.model.hidden_states(self._prompted(input_ids))[:, n:]
        else:
            cache = self.prefix_cache(input_ids.shape[0])
            x = self.model.norm(self.model._residual_stream(input_ids, cache, n))
        if select is not None:
            return x[torch.arange(x.shape[0], device=x.device), select].unsqueeze(1)
        return x[:, -1:] if last_only else x

    def unwrap(self) -> nn.Module:
        """The base model, its embedding table restored."""
        if self.method == "prompt":
            self.model.embed = self.model.embed.base
        return self.model
