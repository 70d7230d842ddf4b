"""DPO and relatives against trl: the same pairs, the same reference log-probabilities.

trl's `DPOTrainer._compute_loss` runs on a tiny random transformers Llama; lmforge's loss
runs on lmforge's `Transformer` holding the same weights. Both must give the same loss,
the same implicit rewards, the same gradient with respect to each response token's
log-probability, and the same gradient for every parameter. SimPO (reference-free) is
compared with trl's `CPOTrainer.cpo_loss`, which is where trl implements it.
"""

from __future__ import annotations

import math
import os
import tempfile
from types import SimpleNamespace

import pytest
import torch

from lmforge.align.dpo import PairBatch, PreferenceLossConfig, dpo_batch_loss, preference_loss, sequence_logps
from lmforge.errors import LmforgeError

VOCAB = 96
TOL = 1e-5


def _tiny_hf_llama(seed: int = 0):
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = T.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _pairs(seed: int = 3):
    """Three pairs with prompts and responses of different lengths, right-padded: [chosen; rejected]."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 4, 7), (3, 6, 2), (8, 3, 3)]  # prompt, chosen, rejected lengths
    rows, masks = [], []
    for side in (1, 2):
        for shape in shapes:
            prompt = torch.randint(3, VOCAB, (shape[0],), generator=gen)
            response = torch.randint(3, VOCAB, (shape[side],), generator=gen)
            rows.append(torch.cat([prompt, response]))
            masks.append(torch.cat([torch.zeros(shape[0]), torch.ones(shape[side])]).long())
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    attention = torch.zeros_like(ids)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, :len(r)], mask[i, :len(m)], attention[i, :len(r)] = r, m, 1
    return ids, mask, attention


@pytest.fixture(scope="module")
def trl_setup():
    trl = pytest.importorskip("trl")
    import transformers as T
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lmforge.model.checkpoint import load_hf_model

    hf = _tiny_hf_llama()
    directory = tempfile.mkdtemp(prefix="tiny-dpo-")
    hf.save_pretrained(directory)
    ours = load_hf_model(directory).float().train()
    word = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = T.PreTrainedTokenizerFast(tokenizer_object=word, pad_token="w0", bos_token="w1", eos_token="w2")
    args = trl.DPOConfig(output_dir=os.path.join(directory, "trl"), report_to=[], use_cpu=True, beta=0.1,
                         gradient_checkpointing=False, precompute_ref_log_probs=True)
    trainer = trl.DPOTrainer(model=hf, args=args, processing_class=tok,
                             train_dataset=Dataset.from_list([{"prompt": "w5 w6", "chosen": " w7", "rejected": " w8"}]))
    hf.train()
    return trainer, hf, ours


def _trl_run(trainer, hf, ids, mask, attention, ref_c, ref_r, loss_type, beta, eps):
    """trl's loss, mean rewards, per-token log-prob gradients and parameter gradients."""
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.beta, trainer.label_smoothing = beta, eps
    trainer._metrics["train"].clear()
    captured = []

    def keep(module, inputs, output):
        output.log_probs.retain_grad()
        captured.append(output.log_probs)

    handle = hf.register_forward_hook(keep)
    hf.zero_grad(set_to_none=True)
    try:
        loss = trainer._compute_loss(hf, {"input_ids": ids, "attention_mask": attention, "completion_mask": mask,
                                          "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}, False)
        loss.backward()
    finally:
        handle.remove()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    token_grads = captured[0].grad[:, -(ids.shape[1] - 1):]
    params = {n: p.grad.detach().clone() for n, p in hf.named_parameters()}
    return float(loss.detach()), metrics, token_grads, params


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("robust", 0.1), ("ipo", 0.0), ("hinge", 0.0)])
def test_matches_trl_dpo(trl_setup, loss_type, eps):
    from lmforge.model.families import lmforge_to_hf

    trainer, hf, ours = trl_setup
    ids, mask, attention = _pairs()
    gen = torch.Generator().manual_seed(7)
    ref_c, ref_r = -30 + 5 * torch.randn(3, generator=gen), -30 + 5 * torch.randn(3, generator=gen)
    beta = 0.1 if loss_type != "ipo" else 0.5
    trl_loss, metrics, trl_token_grads, trl_params = _trl_run(trainer, hf, ids, mask, attention, ref_c, ref_r,
                                                              loss_type, beta, eps)
    config = PreferenceLossConfig(loss_type=loss_type, beta=beta, label_smoothing=eps)

    # Gradients with respect to the summed log-probabilities: every response token of a row gets its row's.
    ours.zero_grad(set_to_none=True)
    per_row, counts = sequence_logps(ours, ids, mask)
    leaf = per_row.detach().requires_grad_(True)
    out = preference_loss(leaf[:3], leaf[3:], ref_c, ref_r, counts[:3], counts[3:], config)
    out.loss.backward()
    expected_token_grads = leaf.grad.unsqueeze(1) * mask[:, 1:]
    assert torch.allclose(trl_token_grads * mask[:, 1:], expected_token_grads, atol=TOL, rtol=0)

    # The whole computation through the model's parameters.
    ours.zero_grad(set_to_none=True)
    out = dpo_batch_loss(ours, PairBatch(ids, mask), ref_c, ref_r, config)
    out.loss.backward()
    assert math.isclose(float(out.loss), trl_loss, rel_tol=TOL, abs_tol=TOL)
    assert math.isclose(float(out.chosen_rewards.mean()), metrics["rewards/chosen"], abs_tol=TOL)
    assert math.isclose(float(out.rejected_rewards.mean()), metrics["rewards/rejected"], abs_tol=TOL)
    assert math.isclose(out.margin, metrics["rewards/margins"], abs_tol=TOL)
    assert out.accuracy == pytest.approx(metrics["rewards/accuracies"])
    grads = lmforge_to_hf(ours.config, {n: p.grad for n, p in ours.named_parameters()})
    for name, g in grads.items():
        ref = trl_params[name]
        assert float(ref.abs().max()) > 0, name
        assert torch.allclose(g, ref, atol=TOL * max(1.0, float(ref.abs().max())), rtol=0), name


