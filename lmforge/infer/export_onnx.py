"""Export a causal LM to ONNX with its KV cache as graph inputs and outputs, and decode with onnxruntime.

An ONNX graph is a pure function: it cannot keep lmforge's preallocated `KVCache` between
calls. So the exported decoder takes the cache in and hands it back out, the layout
Hugging Face's optimum and onnxruntime-genai use:

    inputs   input_ids       int64 [batch, seq]
             attention_mask  int64 [batch, past_seq + seq]   1 = real token, 0 = padding
             position_ids    int64 [batch, seq]
             past_key_{i}, past_value_{i}   float32 [batch, kv_heads, past_seq, head_dim]  (every layer i)
    outputs  logits          float32 [batch, seq, vocab]
             present_key_{i}, present_value_{i}   [batch, kv_heads, past_seq + seq, head_dim]

Prefill passes an empty past (past_seq = 0); each decode step passes one token and the
previous step's presents. batch, seq and past_seq are dynamic axes.

`DecoderWithPast` is the function exported: the model's own modules (embeddings, fused
q/k/v and MLP projections, norms, rotary `apply_rotary`, head) applied in the same order
as `Transformer.forward`, with attention that concatenates past and new keys instead of
writing into a preallocated cache, and an explicit boolean mask (causal, padding and
sliding window), because an exported graph must not branch on Python-side state such as
"is this a decode step". Grouped-query attention repeats each key/value head for its
query heads inside the graph, so the cache holds only kv_heads.

Exporter: torch.onnx.export (TorchScript tracing, opset 17: every operator used here is
standard in opset 17, which onnxruntime >= 1.14 runs). Weights larger than a few KB go
to an external-data file beside the graph (``model.onnx.data``), so models over
protobuf's 2 GB limit export the same way as tiny ones.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import LmforgeError
from ..io.atomic import atomic_directory
from ..model.config import ModelConfig
from ..model.rope import apply_rotary

OPSET = 17
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
META_FILE = "lmforge_onnx.json"


def check_exportable(config: ModelConfig) -> None:
    if not config.causal or not config.lm_head:
        raise LmforgeError("ONNX export covers causal language models (this model is an encoder)")
    if config.norm_position != "pre":
        raise LmforgeError("ONNX export covers pre-norm decoders")


class DecoderWithPast(nn.Module):
    """A `Transformer` as the pure function (ids, mask, positions, past) -> (logits, present)."""

    def __init__(self, model) -> None:
        super().__init__()
        check_exportable(model.config)
        self.model = model
        self.config = model.config

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        # cos/sin computed from positions inside the graph (no table sized to a maximum length),
        # with the same float32 arithmetic as RotaryTable._build.
        angles = position_ids.to(torch.float32).unsqueeze(-1) * self.model.rope.inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)  # [B, 1, L, head_dim]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(norm, nn.RMSNorm):
            # Written out: opset 17 has no RMSNormalization (it arrived in opset 23), and the
            # tracing exporter has no translation for aten::rms_norm.
            eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight
        return norm(x)  # LayerNorm exports as LayerNormalization

    def forward(self, input_ids, attention_mask, position_ids, *past):
        config, model = self.config, self.model
        batch, length = input_ids.shape
        x = model.embed(input_ids)
        rope = None
        if model.rope is None:
            x = x + model.pos_embed(position_ids)
        else:
            rope = self._rope(position_ids, x.dtype)
        # Keys are cache slots 0..total-1; the new queries are the last `length` of them.
        total = attention_mask.shape[1]
        key_slot = torch.arange(total, device=x.device)
        query_slot = key_slot[total - length:].unsqueeze(-1)  # [L, 1]
        allowed = key_slot <= query_slot
        if config.sliding_window is not None:
            allowed = allowed & (key_slot > query_slot - config.sliding_window)
        mask = allowed.unsqueeze(0) & attention_mask.bool().view(batch, 1, total)
        # A fully masked row (a padded query) would give NaN; let it see itself instead.
        mask = (mask | (key_slot == query_slot).unsqueeze(0)).unsqueeze(1)  # [B, 1, L, total]
        group = config.n_head // config.n_kv_head
        presents = []
        for i, block in enumerate(model.layers):
            attn = block.attn
            h = self._norm(block.attn_norm, x)
            qkv = attn.qkv(h).view(batch, length, config.n_head + 2 * config.n_kv_head, config.head_dim).transpose(1, 2)
            q, k, v = qkv.split((config.n_head, config.n_kv_head, config.n_kv_head), dim=1)
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            k = torch.cat((past[2 * i], k), dim=2)
            v = torch.cat((past[2 * i + 1], v), dim=2)
            presents += [k, v]
            if group > 1:
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scores = torch.matmul(q, k.transpose(-1, -2)) * (config.head_dim ** -0.5)
            scores = scores.masked_fill(~mask, float("-inf"))
            y = torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(batch, length, config.q_size)
            x = x + attn.out(y)
            x = x + block.mlp(self._norm(block.mlp_norm, x))
        return (model.lm_head(self._norm(model.norm, x)), *presents)


def input_names(config: ModelConfig) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(config.n_layer):
        names += [f"past_key_{i}", f"past_value_{i}"]
    return names


def output_names(config: ModelConfig) -> list[str]:
    names = ["logits"]
    for i in range(config.n_layer):
        names += [f"present_key_{i}", f"present_value_{i}"]
    return names


def _dynamic_axes(config: ModelConfig) -> dict[str, dict[int, str]]:
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total_seq"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    for i in range(config.n_layer):
        for kind in ("key", "value"):
            axes[f"past_{kind}_{i}"] = {0: "batch", 2: "past_seq"}
            axes[f"present_{kind}_{i}"] = {0: "batch", 2: "total_seq"}
    return axes


@dataclass
class OnnxExport:
    directory: Path
    graph: Path
    opset: int
    config: ModelConfig
    seconds: float


def export_onnx(model, out: str | Path, tokenizer=None, overwrite: bool = False, progress=None) -> OnnxExport:
    """Write `model` as ``OUT/model.onnx`` (+ ``model.onnx.data``, ``lmforge_onnx.json``, the tokenizer).

    The directory appears whole or not at all (it is built beside OUT and renamed).
    """
    import onnx

    config = model.config
    check_exportable(config)
    out = Path(out)
    if out.exists() and not overwrite:
        raise LmforgeError(f"{out} already exists (choose another path or pass --overwrite)")
    # Exported in float32, the numerics onnxruntime's CPU kernels run; a copy, so the caller's model keeps its dtype.
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float()
    model = model.eval()
    wrapper = DecoderWithPast(model).eval()
    # Example inputs: batch 2, 3 new tokens after 2 cached ones (no axis of size 0 or 1 to
    # be mistaken for a constant by the tracer).
    batch, past_len, length = 2, 2, 3
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, past_len + length, dtype=torch.int64)
    positions = torch.arange(past_len, past_len + length).expand(batch, length).contiguous()
    past = [torch.zeros(batch, config.n_kv_head, past_len, config.head_dim) for _ in range(2 * config.n_layer)]
    started = time.perf_counter()
    with atomic_directory(out) as staging:
        graph = staging / GRAPH_FILE
        if progress is not None:
            progress(0, 3)
        with torch.no_grad():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about Python ints in shapes
                torch.onnx.export(
                    wrapper, (ids, mask, positions, *past), str(graph), dynamo=False, opset_version=OPSET,
                    input_names=input_names(config), output_names=output_names(config),
                    dynamic_axes=_dynamic_axes(config), do_constant_folding=True,
                )
        if progress is not None:
            progress(1, 3)
        proto = onnx.load(str(graph))  # pulls any external data the exporter wrote into memory
        if config.tie_word_embeddings:
            _share_tied_head(proto, config)
        for stray in staging.iterdir():
            if stray.name != GRAPH_FILE:
                stray.unlink()
        onnx.save_model(proto, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
        del proto
        onnx.checker.check_model(str(graph))  # by path: works past the 2 GB in-memory limit
        meta = {"format": "lmforge-onnx-decoder", "opset": OPSET, "config": config.to_dict(),
                "inputs": input_names(config), "outputs": output_names(config)}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(staging)
        if progress is not None:
            progress(3, 3)
    return OnnxExport(out, out / GRAPH_FILE, OPSET, config, time.perf_counter() - started)


def _share_tied_head(proto, config: ModelConfig) -> None:
    """Store a tied head once: the exporter folds the head's transpose of the embedding into a
    second [n_embd, vocab] constant (113 MB for the default model). Replace that constant by a
    Transpose node of the embedding; onnxruntime folds it at session start, in memory only."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    by_name = {t.name: t for t in graph.initializer}
    embed = by_name.get("model.embed.weight")
    if embed is None:
        return
    embed_t = numpy_helper.to_array(embed).T
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in by_name:
            continue
        folded = by_name[node.input[1]]
        if list(folded.dims) != [config.n_embd, config.vocab_size] or not np.array_equal(
                numpy_helper.to_array(folded), embed_t):
            continue
        graph.initializer.remove(folded)
        transpose = helper.make_node("Transpose", ["model.embed.weight"], ["lm_head_weight_t"], perm=[1, 0],
                                     name="tied_lm_head_transpose")
        graph.node.insert(list(graph.node).index(node), transpose)
        node.input[1] = "lm_head_weight_t"
        return


