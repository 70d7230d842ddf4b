"""Pruning: which weights each method removes, and that structured pruning is exact surgery.

Unstructured and n:m masks are checked against direct computations of their rule. A
structured cut must compute exactly what the original model computes with the removed
MLP channels or head groups silenced (their outgoing weights zeroed), and the smaller
model must load in transformers with the same logits.
"""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB
from lmforge.errors import LmforgeError
from lmforge.infer.prune import (PruneOptions, apply_masks, input_norms, nm_masks, prunable_linears, prune,
                                 sparsity_of, unstructured_masks)
from lmforge.model.checkpoint import load_hf_model, save_hf_model


def calibration(n: int = 3, length: int = 24, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (2, length), generator=g) for _ in range(n)]


def test_magnitude_zeroes_the_smallest_weights_of_each_layer(tiny_hf_dirs):
    model = load_hf_model(tiny_hf_dirs["llama"][0])
    before = {name: layer.weight.detach().clone() for name, layer in prunable_linears(model).items()}
    zeros = apply_masks(model, unstructured_masks(model, 0.3))
    for name, layer in prunable_linears(model).items():
        w, k = before[name].abs().flatten(), int(before[name].numel() * 0.3)
        threshold = w.sort().values[k]
        assert zeros[name] == pytest.approx(k / w.numel(), abs=1e-6)
        assert (layer.weight.abs().flatten()[w > threshold] > 0).all()  # every larger weight survived
    assert sparsity_of(model) == pytest.approx(0.3, abs=1e-3)


def test_wanda_scores_weights_by_their_input_activations(tiny_hf_dirs):
    model = load_hf_model(tiny_hf_dirs["qwen2"][0])
    batches = calibration()
    norms = input_norms(model, batches)
    # The norms are those of the inputs each layer really sees: recompute one by hand.
    captured = []
    layer = prunable_linears(model)["layers.1.mlp.proj"]
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for ids in batches:
            model(ids)
    handle.remove()
    torch.testing.assert_close(norms["layers.1.mlp.proj"], torch.cat(captured).norm(dim=0), rtol=1e-5, atol=1e-6)

    masks = unstructured_masks(model, 0.5, norms)
    w = layer.weight.detach()
    score = w.abs() * norms["layers.1.mlp.proj"][None, :]
    k = w.shape[1] // 2
    for row in range(w.shape[0]):  # each output row loses its k lowest-scoring weights
        dropped = set(torch.nonzero(~masks["layers.1.mlp.proj"][row]).flatten().tolist())
        assert dropped == set(score[row].argsort()[:k].tolist())
    # On a channel with huge activations, a small weight outranks a big one elsewhere.
    norm = torch.ones(4)
    norm[2] = 100.0
    from lmforge.infer.prune import _score
    weight = torch.tensor([[0.5, 0.4, 0.05, 0.3]])
    assert _score(weight, norm).argsort()[0, -1] == 2 and _score(weight, None).argsort()[0, -1] == 0


def test_n_m_keeps_n_of_every_m(tiny_hf_dirs):
    model = load_hf_model(tiny_hf_dirs["llama"][0])
    masks = nm_masks(model, 2, 4, input_norms(model, calibration()))
    apply_masks(model, masks)
    for name, layer in prunable_linears(model).items():
        groups = (layer.weight != 0).view(layer.weight.shape[0], -1, 4).sum(-1)
        assert (groups == 2).all(), name
    assert sparsity_of(model) == pytest.approx(0.5)