@pytest.mark.slow  # importing trl takes several seconds
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_matches_trl_cpo(eps):
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    gen = torch.Generator().manual_seed(0)
    sums = -40 + 10 * torch.randn(2, 5, generator=gen, dtype=torch.float64)
    counts = torch.tensor([[4, 9, 12, 3, 7], [6, 2, 8, 8, 5]])
    beta, gamma = 2.0, 0.7
    policy = sums.clone().requires_grad_(True)
    out = preference_loss(policy[0], policy[1], chosen_tokens=counts[0], rejected_tokens=counts[1],
                          config=PreferenceLossConfig(loss_type="simpo", beta=beta, label_smoothing=eps,
                                                      simpo_gamma=gamma))
    out.loss.backward()
    reference = sums.clone().requires_grad_(True)
    fake_self = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=eps,
                                accelerator=SimpleNamespace(device="cpu"))
    # CPO takes length-averaged log-probabilities for SimPO.
    losses, chosen, rejected = cpo.CPOTrainer.cpo_loss(fake_self, reference[0] / counts[0], reference[1] / counts[1])
    losses.mean().backward()
    assert torch.allclose(out.losses, losses, atol=1e-12)
    assert torch.allclose(out.chosen_rewards, chosen) and torch.allclose(out.rejected_rewards, rejected)
    assert torch.allclose(policy.grad, reference.grad, atol=1e-12)


def test_hand_derived_values():
    # One pair: chosen log-ratio +2, rejected -1, so D = 3.
    pc, pr, rc, rr = torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([-12.0]), torch.tensor([-19.0])
    for beta, eps in [(0.1, 0.0), (0.5, 0.2)]:
        out = preference_loss(pc, pr, rc, rr, config=PreferenceLossConfig(beta=beta, label_smoothing=eps))
        z = beta * 3.0
        expected = (1 - eps) * math.log1p(math.exp(-z)) + eps * math.log1p(math.exp(z))
        assert math.isclose(float(out.loss), expected, rel_tol=1e-6)
        assert math.isclose(float(out.chosen_rewards), 2 * beta, rel_tol=1e-6)
        assert math.isclose(float(out.rejected_rewards), -beta, rel_tol=1e-6)
    # IPO: per-token ratios 2/4 and -1/2, target 1/(2*0.25) = 2: (1 - 2)^2.
    out = preference_loss(pc, pr, rc, rr, torch.tensor([4]), torch.tensor([2]),
                          PreferenceLossConfig(loss_type="ipo", beta=0.25))
    assert math.isclose(float(out.loss), 1.0, rel_tol=1e-6)
    # Reference-free: the log-probabilities themselves, D = 10.
    out = preference_loss(pc, pr, config=PreferenceLossConfig(beta=0.1, reference_free=True))
    assert math.isclose(float(out.loss), math.log1p(math.exp(-1.0)), rel_tol=1e-6)


def test_sequence_logps_masks_the_prompt():
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, n_embd=32, n_head=4, n_layer=1, intermediate_size=64)).eval()
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.zeros_like(ids)
    mask[:, 5:] = 1
    with torch.no_grad():
        total, count = sequence_logps(model, ids, mask)
        logp = torch.log_softmax(model(ids)[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert count.tolist() == [4, 4]
    assert torch.allclose(total, logp[:, 4:].sum(-1), atol=1e-5)
    # Changing a prompt token changes the context but is itself never scored; padding after the end changes nothing.
    padded = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        again, _ = sequence_logps(model, padded, torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], 1))
    assert torch.allclose(total, again, atol=1e-5)


def test_bad_configuration_is_refused():
    with pytest.raises(LmforgeError, match="beta"):
        preference_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1),
                        config=PreferenceLossConfig(beta=0.0))
    with pytest.raises(LmforgeError, match="label_smoothing"):
        PreferenceLossConfig(label_smoothing=0.5).validate()
    with pytest.raises(LmforgeError, match="unknown preference loss"):
        PreferenceLossConfig(loss_type="kto").validate()