class OnnxRunner:
    """Greedy decoding with an exported decoder in onnxruntime, feeding each step's presents back as the past."""

    def __init__(self, directory: str | Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file() or not (directory / GRAPH_FILE).is_file():
            raise LmforgeError(f"{directory} is not an lmforge ONNX export (needs {GRAPH_FILE} and {META_FILE})")
        import onnxruntime as ort

        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        self.config = ModelConfig.from_dict(meta["config"])
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # onnxruntime's pool threads spin-wait between runs by default, which takes the CPU away
        # from everything else in the process (the tokenizer, a torch model beside it) and from
        # other processes on shared machines; they sleep instead.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(directory / GRAPH_FILE), options,
                                            providers=providers or ["CPUExecutionProvider"])
        self.outputs = output_names(self.config)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        c = self.config
        return [np.zeros((batch, c.n_kv_head, 0, c.head_dim), np.float32) for _ in range(2 * c.n_layer)]

    def forward(self, input_ids: np.ndarray, past: list[np.ndarray], attention_mask: np.ndarray | None = None,
                position_ids: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call of the graph: logits [B, L, V] and the presents to pass as the next past."""
        input_ids = np.asarray(input_ids, np.int64)
        batch, length = input_ids.shape
        past_len = past[0].shape[2]
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + length), np.int64)
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(past_len, past_len + length, dtype=np.int64), (batch, length))
        feed: dict[str, Any] = {"input_ids": input_ids, "attention_mask": np.asarray(attention_mask, np.int64),
                                "position_ids": np.ascontiguousarray(position_ids, np.int64)}
        for i in range(self.config.n_layer):
            feed[f"past_key_{i}"], feed[f"past_value_{i}"] = past[2 * i], past[2 * i + 1]
        logits, *present = self.session.run(self.outputs, feed)
        return logits, present

    def generate(self, prompt: list[int], max_new_tokens: int, stop_ids: set[int] | None = None) -> list[int]:
        """Greedy continuation of one prompt (token ids), at most `max_new_tokens` tokens."""
        if not prompt:
            raise LmforgeError("empty prompt")
        limit = self.config.max_position_embeddings
        if len(prompt) + max_new_tokens > limit:
            raise LmforgeError(f"prompt of {len(prompt)} tokens plus {max_new_tokens} new ones exceeds the "
                               f"model's {limit} positions")
        started = time.perf_counter()
        logits, past = self.forward(np.asarray([prompt]), self.empty_past(1))
        first = time.perf_counter()
        out: list[int] = []
        while len(out) < max_new_tokens:
            token = int(logits[0, -1].argmax())
            out.append(token)
            if stop_ids and token in stop_ids or len(out) == max_new_tokens:
                break
            logits, past = self.forward(np.asarray([[token]]), past)
        # As the engine's Completion reports them: to the first token, then to the last.
        self.prefill_seconds, self.decode_seconds = first - started, time.perf_counter() - first
        return out