def silenced(path, removed: dict[int, torch.Tensor], kind: str):
    """The original model with the removed channels' / heads' outgoing columns zeroed."""
    model = load_hf_model(path)
    with torch.no_grad():
        for i, columns in removed.items():
            layer = model.layers[i].mlp.proj if kind == "channels" else model.layers[i].attn.out
            layer.weight[:, columns] = 0
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_removing_mlp_channels_is_exact_surgery(tiny_hf_dirs, tmp_path, family):
    import transformers as T

    path = tiny_hf_dirs[family][0]
    model = load_hf_model(path)
    width = model.config.intermediate_size
    smaller = prune(model, PruneOptions(method="channels", sparsity=0.25), calibration())
    keep = smaller.config.intermediate_size
    assert keep == round(width * 0.75) and smaller.num_parameters() < model.num_parameters()
    removed = {}
    for i, block in enumerate(smaller.layers):  # which channels survived: match the down-product columns
        original = model.layers[i].mlp.proj.weight
        kept = [int((original - col[:, None]).abs().sum(0).argmin()) for col in block.mlp.proj.weight.T]
        assert len(set(kept)) == keep
        removed[i] = torch.tensor(sorted(set(range(width)) - set(kept)))
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(smaller(ids), silenced(path, removed, "channels")(ids), rtol=1e-5, atol=1e-5)
        out = save_hf_model(smaller, tmp_path / "pruned")
        reference = T.AutoModelForCausalLM.from_pretrained(out).eval()
        hf = reference.config.to_dict()
        assert hf.get("intermediate_size", hf.get("n_inner")) == keep
        torch.testing.assert_close(reference(ids).logits, smaller(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_removing_head_groups_is_exact_surgery(tiny_hf_dirs, tmp_path, family):
    import transformers as T

    path = tiny_hf_dirs[family][0]
    model = load_hf_model(path)
    config = model.config
    smaller = prune(model, PruneOptions(method="heads", sparsity=0.5), calibration())
    group, d = config.n_head // config.n_kv_head, config.head_dim
    assert smaller.config.n_kv_head == config.n_kv_head // 2 and smaller.config.n_head == config.n_head // 2
    assert smaller.config.head_dim == d
    removed = {}
    for i, block in enumerate(smaller.layers):
        original = model.layers[i].attn.out.weight.view(-1, config.n_kv_head, group * d)
        kept = [int((original - g[:, None, :]).abs().sum((0, 2)).argmin())
                for g in block.attn.out.weight.view(-1, smaller.config.n_kv_head, group * d).unbind(1)]
        gone = sorted(set(range(config.n_kv_head)) - set(kept))
        removed[i] = torch.cat([torch.arange(g * group * d, (g + 1) * group * d) for g in gone])
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(smaller(ids), silenced(path, removed, "heads")(ids), rtol=1e-5, atol=1e-5)
        out = save_hf_model(smaller, tmp_path / "pruned")
        reference = T.AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(reference(ids).logits, smaller(ids), rtol=1e-4, atol=1e-4)


def test_bad_options_are_refused(tiny_hf_dirs):
    with pytest.raises(LmforgeError, match="GPT-2"):
        prune(load_hf_model(tiny_hf_dirs["gpt2"][0]), PruneOptions(method="heads"), calibration())
    for bad, words in ((dict(method="random"), "unknown pruning method"), (dict(sparsity=1.0), "sparsity"),
                       (dict(method="nm", n=4, m=4), "0 < n < m"), (dict(calibration_tokens=0), "calibration")):
        with pytest.raises(LmforgeError, match=words):
            PruneOptions(**bad)


@pytest.mark.slow
def test_the_prune_command_writes_a_smaller_model_that_loads(tmp_path):
    import lmforge
    from lmforge.cli import main

    assert main(["prune", "--method", "channels", "--sparsity", "0.25", "--calibration-tokens", "256",
                 "--out", str(tmp_path / "pruned")]) == 0
    lm = lmforge.load(str(tmp_path / "pruned"), dtype="float32", device="cpu")
    assert lm.model.config.intermediate_size == 1152  # 1536 channels, a quarter removed
    assert len(lm.complete("The sky is", max_tokens=4, temperature=0, ignore_eos=True)[0].token_ids) == 4
    assert main(["prune", "--out", str(tmp_path / "pruned")]) == 1  # exists: refused, nothing replaced
