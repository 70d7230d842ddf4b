"""LSTM / GRU language models: written-out cells against torch.nn.LSTM / GRU, the fused path, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.rnn import RecurrentLM, RNNConfig, gru_cell, lstm_cell, run_recurrent_layers


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_written_out_layers_match_torch_given_the_same_weights(cls):
    torch.manual_seed(0)
    ours = cls(12, 16, num_layers=3, batch_first=True)
    reference = cls(12, 16, num_layers=3, batch_first=True)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(4, 9, 12)
    if cls is nn.LSTM:
        state = (torch.randn(3, 4, 16), torch.randn(3, 4, 16))
    else:
        state = torch.randn(3, 4, 16)
    expected, expected_state = reference(x, state)
    got, got_state = run_recurrent_layers(ours, x, state)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for a, b in zip(got_state if cls is nn.LSTM else [got_state], expected_state if cls is nn.LSTM else [expected_state]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Gradients through the written-out steps equal those through the fused kernel.
    got.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_single_cells_match_torch_cells():
    torch.manual_seed(1)
    cell = nn.LSTMCell(5, 7)
    x, h, c = torch.randn(3, 5), torch.randn(3, 7), torch.randn(3, 7)
    eh, ec = cell(x, (h, c))
    gh, gc = lstm_cell(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    torch.testing.assert_close(gh, eh, atol=1e-6, rtol=0)
    torch.testing.assert_close(gc, ec, atol=1e-6, rtol=0)
    gcell = nn.GRUCell(5, 7)
    torch.testing.assert_close(gru_cell(x, h, gcell.weight_ih, gcell.weight_hh, gcell.bias_ih, gcell.bias_hh),
                               gcell(x, h), atol=1e-6, rtol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("tie,hidden", [(True, 24), (True, 16), (False, 16)])
def test_model_fused_and_written_out_paths_agree(cell, tie, hidden):
    torch.manual_seed(2)
    model = RecurrentLM(RNNConfig(cell=cell, vocab_size=50, embed_dim=24, hidden_size=hidden, num_layers=2,
                                  dropout=0.3, tie_weights=tie)).eval()
    ids = torch.randint(0, 50, (3, 11))
    fused, fused_state = model(ids)
    manual, manual_state = model(ids, fused=False)
    assert fused.shape == (3, 11, 50)
    torch.testing.assert_close(manual, fused, atol=1e-5, rtol=0)
    # Carrying the state over two halves equals one pass over the whole sequence.
    first, state = model(ids[:, :5])
    second, _ = model(ids[:, 5:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), fused, atol=1e-5, rtol=0)
    if tie:
        assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()
        assert (model.proj is None) == (hidden == 24)


def test_dropout_acts_in_training_only():
    torch.manual_seed(3)
    model = RecurrentLM(RNNConfig(vocab_size=30, embed_dim=16, hidden_size=16, num_layers=2, dropout=0.5))
    ids = torch.randint(0, 30, (2, 6))
    model.train()
    a, _ = model(ids, fused=False)
    b, _ = model(ids, fused=False)
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(ids)[0], model(ids, fused=False)[0], atol=1e-5, rtol=0)


def test_parameter_count_counts_a_tied_matrix_once():
    config = RNNConfig(cell="gru", vocab_size=100, embed_dim=8, hidden_size=8, num_layers=1, tie_weights=True)
    # embedding 100*8, GRU 3*(8*8 + 8*8 + 8 + 8), head bias 100
    assert RecurrentLM(config).num_parameters() == 800 + 3 * (64 + 64 + 16) + 100
    untied = RNNConfig(cell="lstm", vocab_size=100, embed_dim=8, hidden_size=8, num_layers=1, tie_weights=False)
    assert RecurrentLM(untied).num_parameters() == 800 + 4 * (64 + 64 + 16) + 800 + 100


def test_save_load_and_greedy_generation(tmp_path):
    torch.manual_seed(4)
    model = RecurrentLM(RNNConfig(cell="gru", vocab_size=40, embed_dim=16, hidden_size=16, num_layers=2))
    model.save(tmp_path / "m")
    loaded = RecurrentLM.load(tmp_path / "m")
    ids = torch.randint(0, 40, (2, 7))
    torch.testing.assert_close(loaded.eval()(ids)[0], model.eval()(ids)[0])
    out = model.generate([1, 2, 3], max_tokens=8, temperature=0)
    assert out == loaded.generate([1, 2, 3], max_tokens=8, temperature=0)
    # Greedy with the carried state equals re-running the whole prefix each step.
    prefix = [1, 2, 3]
    for token in out:
        assert int(model(torch.tensor([prefix]))[0][0, -1].argmax()) == token
        prefix.append(token)
    with pytest.raises(LmforgeError, match="not a recurrent LM"):
        RecurrentLM.load(tmp_path / "missing")


def test_config_errors():
    with pytest.raises(LmforgeError, match="unknown recurrent cell"):
        RecurrentLM(RNNConfig(cell="rnn"))
    with pytest.raises(LmforgeError, match="dropout"):
        RecurrentLM(RNNConfig(dropout=1.0))
