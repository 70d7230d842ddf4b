"""Mixture of experts (M7): the MoE block, the Mixtral family against transformers, the router
losses in training, generation through the scheduler and serving a Mixtral directory."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.infer import Generator, SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.model.checkpoint import load_hf_model, save_hf_model
from lmforge.model.moe import MoE, load_balancing_loss, router_z_loss
from tests.conftest import VOCAB

ATOL = 1e-5


def tiny_mixtral_config(**overrides):
    import transformers as T

    options = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                   max_position_embeddings=128, bos_token_id=1, eos_token_id=2, router_aux_loss_coef=0.02)
    options.update(overrides)
    config = T.MixtralConfig(**options)
    config._attn_implementation = "eager"
    return config


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    """(directory saved by transformers, the transformers model): random weights, routers
    scaled up so that routing differs from token to token."""
    import transformers as T

    torch.manual_seed(11)
    model = T.MixtralForCausalLM(tiny_mixtral_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (1.0 if name.endswith("mlp.gate.weight") else 0.05))
    path = tmp_path_factory.mktemp("tiny-mixtral")
    model.save_pretrained(path)
    return path, model


def ids_of(seed, length=24, batch=2):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_router_logits_and_aux_loss_match_transformers(tiny_mixtral):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    path, hf = tiny_mixtral
    ours = load_hf_model(path)
    assert ours.config.family == "mixtral" and ours.config.num_experts == 4 and ours.config.experts_per_token == 2
    ids = ids_of(1)
    with torch.no_grad():
        expected = hf(ids, output_router_logits=True)
        got = ours(ids)
    assert (got - expected.logits).abs().max().item() <= ATOL
    for mine, theirs in zip((m.router_logits for m in ours.moe_layers()), expected.router_logits):
        # the routers are scaled up (entries up to ~20), so float32 rounding of the two products is
        # about 1e-5 in absolute terms: compare relative to each entry's size
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=ATOL)
    ref_aux = load_balancing_loss_func(expected.router_logits, 4, 2)
    losses = ours.router_losses()
    assert abs(float(losses["router_aux"]) - float(ref_aux)) <= 1e-5
    assert float(ref_aux) > 2.0  # not perfectly balanced, so the value is informative
    # Both experts of every token were used: the load counts k assignments per token per layer.
    assert ours.expert_load().tolist() != [[12, 12, 12, 12]] * 2
    assert ours.expert_load().sum(1).tolist() == [2 * ids.numel()] * 2


def test_transformers_loss_with_aux_equals_lmforge_training_loss(tiny_mixtral):
    from lmforge.train.loss import causal_lm_loss

    path, hf = tiny_mixtral
    ours = load_hf_model(path).train()
    ours.config.router_z_loss_coef = 0.0  # transformers adds only the load-balancing term
    ids = ids_of(2)
    hf.train()
    try:
        expected = hf(ids, labels=ids, output_router_logits=True).loss
    finally:
        hf.eval()
    got = causal_lm_loss(ours, ids)
    assert abs(got.item() - expected.item()) <= 1e-5
    with torch.no_grad():
        pure = causal_lm_loss(ours, ids)  # evaluation: cross-entropy alone
    assert abs((got - pure).item() - 0.02 * ours.router_losses()["router_aux"].item()) <= 1e-6


def test_saved_mixtral_round_trips_through_transformers(tiny_mixtral, tmp_path):
    import transformers as T
    from safetensors.torch import load_file

    path, hf = tiny_mixtral
    ours = load_hf_model(path)
    out = save_hf_model(ours, tmp_path / "saved")
    # The same tensor names transformers writes (per-expert w1/w2/w3 under block_sparse_moe).
    assert sorted(load_file(out / "model.safetensors")) == sorted(load_file(path / "model.safetensors"))
    reloaded = T.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is T.MixtralForCausalLM
    ids = ids_of(3, batch=1)
    with torch.no_grad():
        assert (reloaded(ids).logits - hf(ids).logits).abs().max().item() <= ATOL
    assert load_hf_model(out).config == ours.config
    # transformers' in-memory names (fused experts, "mlp.gate") load too.
    from lmforge.model.checkpoint import build_model
    from lmforge.model.families import hf_to_lmforge

    fused = build_model(ours.config, hf_to_lmforge(ours.config, hf.state_dict()), torch.float32)
    with torch.no_grad():
        assert torch.equal(fused(ids), ours(ids))


def test_parameter_counts():
    config = ModelConfig(n_layer=2, n_embd=32, n_head=4, intermediate_size=48, num_experts=4, experts_per_token=2)
    model = Transformer(config)
    assert config.num_parameters() == model.num_parameters()
    dense_ffn = 3 * 32 * 48
    assert config.num_parameters() - config.num_parameters(active=True) == 2 * (4 - 2) * dense_ffn
    dense = ModelConfig(n_layer=2, n_embd=32, n_head=4, intermediate_size=96)  # 2 experts' width
    assert config.num_parameters(active=True) == dense.num_parameters() + 2 * 32 * 4  # plus the routers


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The block written token by token: the definition the grouped dispatch must equal."""
    out = torch.zeros_like(x)
    probs = moe.router(x).softmax(-1)
    for t in range(x.shape[0]):
        top, experts = probs[t].topk(moe.top_k)
        top = top / top.sum()
        for w, e in zip(top, experts):
            gate, up = (moe.w_in[e] @ x[t]).chunk(2)
            out[t] += w * (moe.w_out[e] @ (torch.nn.functional.silu(gate) * up))
    return out


