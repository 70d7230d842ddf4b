"""Task heads (F2): one Transformer body with a small classifier on top, for both families.

A language model ends in a vocabulary head; a *task head* replaces it with a linear map to
a handful of labels. Two shapes cover most task fine-tuning:

- **sequence classification** (sentiment, topic, intent): one vector per text, then
  ``logits = W h + b`` over the classes. Which vector is the *pooling*:
    - a decoder reads left to right, so only its last real token has seen the whole text
      ("last"; Hugging Face's ``LlamaForSequenceClassification`` takes the rightmost
      token that is not the pad token and has no bias on ``score``);
    - an encoder sees the whole text at every position; BERT's classifier reads the
      [CLS] vector through a ``tanh(dense(.))`` *pooler* ("cls", as
      ``BertForSequenceClassification``), sentence-embedding models average the tokens
      ("mean": lmforge only; transformers has no mean-pooling classifier, so a saved
      mean-pooled model is marked in config.json and transformers would score it with
      its [CLS] rule instead).
- **token classification** (named entities, part of speech): per-token logits
  ``W h_t + b`` (``BertForTokenClassification.classifier``,
  ``LlamaForTokenClassification.score``, both with a bias).

`ClassifierModel` holds the body (lmforge's one `Transformer`, built with no vocabulary
head) and the head; `save_classifier` / `load_classifier` read and write Hugging Face
directories in those layouts (``bert.*`` + ``classifier`` for BERT, ``model.*`` +
``score`` for Llama-style decoders), so ``AutoModelForSequenceClassification`` and
``AutoModelForTokenClassification`` load them as they are. The reward model of
lmforge/align/reward.py is the one-output decoder case of the same layout.

Losses: cross-entropy with optional per-class weights (imbalance) and the focal loss
``-(1 - p_t)^gamma log p_t`` (Lin et al., 2017), which lowers the weight of examples
already classified confidently; gamma = 0 is plain cross-entropy. -100 marks targets
that carry no loss (special tokens, continuation word pieces, padding).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.io.atomic import atomic_directory

TASKS = ("sequence", "token")
POOLINGS = ("auto", "last", "cls", "mean")
IGNORE_INDEX = -100
_MEAN_POOLING_KEY = "lmforge_pooling"  # config.json marker of a pooling transformers cannot reproduce


def default_pooling(config) -> str:
    """"last" for a decoder, "cls" for an encoder (what transformers' classifiers do)."""
    return "last" if config.causal else "cls"


class ClassifierModel(nn.Module):
    """``forward(input_ids, attention_mask)`` -> logits [B, C] (sequence) or [B, L, C] (token).

    Rows are right-padded; ``attention_mask`` is 1 on real tokens (None: no padding).
    """

    def __init__(self, backbone: nn.Module, labels: Sequence[str], task: str = "sequence", pooling: str = "auto",
                 dropout: float = 0.1, pad_token_id: int | None = None, init_std: float = 0.02) -> None:
        super().__init__()
        if task not in TASKS:
            raise LmforgeError(f"unknown head task {task!r} (choose {', '.join(TASKS)})")
        if pooling not in POOLINGS:
            raise LmforgeError(f"unknown pooling {pooling!r} (choose {', '.join(POOLINGS)})")
        if len(labels) < 1 or len(set(labels)) != len(labels):
            raise LmforgeError("a classifier needs at least one label, each named once")
        config = backbone.config
        if config.lm_head:
            raise LmforgeError("the body of a classifier has no vocabulary head: build it with backbone_of(model)")
        pooling = default_pooling(config) if pooling == "auto" else pooling
        if task == "sequence" and pooling == "cls" and config.causal:
            raise LmforgeError("a decoder's first token has seen nothing after it: pool with 'last' or 'mean'")
        self.backbone, self.task, self.pooling = backbone, task, pooling
        self.labels = list(labels)
        self.pad_token_id = pad_token_id
        width = config.n_embd
        # BERT's [CLS] classifier reads the pooler's tanh(dense(h_cls)), as transformers does.
        self.pooler = nn.Linear(width, width) if (task == "sequence" and pooling == "cls") else None
        self.dropout = nn.Dropout(dropout)
        # A decoder's sequence head has no bias in transformers' layout (score.weight only).
        self.score = nn.Linear(width, len(self.labels), bias=not (task == "sequence" and config.causal))
        nn.init.normal_(self.score.weight, std=init_std)
        if self.score.bias is not None:
            nn.init.zeros_(self.score.bias)
        if self.pooler is not None:
            nn.init.normal_(self.pooler.weight, std=0.02)
            nn.init.zeros_(self.pooler.bias)

    @property
    def config(self):
        return self.backbone.config

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """One vector per row of hidden states [B, L, D]."""
        batch, width = hidden.shape[:2]
        mask = attention_mask if attention_mask is not None else \
            torch.ones(batch, width, dtype=torch.long, device=hidden.device)
        if self.pooling == "last":
            lengths = mask.long().sum(1)
            if bool((lengths < 1).any()):
                raise LmforgeError("every row needs at least one real token")
            return hidden[torch.arange(batch, device=hidden.device), lengths - 1]
        if self.pooling == "mean":
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return torch.tanh(self.pooler(hidden[:, 0]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.backbone.encode(input_ids, attention_mask)
        if self.task == "sequence":
            hidden = self.pool(hidden, attention_mask)
        return self.score(self.dropout(hidden)).float()


# ---- building -----------------------------------------------------------------------------------

def backbone_of(model: nn.Module) -> nn.Module:
    """The body of a loaded model as a `Transformer` without a vocabulary head (same weights,
    copied; the model itself is left as it is)."""
    from lmforge.model.checkpoint import build_model

    if not model.config.lm_head:
        return model
    config = dataclasses.replace(model.config, lm_head=False)
    parameter = next(model.parameters())
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    return build_model(config, state, parameter.dtype, parameter.device)


def classifier_from_model(model: nn.Module, labels: Sequence[str], task: str = "sequence", pooling: str = "auto",
                          dropout: float = 0.1, pad_token_id: int | None = None, seed: int = 0,
                          pooler_state: dict[str, torch.Tensor] | None = None) -> ClassifierModel:
    """A classifier on the body of ``model`` (a causal LM or an encoder); the head is drawn
    from ``seed`` without touching the global random state. ``pooler_state`` (``weight``,
    ``bias``) starts BERT's [CLS] pooler from a checkpoint's pretrained one."""
    body = backbone_of(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = ClassifierModel(body, labels, task, pooling, dropout, pad_token_id)
    if pooler_state and classifier.pooler is not None:
        classifier.pooler.load_state_dict({k: v.to(classifier.pooler.weight.dtype) for k, v in pooler_state.items()})
    return classifier.to(next(body.parameters()).device)


def pretrained_pooler(directory: str | Path) -> dict[str, torch.Tensor] | None:
    """A BERT checkpoint's pooler (``pooler.dense.*``), which BertForSequenceClassification reuses."""
    from lmforge.model.checkpoint import read_safetensors

    directory = Path(directory)
    if not directory.is_dir():
        return None
    state = read_safetensors(directory)
    for prefix in ("bert.pooler.dense.", "pooler.dense."):
        if prefix + "weight" in state:
            return {"weight": state[prefix + "weight"], "bias": state[prefix + "bias"]}
    return None


def language_model_of(classifier: ClassifierModel, original: nn.Module) -> nn.Module:
    """The body of a (fine-tuned) decoder classifier under the vocabulary head of ``original``
    (with tied embeddings: the body's own embeddings), to measure what it still knows about text."""
    from lmforge.model.checkpoint import build_model

    config = dataclasses.replace(classifier.config, lm_head=True)
    if config.causal is False:
        raise LmforgeError("an encoder has no vocabulary head to score text with")
    state = dict(classifier.backbone.state_dict())
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = original.lm_head.weight.detach()
    parameter = next(classifier.parameters())
    return build_model(config, state, parameter.dtype, parameter.device)


# ---- losses -------------------------------------------------------------------------------------

def classification_loss(logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None = None,
                        focal_gamma: float = 0.0, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy (gamma 0) or focal loss of logits [..., C] against targets [...] (-100:
    none), each target's term scaled by its class weight; summed over the counted targets or
    their mean (``reduction``)."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    logits = logits.reshape(-1, logits.shape[-1]).float()
    targets = targets.reshape(-1)
    keep = targets != IGNORE_INDEX
    logits, targets = logits[keep], targets[keep]
    logp = F.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    terms = -logp
    if focal_gamma:
        terms = terms * (1.0 - logp.exp()).clamp(min=0.0) ** focal_gamma
    if class_weights is not None:
        terms = terms * class_weights.to(terms.device, terms.dtype)[targets]
    total = terms.sum()
    return total if reduction == "sum" else total / max(1, int(keep.sum()))


def balanced_class_weights(counts: Sequence[int]) -> list[float]:
    """n / (C * n_c) per class (scikit-learn's "balanced"): rare classes weigh more; a class
    that never occurs gets weight 0."""
    total, k = sum(counts), len(counts)
    return [total / (k * c) if c else 0.0 for c in counts]


# ---- Hugging Face directories -------------------------------------------------------------------

def hf_head_architecture(config, task: str) -> str:
    """transformers' class for this family and head ("LlamaForTokenClassification", ...)."""
    from lmforge.model.families import FAMILIES

    arch = FAMILIES[config.family].hf_architecture
    suffix = "ForSequenceClassification" if task == "sequence" else "ForTokenClassification"
    if arch.endswith("ForCausalLM"):
        return arch.removesuffix("ForCausalLM") + suffix
    if arch == "GPT2LMHeadModel":
        return "GPT2" + suffix
    if arch == "BertModel":
        return "Bert" + suffix
    raise LmforgeError(f"no {task}-classification layout for the {config.family} family")


def _head_names(config, task: str) -> tuple[str, str, str]:
    """(prefix of the body's weights, head name, pooler name) in transformers' layout."""
    if config.family == "bert":
        return "bert.", "classifier", "bert.pooler.dense"
    if config.family == "gpt2" and task == "token":
        return "", "classifier", ""
    return "", "score", ""


def save_classifier(model: ClassifierModel, directory: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a Hugging Face sequence- or token-classification directory, atomically."""
    from safetensors.torch import save_file

    from lmforge.model.families import hf_config_from, lmforge_to_hf

    target = Path(directory)
    if target.exists() and not overwrite:
        raise LmforgeError(f"{target} already exists (choose another path or remove it)")
    config = model.config
    prefix, head, pooler = _head_names(config, model.task)
    body = {k: v.detach().to("cpu").contiguous() for k, v in model.backbone.state_dict().items()}
    state = {prefix + k: v for k, v in lmforge_to_hf(config, body).items() if k != "lm_head.weight"}
    for name, module in ((head, model.score), (pooler, model.pooler)):
        if module is not None:
            state[f"{name}.weight"] = module.weight.detach().to("cpu").contiguous()
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach().to("cpu").contiguous()
    hf = hf_config_from(config)
    hf.update(architectures=[hf_head_architecture(config, model.task)], num_labels=model.num_labels,
              id2label={str(i): name for i, name in enumerate(model.labels)},
              label2id={name: i for i, name in enumerate(model.labels)},
              torch_dtype=str(model.score.weight.dtype).removeprefix("torch."),
              classifier_dropout=model.dropout.p)
    if model.pad_token_id is not None:
        hf["pad_token_id"] = model.pad_token_id
    if model.task == "sequence" and model.pooling != default_pooling(config):
        hf[_MEAN_POOLING_KEY] = model.pooling
    with atomic_directory(target) as staging:
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(staging)
    return target


def load_classifier(directory: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> ClassifierModel:
    """A classification directory that `save_classifier` or transformers wrote."""
    from lmforge.model.checkpoint import build_model, read_hf_config, read_safetensors
    from lmforge.model.families import hf_to_lmforge

    directory = Path(directory)
    config = dataclasses.replace(read_hf_config(directory), lm_head=False)
    hf = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    arch = (hf.get("architectures") or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        task = "sequence"
    elif arch.endswith("ForTokenClassification"):
        task = "token"
    else:
        raise LmforgeError(f"{directory} is not a classifier (architecture {arch or 'unknown'}; expected "
                           "...ForSequenceClassification or ...ForTokenClassification)")
    _, head, pooler = _head_names(config, task)
    state = read_safetensors(directory)
    weights = {k: state.pop(k) for k in list(state) if k.startswith(head + ".")}
    pooled = {k.rsplit(".", 1)[1]: state.pop(k) for k in list(state) if pooler and k.startswith(pooler + ".")}
    if f"{head}.weight" not in weights:
        raise LmforgeError(f"{directory} has no {head}.weight (the classification head)")
    n = weights[f"{head}.weight"].shape[0]
    id2label = hf.get("id2label") or {}
    labels = [str(id2label.get(str(i), f"LABEL_{i}")) for i in range(n)]
    pooling = hf.get(_MEAN_POOLING_KEY, "auto") if task == "sequence" else "auto"
    dropout = float(hf.get("classifier_dropout") or 0.1)
    with torch.device("meta"):
        model = ClassifierModel(_MetaBody(config), labels, task, pooling, dropout, hf.get("pad_token_id"))
    if model.pooler is not None and not pooled:
        raise LmforgeError(f"{directory} has no {pooler}.* weights ([CLS] pooler of a BERT classifier)")
    model.backbone = build_model(config, hf_to_lmforge(config, state), dtype, device)
    model.score = nn.Linear(config.n_embd, n, bias=f"{head}.bias" in weights, device=device, dtype=dtype)
    with torch.no_grad():
        model.score.weight.copy_(weights[f"{head}.weight"])
        if model.score.bias is not None:
            model.score.bias.copy_(weights[f"{head}.bias"])
    if model.pooler is not None:
        model.pooler = nn.Linear(config.n_embd, config.n_embd, device=device, dtype=dtype)
        model.pooler.load_state_dict(pooled)
    return model.eval()


class _MetaBody(nn.Module):
    """A stand-in body that only carries a config (the real one is built from the weights)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
