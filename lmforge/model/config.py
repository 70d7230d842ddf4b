"""`ModelConfig`: every architectural choice of the one Transformer in lmforge.

A model family (GPT-2, Llama, Qwen2, Mistral, BERT) is nothing but a set of values for
these fields plus a map of weight names (see `families.py`). The model code in
`transformer.py` reads only this dataclass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
POSITIONS = ("rope", "learned")
NORM_POSITIONS = ("pre", "post")


@dataclass
class ModelConfig:
    """Shape and behaviour of a Transformer: a decoder (causal LM) or an encoder (BERT).

    Defaults describe a tiny Llama-style model, so `ModelConfig()` builds something that
    runs in milliseconds (useful for tests and for learning).
    """

    family: str = "llama"
    vocab_size: int = 256
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_kv_head: int | None = None  # None: same as n_head (plain multi-head attention)
    head_dim: int | None = None  # None: n_embd // n_head
    intermediate_size: int = 172
    max_position_embeddings: int = 2048
    # Normalization (M5): RMSNorm (Llama) or LayerNorm with bias (GPT-2, BERT).
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    # Feed-forward (M4): SwiGLU (gate * silu, Llama) or a 2-layer GELU MLP (GPT-2).
    mlp: str = "swiglu"
    gelu_approximate: str = "tanh"  # GPT-2's "gelu_new" is the tanh approximation
    # Positions (M3): rotary embeddings applied to q/k, or a learned absolute table.
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear", ...}
    # Biases: Qwen2 has q/k/v biases only; GPT-2 has biases everywhere.
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # Mistral-style sliding-window attention: each query sees at most this many keys.
    sliding_window: int | None = None
    # Token ids the checkpoint declares (kept for round-tripping config.json).
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Encoders (BERT family). A decoder attends causally, normalizes before each sublayer
    # ("pre", then one final norm) and ends in a vocabulary head. An encoder attends in both
    # directions (only padding is masked), normalizes after each residual add ("post", so no
    # final norm), adds token-type (segment) embeddings, normalizes the summed embeddings,
    # and for sentence embeddings needs no head at all.
    causal: bool = True
    norm_position: str = "pre"
    type_vocab_size: int = 0  # rows of the token-type table; 0: no token types
    embedding_norm: bool = False
    lm_head: bool = True  # False: the model returns hidden states only (see Transformer.encode)
    # Mixture of experts (M7, Mixtral): num_experts > 0 replaces every block's SwiGLU MLP with
    # that many SwiGLU experts of width intermediate_size, experts_per_token of them run per
    # token (see moe.py). The coefficients weight the router's auxiliary losses in training;
    # capacity_factor None routes every token (no dropping); jitter scales router inputs by
    # U(1-j, 1+j) in training (Mixtral's router_jitter_noise). router_aux_per_layer balances
    # each layer on its own instead of transformers' pool over layers (see moe.load_balancing_loss).
    num_experts: int = 0
    experts_per_token: int = 2
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    capacity_factor: float | None = None
    router_jitter_noise: float = 0.0
    router_aux_per_layer: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # unused HF keys, preserved on save

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.mlp not in MLPS:
            raise ValueError(f"mlp must be one of {MLPS}, got {self.mlp!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}")
        if self.type_vocab_size < 0:
            raise ValueError(f"type_vocab_size must be >= 0, got {self.type_vocab_size}")
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts and not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token must be between 1 and num_experts={self.num_experts}, "
                             f"got {self.experts_per_token}")
        if self.num_experts and self.mlp != "swiglu":
            raise ValueError("mixture-of-experts layers use SwiGLU experts (mlp='swiglu')")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {self.capacity_factor}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")

    @property
    def q_size(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_head * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**data)

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count computed from the shapes alone (tied head counted once). With
        `active`, a mixture of experts counts only the experts_per_token experts a token uses."""
        d, f = self.n_embd, self.intermediate_size
        norm_params = d * (2 if self.norm == "layernorm" else 1)
        attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        attn += (self.q_size + 2 * self.kv_size) if self.qkv_bias else 0
        attn += d if self.out_bias else 0
        n_in = 2 * f if self.mlp == "swiglu" else f
        mlp = d * n_in + f * d + ((n_in + d) if self.mlp_bias else 0)
        if self.num_experts:
            mlp = mlp * (self.experts_per_token if active else self.num_experts) + d * self.num_experts
        per_layer = attn + mlp + 2 * norm_params
        total = self.vocab_size * d + self.n_layer * per_layer
        total += norm_params if self.norm_position == "pre" else 0  # the final norm
        total += norm_params if self.embedding_norm else 0
        total += self.type_vocab_size * d
        if self.position == "learned":
            total += self.max_position_embeddings * d
        if self.lm_head and not self.tie_word_embeddings:
            total += self.vocab_size * d
        return total