def test_grouped_dispatch_equals_the_per_token_definition():
    torch.manual_seed(0)
    moe = MoE(ModelConfig(n_embd=16, n_head=2, intermediate_size=24, num_experts=5, experts_per_token=2))
    with torch.no_grad():
        moe.router.weight.normal_(std=1.0)
    x = torch.randn(37, 16)
    with torch.no_grad():
        assert torch.allclose(moe(x), reference_moe(moe, x), atol=1e-6)
    assert int(moe.tokens_per_expert.sum()) == 37 * 2


def test_capacity_drops_overflow_and_keeps_the_rest():
    torch.manual_seed(0)
    config = ModelConfig(n_embd=16, n_head=2, intermediate_size=24, num_experts=4, experts_per_token=1,
                         capacity_factor=1.0)
    moe = MoE(config)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 10.0  # every token with x[0] > 0 prefers expert 2
    x = torch.randn(40, 16)
    x[:, 0] = 1.0
    with torch.no_grad():
        y = moe(x)
        full = reference_moe(moe, x)
    capacity = math.ceil(1.0 * 40 * 1 / 4)
    assert moe.tokens_per_expert.tolist() == [0, 0, capacity, 0]
    assert moe.dropped == 40 - capacity
    # First come, first served: the first `capacity` tokens get their expert, the rest nothing.
    assert torch.allclose(y[:capacity], full[:capacity], atol=1e-6)
    assert torch.count_nonzero(y[capacity:]) == 0


def test_aux_and_z_loss_hand_values():
    zeros = [torch.zeros(6, 4), torch.zeros(6, 4)]
    # Uniform router: P_e = 1/4 and the k assignments sum to k per token, so E * sum f P = k.
    assert float(load_balancing_loss(zeros, top_k=2)) == pytest.approx(2.0)
    assert float(router_z_loss(zeros)) == pytest.approx(math.log(4) ** 2)
    # Everything to expert 0 with probability ~1 (k=1): f_0 = P_0 = 1, loss = E.
    skewed = torch.tensor([[30.0, 0, 0, 0]]).repeat(5, 1)
    assert float(load_balancing_loss([skewed], top_k=1)) == pytest.approx(4.0, abs=1e-6)


def test_pooled_balance_misses_layers_collapsed_onto_different_experts():
    to_first = torch.tensor([[30.0, 0.0]]).repeat(8, 1)
    to_second = torch.tensor([[0.0, 30.0]]).repeat(8, 1)
    # Pooled over the two layers everything looks balanced: the loss sits at k = 1.
    assert float(load_balancing_loss([to_first, to_second], top_k=1)) == pytest.approx(1.0, abs=1e-6)
    # Per layer each is fully collapsed: E = 2 each.
    assert float(load_balancing_loss([to_first, to_second], top_k=1, per_layer=True)) == pytest.approx(2.0, abs=1e-6)
    model = Transformer(ModelConfig(n_layer=2, n_embd=16, n_head=2, intermediate_size=16, num_experts=2,
                                    experts_per_token=1, router_aux_per_layer=True))
    for moe, logits in zip(model.moe_layers(), (to_first, to_second)):
        moe.router_logits = logits
    assert float(model.router_losses()["router_aux"]) == pytest.approx(2.0, abs=1e-6)


