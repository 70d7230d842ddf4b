"""Logit lens, attributions, activation patching and probes on tiny random models."""

from __future__ import annotations

import pytest
import torch

from lmforge.interpret.attribution import (baseline_embeddings, gradient_x_input, integrated_gradients, occlusion,
                                           quadrature, target_logits, token_embeddings)
from lmforge.interpret.capture import residual_streams
from lmforge.interpret.lens import logit_lens, read_stream
from lmforge.interpret.patching import activation_patching
from lmforge.interpret.probes import fit_logistic, layer_features, polarity_sentences, probe_layers
from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.loading import load_model
from lmforge.model.registry import resolve
from lmforge.model.transformer import Transformer


def tiny_model(seed: int = 0, n_layer: int = 3, dtype=torch.float32) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=60, n_embd=32, n_layer=n_layer, n_head=4, n_kv_head=2, intermediate_size=64,
                         max_position_embeddings=64)
    model = Transformer(config).eval()
    with torch.no_grad():  # larger than the default init, so that every layer matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype)


IDS = torch.tensor([[5, 17, 23, 8, 41, 12]])


def test_residual_streams_match_transformers_hidden_states(tiny_hf_dirs):
    path, reference = tiny_hf_dirs["llama"]
    model = load_model(resolve(str(path)))
    ids = torch.tensor([[4, 90, 17, 250, 33, 8, 61]])
    logits, streams = residual_streams(model, ids)
    with torch.no_grad():
        out = reference(ids, output_hidden_states=True)
    # transformers' last hidden state has the final norm applied; the ones before are raw streams
    for layer in range(model.config.n_layer):
        torch.testing.assert_close(streams[layer], out.hidden_states[layer], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.norm(streams[-1]), out.hidden_states[-1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-4)


def test_logit_lens_ends_at_the_models_prediction_and_reads_each_layer():
    model = tiny_model()
    lens = logit_lens(model, IDS, top_k=3)
    with torch.no_grad():
        logits = model(IDS)[0]
    assert lens.top_ids.shape == (4, 6, 3) and lens.final_rank.shape == (4, 6)
    assert torch.equal(lens.final_ids, logits.argmax(-1))
    assert torch.equal(lens.top_ids[-1, :, 0], lens.final_ids)
    assert lens.final_rank[-1].tolist() == [0] * 6
    torch.testing.assert_close(lens.final_prob[-1], logits.softmax(-1).max(-1).values)
    assert lens.target == int(logits[-1].argmax()) and int(lens.target_rank[-1]) == 0
    # a middle layer: its stream through the final norm and head, ranked by hand
    _, streams = residual_streams(model, IDS)
    middle = read_stream(model, streams[2, 0])
    chosen = middle[torch.arange(6), lens.final_ids]
    assert lens.final_rank[2].tolist() == (middle > chosen[:, None]).sum(-1).tolist()
    assert torch.equal(lens.top_ids[2, :, 0], middle.argmax(-1))
    assert lens.first_layer_on_top() in range(4)
    other = logit_lens(model, IDS, target=7)
    assert other.target == 7 and int(other.target_rank[-1]) == int((logits[-1] > logits[-1, 7]).sum())


@pytest.mark.parametrize("rule,order", [("trapezoid", 2), ("midpoint", 2), ("left", 1), ("right", 1)])
def test_quadrature_integrates_with_the_rules_order(rule, order):
    errors = []
    for steps in (8, 32):
        a, w = quadrature(steps, rule)
        assert float(w.sum()) == pytest.approx(1.0)
        errors.append(abs(float((w * torch.exp(a)).sum()) - (torch.e - 1)))
    assert errors[1] < errors[0] / (4 ** order) * 1.5  # error ~ steps^-order


def test_integrated_gradients_completeness_tightens_with_steps():
    model = tiny_model(dtype=torch.float64)
    target = 11
    base = baseline_embeddings(model, IDS, "pad", pad_id=3)
    errors = {}
    for steps in (4, 16, 64):
        ig = integrated_gradients(model, IDS, target, steps=steps, rule="trapezoid", baseline=base, batch_size=32)
        errors[steps] = ig.completeness_error
    gap = abs(ig.score - ig.baseline_score)
    assert gap > 0.1  # the prediction really depends on the prompt
    # The trapezoid rule's error falls as steps^-2: about 16x for 4x the steps.
    assert errors[4] > 8 * errors[16] > 64 * errors[64]
    assert errors[64] < 1e-3 * gap  # stated tolerance at 64 trapezoid steps: 0.1% of f(x) - f(baseline)
    with torch.no_grad():
        f_x = target_logits(model, IDS, token_embeddings(model, IDS), target)
    assert ig.score == pytest.approx(float(f_x))
    assert int(ig.scores.shape[0]) == IDS.shape[1]


def test_zero_baseline_of_an_rmsnorm_model_is_reported_as_incomplete():
    # RMSNorm(a x) jumps from 0 to its full value within a ~ sqrt(eps): the path integral has a spike
    # at the zero end that a coarse quadrature misses, and completeness_error says so.
    model = tiny_model(dtype=torch.float64)
    ig = integrated_gradients(model, IDS, 11, steps=16, rule="midpoint")
    assert ig.completeness_error > 0.1 * abs(ig.score - ig.baseline_score)


def test_integrated_gradients_baseline_end_is_the_baseline_forward():
    model = tiny_model(dtype=torch.float64)
    base = baseline_embeddings(model, IDS, "pad", pad_id=3)
    ig = integrated_gradients(model, IDS, 9, steps=8, baseline=base)
    with torch.no_grad():
        pad_prompt = model(torch.full_like(IDS, 3), last_only=True)[0, 0, 9]  # the pad token everywhere
    assert ig.baseline_score == pytest.approx(float(pad_prompt))


def test_gradient_x_input_is_the_derivative_of_scaling_each_token():
    model = tiny_model(dtype=torch.float64)
    target, eps = 11, 1e-5
    gxi = gradient_x_input(model, IDS, target)
    x = token_embeddings(model, IDS)
    for t in range(IDS.shape[1]):
        up, down = x.clone(), x.clone()
        up[0, t] *= 1 + eps
        down[0, t] *= 1 - eps
        with torch.no_grad():
            f = target_logits(model, IDS, torch.cat([up, down]), target)
        assert float(gxi.scores[t]) == pytest.approx(float(f[0] - f[1]) / (2 * eps), rel=1e-5, abs=1e-8)


def test_occlusion_of_a_token_by_itself_changes_nothing():
    model = tiny_model()
    base = baseline_embeddings(model, IDS, "pad", pad_id=23)  # token 23 sits at position 2
    occ = occlusion(model, IDS, 11, baseline=base)
    assert float(occ.scores[2]) == 0.0
    assert float(occ.scores.abs().sum()) > 0
    zero = occlusion(model, IDS, 11)
    x = token_embeddings(model, IDS).clone()
    x[0, 4] = 0
    with torch.no_grad():
        expected = zero.score - float(target_logits(model, IDS, x, 11)[0])
    assert float(zero.scores[4]) == pytest.approx(expected, abs=1e-5)


def test_activation_patching_restores_what_the_residual_stream_carries():
    model = tiny_model(n_layer=4)
    clean = torch.tensor([[5, 17, 23, 8, 41, 12]])
    corrupted = torch.tensor([[5, 17, 30, 8, 41, 12]])  # position 2 differs
    with torch.no_grad():
        clean_last, corrupted_last = model(clean)[0, -1], model(corrupted)[0, -1]
    answer, wrong = int(clean_last.argmax()), int(corrupted_last.argmax())
    if answer == wrong:
        wrong = int(clean_last.topk(2).indices[1])
    result = activation_patching(model, clean, corrupted, answer, wrong)
    assert result.clean_diff == pytest.approx(float(clean_last[answer] - clean_last[wrong]), abs=1e-5)
    resid, attn, mlp = result.restored["resid"], result.restored["attn"], result.restored["mlp"]
    assert resid.shape == (4, 6)
    # The stream entering block 0 at the changed token is the clean token itself: everything returns.
    assert float(resid[0, 2]) == pytest.approx(1.0, abs=1e-4)
    # Positions that read the same token in both prompts carry no difference there.
    assert resid[0, [0, 1, 3, 4, 5]].abs().max() < 1e-5
    # Causal attention: before the changed token, clean and corrupted activations are equal.
    assert attn[:, :2].abs().max() < 1e-5 and mlp[:, :2].abs().max() < 1e-5
    # After the last block nothing but the last position feeds the prediction: patching the
    # last position of the last block's MLP output leaves only that block's attention corrupted.
    assert float(resid[:, 2:].abs().sum()) > 0
    with pytest.raises(LmforgeError, match="same token length"):
        activation_patching(model, clean, corrupted[:, :5], answer, wrong)
    with pytest.raises(LmforgeError, match="same token"):
        activation_patching(model, clean, corrupted, answer, answer)


def test_probe_reads_a_linear_signal_and_the_control_does_not():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(120) % 2
    noise = torch.randn(120, 16, generator=generator)
    signal = noise.clone()
    signal[:, 3] += 3.0 * (2 * labels - 1)  # layer 1 holds the label along one direction
    result = probe_layers(torch.stack([noise, signal]), labels, folds=4)
    assert result.accuracy[1] > 0.95
    assert abs(float(result.accuracy[0]) - 0.5) < 0.2
    assert abs(float(result.control[1]) - 0.5) < 0.2
    assert result.best_layer == 1 and result.majority == 0.5


def test_logistic_regression_separates_separable_points():
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.2, 0.9], [0.9, 0.1]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    w, b = fit_logistic(x, y, 2, l2=1e-3)
    assert ((x @ w + b).argmax(-1) == y).all()


