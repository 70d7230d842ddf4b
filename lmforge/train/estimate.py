"""Memory and compute a training run will need, from the model's shape alone (P7, P8).

Pure arithmetic on a `ModelConfig`: nothing here imports torch, so the estimate answers
before any weights are read. Every figure is a formula written out below, and
`tests/test_train_estimate.py` checks the parameter count against a real `Transformer`
and the activation bytes against what autograd actually saves.

Activation bytes per token and per layer (lmforge `Block`, no dropout, B*L tokens,
d = n_embd, q = n_head*head_dim, kv = n_kv_head*head_dim, f = intermediate_size,
H = n_head) - the tensors autograd keeps for the backward pass:

  attention half                         feed-forward half
  norm: input x, x*rstd (d each), rstd    norm: the same, 2d + 1
        (2d + 1; LayerNorm: d + 2)        fc input: d
  qkv input: d                            SwiGLU: fc output 2f (gate and up), silu(gate)
  qkv output: q + 2kv (v is read from it)         f, product f (proj input): 4f
  rotated q and k: q + kv (RoPE only)     GELU: fc output f, gelu output f: 2f
  SDPA output: q (also the out-proj input)
  SDPA log-sum-exp: H (always float32)
  eager attention instead of SDPA adds the score and probability matrices,
  2 * H * L per token, and keeps no log-sum-exp.

RoPE keeps only its cos/sin tables (shared constants), and the residual additions keep
nothing. With activation checkpointing each block keeps only its input (d per token),
and the backward pass rebuilds one block at a time, so the peak is n_layer*d plus one
block's full set. The output layer keeps the final norm (2d + 1), the head's input (d),
the logits (V, held by the caller for the loss) and the log-softmax (V, float32 in
PyTorch's cross-entropy when the logits are float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
OPTIMIZERS = ("adamw", "sgd")
ATTENTIONS = ("sdpa", "eager")

# Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models"), approach 3:
# L(N, D) = E + A / N^alpha + B / D^beta, fitted on their Chinchilla runs (loss in nats).
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
TOKENS_PER_PARAM = 20  # the rule of thumb that follows from their approaches 1 and 2


def dtype_bytes(name: str) -> int:
    try:
        return DTYPE_BYTES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of float32, bfloat16, float16") from None


@dataclass
class TrainSetup:
    """What a training step looks like; every field is a CLI flag of `lmforge estimate`."""

    batch_size: int = 8
    seq_len: int = 1024
    weight_dtype: str = "float32"
    grad_dtype: str | None = None  # None: same as the weights
    optimizer_dtype: str = "float32"
    activation_dtype: str | None = None  # None: same as the weights
    optimizer: str = "adamw"
    checkpointing: bool = False
    attention: str = "sdpa"
    tokens: int | None = None  # training tokens D; None: the Chinchilla budget, 20 per parameter

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError(f"batch size and sequence length must be positive, got {self.batch_size} and {self.seq_len}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError(f"token count must be positive, got {self.tokens}")
        for name in (self.weight_dtype, self.grad_dtype, self.optimizer_dtype, self.activation_dtype):
            if name is not None:
                dtype_bytes(name)


def layer_activation_elements(config, seq_len: int, attention: str = "sdpa") -> dict[str, int]:
    """Elements saved for backward per token by one block, split into parts; 'lse' is float32."""
    d, q, kv, f, h = config.n_embd, config.q_size, config.kv_size, config.intermediate_size, config.n_head
    # RMSNorm's training function keeps its input and one reciprocal RMS per token; LayerNorm
    # its input, mean and rstd. SwiGLU's keeps [gate | up] and the product the down projection reads.
    norm = d + 1 if config.norm == "rmsnorm" else d + 2
    rotated = q + kv if config.position == "rope" else 0  # learned positions: q and k stay views of qkv
    attn = norm + d + (q + 2 * kv) + rotated + q
    mlp = norm + d + (3 * f if config.mlp == "swiglu" else 2 * f)
    out = {"attention": attn, "mlp": mlp, "lse": 0, "scores": 0}
    if attention == "sdpa":
        out["lse"] = h
    else:
        out["scores"] = 2 * h * seq_len
    return out


def activation_bytes(config, setup: TrainSetup) -> dict[str, int]:
    """Bytes kept alive between forward and backward, for the whole batch."""
    tokens = setup.batch_size * setup.seq_len
    act = dtype_bytes(setup.activation_dtype or setup.weight_dtype)
    parts = layer_activation_elements(config, setup.seq_len, setup.attention)
    per_layer = tokens * ((parts["attention"] + parts["mlp"] + parts["scores"]) * act + parts["lse"] * 4)
    d, v = config.n_embd, config.vocab_size
    norm = d + 1 if config.norm == "rmsnorm" else d + 2
    # ids and targets (int64), final norm, head input, logits, log-softmax (float32).
    output = tokens * (16 + (norm + d + v) * act + v * 4)
    if config.position == "learned":
        output += 8 * setup.seq_len  # the position ids, shared by the batch
    if setup.checkpointing:
        stored = config.n_layer * tokens * d * act
        layers = stored + per_layer  # one block rebuilt during backward
    else:
        stored = layers = config.n_layer * per_layer
    return {"per_layer": per_layer, "layers": layers, "checkpoint_inputs": stored if setup.checkpointing else 0,
            "output": output, "total": layers + output}


def matmul_parameters(config) -> int:
    """Parameters that take part in a matrix product per token (the embedding lookup does not)."""
    n = config.num_parameters()
    if not config.tie_word_embeddings:
        n -= config.vocab_size * config.n_embd
    if config.position == "learned":
        n -= config.max_position_embeddings * config.n_embd
    return n


def training_flops_per_token(config, seq_len: int) -> dict[str, int]:
    """Forward + backward FLOPs per token: 6 N for the weights, 12 n_layer L q for attention.

    Each weight does one multiply-add (2 FLOPs) per token forward and two backward (input
    and weight gradients): 6 N. Attention scores q.k and the weighted sum of v are each
    2 L q FLOPs per token forward (counting the full L x L matrix, as the papers do;
    a causal kernel skips about half), times 3 for forward + backward: 12 L q per layer.
    """
    weights = 6 * matmul_parameters(config)
    attention = 12 * config.n_layer * seq_len * config.q_size
    return {"weights": weights, "attention": attention, "total": weights + attention}


def chinchilla_loss(n_params: float, tokens: float) -> float:
    c = CHINCHILLA
    return c["E"] + c["A"] / n_params ** c["alpha"] + c["B"] / tokens ** c["beta"]


def chinchilla_optimal(compute: float) -> dict[str, float]:
    """N and D minimising the fitted L(N, D) under C = 6 N D (closed form of the fitted law)."""
    c = CHINCHILLA
    a, b = c["alpha"], c["beta"]
    g = (a * c["A"] / (b * c["B"])) ** (1 / (a + b))
    n = g * (compute / 6) ** (b / (a + b))
    d = (compute / 6) / n
    return {"params": n, "tokens": d, "loss": chinchilla_loss(n, d)}


def estimate(config, setup: TrainSetup) -> dict[str, Any]:
    """The whole report as a JSON-ready dict (bytes, FLOPs, tokens)."""
    n = config.num_parameters()
    wb = dtype_bytes(setup.weight_dtype)
    gb = dtype_bytes(setup.grad_dtype or setup.weight_dtype)
    ob = dtype_bytes(setup.optimizer_dtype)
    states = 2 if setup.optimizer == "adamw" else 0  # AdamW: first and second moments; plain SGD: none
    master = 4 * n if wb != 4 else 0  # mixed precision keeps an fp32 copy for the update
    memory = {
        "weights": n * wb,
        "gradients": n * gb,
        "optimizer_states": states * n * ob,
        "master_weights": master,
    }
    acts = activation_bytes(config, setup)
    memory["activations"] = acts["total"]
    memory["total"] = sum(memory.values())
    flops = training_flops_per_token(config, setup.seq_len)
    tokens = setup.tokens or TOKENS_PER_PARAM * n
    compute = flops["total"] * tokens
    return {
        "parameters": n,
        "setup": {**setup.__dict__, "tokens": tokens},
        "memory_bytes": memory,
        "activation_detail": acts,
        "flops_per_token": flops,
        "training_flops": compute,
        "chinchilla": {
            "tokens_per_param_rule": TOKENS_PER_PARAM,
            "optimal_tokens_rule": TOKENS_PER_PARAM * n,
            "fitted_law": dict(CHINCHILLA),
            "predicted_loss": chinchilla_loss(n, tokens),
            "optimal_for_compute": chinchilla_optimal(6 * n * tokens),
        },
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def format_report(report: dict[str, Any]) -> str:
    s, m = report["setup"], report["memory_bytes"]
    lines = [
        f"parameters            {report['parameters']:,}",
        f"batch x sequence      {s['batch_size']} x {s['seq_len']}  weights {s['weight_dtype']}, optimizer {s['optimizer']}"
        f" ({s['optimizer_dtype']}), attention {s['attention']}, checkpointing {'on' if s['checkpointing'] else 'off'}",
        "",
        "memory",
    ]
    for key in ("weights", "gradients", "optimizer_states", "master_weights", "activations", "total"):
        lines.append(f"  {key.replace('_', ' '):<20}{human_bytes(m[key]):>14}")
    f = report["flops_per_token"]
    c = report["chinchilla"]
    opt = c["optimal_for_compute"]
    lines += [
        "",
        "compute",
        f"  FLOPs per token     {f['total']:.4g}  (6N = {f['weights']:.4g}, attention 12*n_layer*L*q = {f['attention']:.4g})",
        f"  training tokens D   {s['tokens']:.4g}",
        f"  training FLOPs      {report['training_flops']:.4g}",
        "",
        "Chinchilla",
        f"  20 tokens/param     {c['optimal_tokens_rule']:.4g} tokens",
        f"  fitted L(N, D)      {c['predicted_loss']:.3f} nats  (E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)",
        f"  optimal at 6ND      N={opt['params']:.4g}, D={opt['tokens']:.4g}, loss {opt['loss']:.3f}",
    ]
    return "\n".join(lines)