def test_router_loss_enters_training_and_its_gradient_reaches_the_router():
    from lmforge.train.loop import packed_causal_lm_loss
    from lmforge.train.loss import causal_lm_loss

    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=2, n_embd=32, n_head=4, intermediate_size=32, num_experts=4,
                                    experts_per_token=2, router_aux_loss_coef=1.0, router_z_loss_coef=0.5)).train()
    ids = torch.randint(0, 256, (2, 12))
    loss = causal_lm_loss(model, ids)
    terms = model.router_losses()
    with torch.no_grad():
        ce = causal_lm_loss(model, ids)
    assert float(loss) == pytest.approx(float(ce + terms["router_aux"] + 0.5 * terms["router_z"]), abs=1e-5)
    # "sum" adds the term once per counted target, so dividing by the targets gives the mean.
    total = causal_lm_loss(model, ids, reduction="sum")
    assert float(total) / 22 == pytest.approx(float(loss), abs=1e-5)
    # The router of each layer gets a gradient from the auxiliary terms alone.
    model.zero_grad()
    model.router_losses()["router_loss"].backward()
    assert all(m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0 for m in model.moe_layers())
    packed = packed_causal_lm_loss(model, ids, None, [[5, 7], [12]])
    assert float(packed) > float(causal_lm_loss(model.eval(), ids)) - 10  # runs, and includes the router term
    model.train()
    with torch.no_grad():
        plain = packed_causal_lm_loss(model, ids, None, [[5, 7], [12]])
    packed = packed_causal_lm_loss(model, ids, None, [[5, 7], [12]])
    assert float(packed - plain) == pytest.approx(float(model.router_losses()["router_loss"]), abs=1e-5)


def test_dense_models_are_unchanged():
    config = ModelConfig()
    assert config.num_experts == 0
    model = Transformer(config)
    assert model.moe_layers() == [] and model.router_losses() == {}
    assert not any("router" in name or "w_in" in name for name in model.state_dict())


@pytest.mark.parametrize("bad", [dict(num_experts=4, experts_per_token=5), dict(num_experts=-1),
                                 dict(num_experts=4, mlp="gelu"), dict(num_experts=4, capacity_factor=0.0)])
def test_bad_moe_configs_are_rejected(bad):
    with pytest.raises(ValueError):
        ModelConfig(**bad)


def test_saving_experts_under_a_dense_family_is_refused(tmp_path):
    from lmforge.errors import LmforgeError

    model = Transformer(ModelConfig(family="llama", num_experts=2, experts_per_token=1))
    with pytest.raises(LmforgeError, match="mixtral"):
        save_hf_model(model, tmp_path / "x")