class _Chars:
    """A character-level stand-in tokenizer for the tiny model's 60-token vocabulary."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 60 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 60) for i in ids)


def test_layer_features_of_a_padded_batch_equal_each_sentence_alone():
    model = tiny_model()
    texts = ["good film", "a dull and long one", "fine"]
    batched = layer_features(model, _Chars(), texts, batch_size=3)
    assert batched.shape == (4, 3, 32)
    for i, text in enumerate(texts):
        alone = layer_features(model, _Chars(), [text], batch_size=1)
        torch.testing.assert_close(batched[:, i], alone[:, 0], atol=1e-5, rtol=1e-4)
    _, streams = residual_streams(model, torch.tensor([_Chars().encode(texts[1])]))
    torch.testing.assert_close(batched[:, 1], streams[:, 0].mean(1), atol=1e-5, rtol=1e-4)


def test_polarity_sentences_are_balanced():
    texts, labels = polarity_sentences(limit=40)
    assert len(texts) == 40 and sum(labels) == 20 and len(set(texts)) == 40


def test_max_activating_examples_are_the_largest_neuron_values():
    import torch.nn.functional as F

    from lmforge.interpret.neurons import max_activating

    model = tiny_model()
    texts = ["good film", "a dull and long one", "fine work here", "zebra"]
    found = max_activating(model, _Chars(), texts, layer=1, neuron=5, top=3, context_tokens=4)
    mlp_inputs = []
    handle = model.layers[1].mlp.register_forward_pre_hook(lambda m, args: mlp_inputs.append(args[0][0]))
    values = []
    with torch.no_grad():
        for i, text in enumerate(texts):
            model(torch.tensor([_Chars().encode(text)]))
            gate, up = model.layers[1].mlp.fc(mlp_inputs[-1]).chunk(2, dim=-1)
            values += [(float(v), i, p) for p, v in enumerate((F.silu(gate) * up)[:, 5])]
    handle.remove()
    expected = sorted(values, reverse=True)[:3]
    assert [(a.text, a.position) for a in found] == [(i, p) for _, i, p in expected]
    assert [a.value for a in found] == pytest.approx([v for v, _, _ in expected], abs=1e-5)
    with pytest.raises(LmforgeError, match="out of range"):
        max_activating(model, _Chars(), texts, layer=9, neuron=0)


def test_keeping_the_first_token_in_the_baseline():
    model = tiny_model(dtype=torch.float64)
    base = baseline_embeddings(model, IDS, "pad", pad_id=3, keep_first=True)
    torch.testing.assert_close(base[0, 0], token_embeddings(model, IDS)[0, 0])
    ig = integrated_gradients(model, IDS, 11, steps=32, baseline=base)
    assert float(ig.scores[0]) == 0.0
    assert ig.completeness_error < 1e-2 * abs(ig.score - ig.baseline_score)
    assert float(occlusion(model, IDS, 11, baseline=base).scores[0]) == 0.0


class _CharsWithSpecials(_Chars):
    pad_id, eos_id = 1, 2


@pytest.mark.parametrize("kind", ["gpt2", "moe"])
def test_explain_runs_on_learned_positions_and_mixture_of_experts(tiny_hf_dirs, kind):
    from lmforge.interpret.explain import explain
    from lmforge.interpret.options import ExplainOptions

    if kind == "gpt2":
        model = load_model(resolve(str(tiny_hf_dirs["gpt2"][0])))
    else:
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=60, n_embd=32, n_layer=2, n_head=4, n_kv_head=2,
                                        intermediate_size=48, num_experts=4, experts_per_token=2)).eval()
    probe = dict(probe="sentiment", probe_limit=10, probe_random=True) if kind == "gpt2" else {}
    options = ExplainOptions(compare="abcxe", compare_target="q", ig_steps=16, **probe)
    result = explain(model, _CharsWithSpecials(), "abcde", options, show_progress=False)
    assert sorted(result.attention) == [0, 1] and result.lens.final_rank[-1].tolist() == [0] * 5
    ig = result.attributions[1]
    assert ig.completeness_error < 0.05 * abs(ig.score - ig.baseline_score) + 1e-4
    assert float(result.patching.restored["resid"][0, 3]) == pytest.approx(1.0, abs=1e-4)
    if kind == "gpt2":
        assert result.probe.examples == 10 and result.probe.random_model.shape == (3,)
        assert all(0.0 <= float(a) <= 1.0 for a in result.probe.random_model)


def test_contrastive_attributions_are_differences_of_the_two_logits_attributions():
    model = tiny_model(dtype=torch.float64)
    base = baseline_embeddings(model, IDS, "pad", pad_id=3, keep_first=True)
    for method, kwargs in [(gradient_x_input, {}), (integrated_gradients, {"steps": 8, "baseline": base}),
                           (occlusion, {"baseline": base})]:
        both = method(model, IDS, 11, contrast=7, **kwargs)
        first, second = method(model, IDS, 11, **kwargs), method(model, IDS, 7, **kwargs)
        torch.testing.assert_close(both.scores, first.scores - second.scores, atol=1e-5, rtol=1e-5)
        assert both.score == pytest.approx(first.score - second.score) and both.contrast == 7


def test_random_model_like_has_the_shape_but_not_the_weights():
    from lmforge.interpret.probes import random_model_like

    model = tiny_model()
    fresh, again = random_model_like(model, seed=3), random_model_like(model, seed=3)
    assert fresh.config == model.config and not fresh.training
    assert not torch.equal(fresh.layers[0].attn.qkv.weight, model.layers[0].attn.qkv.weight)
    assert torch.equal(fresh.layers[0].attn.qkv.weight, again.layers[0].attn.qkv.weight)