def hf_greedy(hf, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, hf(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


def test_generation_cached_batched_and_one_by_one_agree_with_transformers(tiny_mixtral):
    path, hf = tiny_mixtral
    gen = Generator(load_hf_model(path))
    prompts = [[5, 9, 33, 7], [8, 1, 40, 2], list(range(10, 31)), [100]]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    cached = [c.token_ids for c in gen.generate(prompts, params, use_cache=True)]
    uncached = [c.token_ids for c in gen.generate(prompts, params, use_cache=False)]
    singles = [gen.generate([p], params)[0].token_ids for p in prompts]
    assert cached == uncached == singles
    assert cached[2] == hf_greedy(hf, prompts[2], 16)


def test_beam_search_matches_transformers_generate(tiny_mixtral):
    """Beam search over the mixture of experts (cache rows reordered as beams are reselected)
    gives the tokens of transformers' generate(num_beams=...)."""
    from lmforge.infer.beam import BeamParams, DecoderStepper, beam_search

    path, hf = tiny_mixtral
    model = load_hf_model(path)
    prompt = torch.tensor([[5, 9, 33, 7, 61]])
    with torch.no_grad():
        free = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None)
    eos = int(free[0, 9])  # a token greedy decoding emits mid-way: some beams end early
    for beams, penalty in ((3, 1.0), (4, 2.0)):
        with torch.no_grad():
            expected = hf.generate(prompt, max_new_tokens=10, do_sample=False, num_beams=beams,
                                   length_penalty=penalty, early_stopping=False, eos_token_id=eos)
        hyp = beam_search(DecoderStepper(model, prompt, beams, 10), 1, BeamParams(beams, 10, penalty, False), [eos])[0]
        row = expected[0, prompt.shape[1]:].tolist()
        if eos in row:
            row = row[:row.index(eos) + 1]
        assert hyp.tokens == row, (beams, penalty)


@pytest.mark.slow  # starts `lmforge serve` in a subprocess: ~15 s
def test_lmforge_serve_answers_for_a_mixtral_directory(tiny_mixtral, tmp_path):
    """`lmforge serve DIR` on a directory transformers wrote (plus a tokenizer), over HTTP."""
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    from lmforge.tokenizer.train import train_tokenizer

    path, hf = tiny_mixtral
    root = Path(__file__).resolve().parents[1]
    served = tmp_path / "mixtral"
    served.mkdir()
    for f in path.iterdir():
        (served / f.name).write_bytes(f.read_bytes())
    tokenizer = train_tokenizer([(root / "LICENSE").read_text(encoding="utf-8")], "bpe", vocab_size=VOCAB)
    tokenizer.save(served)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(served), "--port", str(port)],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
            assert server.poll() is None, server.stdout.read().decode()
        models = httpx.get(url + "/v1/models", timeout=10).json()["data"]
        assert str(served) in [m["id"] for m in models]
        prompt = tokenizer.encode("Permission is hereby granted")
        reply = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": str(served), "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 0})
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        expected = hf_greedy(hf, prompt, 8)
        if choice["finish_reason"] == "length":
            assert tokenizer.decode(expected) == choice["text"]
        else:  # an end token came first: the text stops there
            assert tokenizer.decode(expected).startswith(choice["text"])
    finally:
        server.terminate()
        server.wait(20)


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked-experts", "per-expert"])
def test_mixtral_gguf_loads_with_the_same_logits(tiny_mixtral, tmp_path, stacked):
    """A llama.cpp-style Mixtral GGUF (llama architecture + expert_count) written here with the
    gguf package, in both of llama.cpp's expert layouts."""
    import gguf

    from lmforge.model.gguf_io import load_gguf_model
    from lmforge.model.gguf_write import gguf_tensors

    ours = load_hf_model(tiny_mixtral[0])
    c = ours.config
    state = dict(ours.state_dict())
    for i in range(c.n_layer):  # the dense mapping wants an MLP; its ffn_* names are replaced below
        state[f"layers.{i}.mlp.fc.weight"] = torch.zeros(2 * c.intermediate_size, c.n_embd)
        state[f"layers.{i}.mlp.proj.weight"] = torch.zeros(c.n_embd, c.intermediate_size)
    tensors = gguf_tensors(c, state, "llama")
    for i in range(c.n_layer):
        b, p = f"blk.{i}.", f"layers.{i}.mlp."
        for name in ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "ffn_gate_inp.weight",
                     "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"):
            tensors.pop(b + name, None)  # (gguf_tensors writes the stacked layout itself; rebuilt here)
        gate, up = state[p + "w_in"].split(c.intermediate_size, dim=1)
        tensors[b + "ffn_gate_inp.weight"] = state[p + "router.weight"]
        parts = {"gate": gate, "up": up, "down": state[p + "w_out"]}
        for part, value in parts.items():
            if stacked:
                tensors[f"{b}ffn_{part}_exps.weight"] = value
            else:
                for e in range(c.num_experts):
                    tensors[f"{b}ffn_{part}.{e}.weight"] = value[e]
    path = tmp_path / "tiny-mixtral.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.n_layer)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.experts_per_token)
    for name, tensor in tensors.items():
        w.add_tensor(name, tensor.detach().float().contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    loaded = load_gguf_model(path)
    assert loaded.config.family == "mixtral" and loaded.config.num_experts == 4
    ids = ids_of(6, batch=1)
    with torch.no_grad():
        assert (loaded(ids) - ours(ids)).abs().max().item() <= ATOL


@pytest.mark.slow  # builds a small dataset and trains a few steps: ~10 s
def test_pretraining_a_moe_logs_router_losses_and_writes_a_mixtral_checkpoint(tmp_path):
    import json

    import transformers as T

    from lmforge.train.data import ensure_dataset
    from lmforge.train.loop import pretrain
    from lmforge.train.recipe import DataSection, load_recipe

    data = tmp_path / "news-512"
    ensure_dataset(DataSection(path=str(data), sources=["news"], tokenizer_vocab_size=512, seq_len=64,
                               val_fraction=0.1), log=lambda _m: None)
    out = tmp_path / "run"
    options = {"model.family": "mixtral", "model.num_experts": 4, "model.experts_per_token": 2,
               "model.n_layer": 2, "model.n_embd": 64, "model.n_head": 4, "model.n_kv_head": 2,
               "model.intermediate_size": 64, "data.path": str(data), "train.out": str(out),
               "train.max_steps": 4, "train.batch_size": 4, "train.eval_interval": 4, "train.eval_batches": 1,
               "train.save_interval": 4, "train.sample_tokens": 4, "train.plots": False,
               "schedule.warmup_steps": 1}
    pretrain(load_recipe(None, options), progress=False)
    records = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 4
    assert all(1.0 < r["router_aux"] < 4.0 and r["router_z"] > 0 for r in train)
    final = out / "checkpoints" / "step-0000004"
    ours = load_hf_model(final)
    assert ours.config.family == "mixtral" and ours.config.num_experts == 4
    theirs = T.AutoModelForCausalLM.from_pretrained(final).eval()
    assert type(theirs) is T.MixtralForCausalLM
    ids = ids_of(7, batch=1)[:, :16] % 512
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-4
