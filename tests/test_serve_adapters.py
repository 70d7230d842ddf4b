"""Multi-adapter serving: base rows and rows of two LoRA adapters in one batch, over the real server too."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import shutil

import httpx
import pytest
import torch

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.scheduler import Scheduler
from tests.conftest import live_server

PROMPTS = ["The capital of France is", "Low rank adapters", "One two three"]


@pytest.fixture(scope="module")
def tokenizer():
    from lmforge.model.loading import resolve_tokenizer

    return resolve_tokenizer(None)  # the default model's tokenizer and chat template


def random_llama(tokenizer, seed: int, n_embd: int = 64):
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    torch.manual_seed(seed)
    config = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, n_layer=2, n_embd=n_embd, n_head=4,
                         n_kv_head=2, intermediate_size=96, max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    model = Transformer(config)
    with torch.no_grad():  # wide logits: greedy choices with clear margins, so kernels' rounding never flips one
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model


@pytest.fixture(scope="module")
def base_dir(tokenizer, tmp_path_factory):
    from lmforge.model.checkpoint import save_hf_model

    return save_hf_model(random_llama(tokenizer, 0), tmp_path_factory.mktemp("ma") / "tiny-llama", tokenizer)


def make_lora(model_dir, out, options, seed: int, base_name=None):
    """An lmforge LoRA adapter with random nonzero B, saved in PEFT's layout."""
    from lmforge.model.checkpoint import load_hf_model
    from lmforge.tune.peft import apply_peft, save_adapter

    model = apply_peft(load_hf_model(model_dir), options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return save_adapter(model, out, base_model_name_or_path=str(model_dir) if base_name is None else base_name)


@pytest.fixture(scope="module")
def adapter_dirs(base_dir, tmp_path_factory):
    from lmforge.tune.peft import PeftOptions

    root = tmp_path_factory.mktemp("ma-adapters")
    first = make_lora(base_dir, root / "qv", PeftOptions(method="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"]), 1)
    second = make_lora(base_dir, root / "all", PeftOptions(method="lora", r=8, alpha=4, rslora=True,
                                                            target_modules=["all-linear"]), 2)
    return {"qv": first, "all": second}


@pytest.fixture(scope="module")
def served(base_dir, adapter_dirs):
    """The tiny model as `lmforge serve` loads it, with both adapters installed."""
    from lmforge.infer.loaded import load
    from lmforge.serve.adapters import install_adapters

    lm = load(str(base_dir))
    bank = install_adapters(lm.model, lm.spec, [f"{k}={v}" for k, v in adapter_dirs.items()])
    return lm, bank


def alone(lm, bank, prompt_ids, adapter, params):
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=1, max_seq_len=64, prefix_cache_bytes=0, adapters=bank)
    handle = scheduler.submit(prompt_ids, params, adapter=adapter, stream=False)
    scheduler.run_until_idle()
    return handle.result()


def test_mixed_batch_equals_each_adapter_alone(served):
    lm, bank = served
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=0, ignore_eos=True)
    prompts = [lm.tokenizer.encode(p) for p in PROMPTS] + [lm.tokenizer.encode(PROMPTS[0])] * 2
    adapters = [0, 1, 2, 1, 2]  # three models on different prompts, and the same prompt under both adapters
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=5, max_seq_len=64, prefix_cache_bytes=0, adapters=bank)
    handles = [scheduler.submit(p, params, adapter=a, stream=False) for p, a in zip(prompts, adapters)]
    scheduler.step()
    assert scheduler.stats.steps == 1 and len(scheduler._rows) == 5  # every row took the same decode step
    scheduler.run_until_idle()
    mixed = [h.result() for h in handles]
    for prompt, adapter, got in zip(prompts, adapters, mixed):
        ref = alone(lm, bank, prompt, adapter, params)
        assert got.token_ids == ref.token_ids
        assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    base_on_first = alone(lm, bank, prompts[0], 0, params).token_ids
    assert mixed[3].token_ids != base_on_first and mixed[4].token_ids != base_on_first  # the adapters matter
    assert mixed[3].token_ids != mixed[4].token_ids


def test_mixed_forward_logits_equal_single_forwards(served):
    lm, bank = served
    ids = torch.tensor([lm.tokenizer.encode("Adapters share one batch")] * 3)
    with torch.inference_mode():
        with bank.rows([0, 2, 1]):
            mixed = lm.model(ids)
        for row, adapter in enumerate([0, 2, 1]):
            with bank.rows([adapter]):
                single = lm.model(ids[row:row + 1])
            torch.testing.assert_close(mixed[row], single[0], atol=1e-5, rtol=0)
        plain = lm.model(ids[:1])  # outside `rows`: the base model
    torch.testing.assert_close(plain[0], mixed[0], atol=1e-5, rtol=0)
    assert (mixed[1] - mixed[0]).abs().max() > 0.1 and (mixed[2] - mixed[0]).abs().max() > 0.1


def test_lora_delta_is_scaled_b_a_on_the_fused_slice(served, adapter_dirs):
    """The served q/v adapter adds exactly (alpha / r) B A x to the q and v rows, nothing to k."""
    from safetensors.torch import load_file

    lm, bank = served
    layer = lm.model.layers[0].attn.qkv
    saved = load_file(str(adapter_dirs["qv"] / "adapter_model.safetensors"))
    a_q, b_q = (saved[f"base_model.model.model.layers.0.self_attn.q_proj.lora_{w}.weight"] for w in "AB")
    x = torch.randn(1, 3, layer.in_features)
    with torch.inference_mode():
        base = layer.base(x)
        with bank.rows([1]):
            adapted = layer(x)
    q = lm.model.config.q_size
    kv = lm.model.config.kv_size
    torch.testing.assert_close(adapted[..., :q] - base[..., :q], 2.0 * x @ a_q.T @ b_q.T, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(adapted[..., q:q + kv], base[..., q:q + kv])


def test_prefix_cache_is_kept_per_adapter(served):
    lm, bank = served
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    prompt = lm.tokenizer.encode("a shared system prompt of a dozen or so tokens, then the question")
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=2, max_seq_len=64, adapters=bank)
    results = []
    for adapter in (0, 1, 1):
        handle = scheduler.submit(prompt, params, adapter=adapter, stream=False)
        scheduler.run_until_idle()
        results.append((handle.cached, handle.result().token_ids))
    assert results[1][0] == 0  # the base's keys/values are not the adapter's
    assert results[2][0] > 0 and results[2][1] == results[1][1]  # the adapter's own are reused
    assert results[1][1] == alone(lm, bank, prompt, 1, params).token_ids


def test_unknown_adapter_index_is_refused(served):
    lm, bank = served
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=1, max_seq_len=64, adapters=bank)
    with pytest.raises(LmforgeError, match="no adapter 3"):
        scheduler.submit([1, 2, 3], SamplingParams(max_tokens=2), adapter=3)
    with pytest.raises(LmforgeError, match="serves no adapters"):
        Scheduler(lm.model, lm.tokenizer, max_batch=1, max_seq_len=64).submit([1, 2], SamplingParams(), adapter=1)


# -- the real server, driven by the official openai client -------------------------------------

@contextlib.contextmanager
def running_server(lm, bank, **scheduler_kwargs):
    from lmforge.serve.app import ServeSettings, create_app

    scheduler = Scheduler(lm.model, lm.tokenizer, max_seq_len=128, adapters=bank, **scheduler_kwargs).start()
    app = create_app(scheduler, lm.tokenizer, "tiny", ServeSettings(embedding_model="none"))
    with live_server(app, scheduler) as url:
        yield url, scheduler


def test_openai_client_concurrent_requests_equal_sequential(served):
    openai = pytest.importorskip("openai")
    lm, bank = served
    with running_server(lm, bank, max_batch=6) as (url, scheduler):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        models = client.models.list().data
        assert [m.id for m in models] == ["tiny", "qv", "all"]
        cards = httpx.get(url + "/v1/models").json()["data"]
        assert cards[1]["parent"] == "tiny" and cards[1]["root"] == "tiny" and cards[0]["parent"] is None
        assert client.models.retrieve("tiny:all").id == "all"

        names = ["tiny", "qv", "all", "tiny:qv"]
        question = [{"role": "user", "content": "Say something."}]

        def chat(model):
            r = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=8)
            return r.model, r.choices[0].message.content

        def complete(model):
            r = client.completions.create(model=model, prompt=PROMPTS[1], temperature=0, max_tokens=8)
            return r.model, r.choices[0].text

        sequential = [chat(m) for m in names] + [complete(m) for m in names]
        steps = scheduler.stats.steps
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(chat, m) for m in names] + [pool.submit(complete, m) for m in names]
            concurrent_ = [f.result() for f in futures]
        assert concurrent_ == sequential
        assert scheduler.stats.steps - steps < 8 * 8  # they shared steps
        assert [m for m, _ in sequential] == ["tiny", "qv", "all", "qv"] * 2
        texts = [t for _, t in sequential]
        assert len({texts[0], texts[1], texts[2]}) == 3 and texts[1] == texts[3]

        stream = client.chat.completions.create(model="all", messages=question, temperature=0, max_tokens=8, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == sequential[2][1]
        stream = client.completions.create(model="qv", prompt=PROMPTS[1], temperature=0, max_tokens=8, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == sequential[5][1]

        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model="nope", messages=question, max_tokens=2)
        assert "'tiny', 'qv', 'all'" in str(info.value)
        r = httpx.post(url + "/v1/completions", json={"model": "other:qv", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert r.json()["error"]["type"] == "not_found_error"

        metrics = httpx.get(url + "/metrics").text
        assert 'lmforge_model_generations_total{model="all"}' in metrics
        counts = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("lmforge_model_generations_total{")}
        assert counts == {"tiny": 4.0, "qv": 9.0, "all": 5.0}  # requests under both of qv's names count as qv


def test_echo_logprobs_score_with_the_adapter(served):
    lm, bank = served
    with running_server(lm, bank, max_batch=2) as (url, _):
        scores = {}
        for model in ("tiny", "qv"):
            body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 0, "echo": True, "logprobs": 0}
            scores[model] = httpx.post(url + "/v1/completions", json=body).json()["choices"][0]["logprobs"]
    ids = torch.tensor([lm.tokenizer.encode(PROMPTS[0])])
    with torch.inference_mode(), bank.rows([1]):
        logp = torch.log_softmax(lm.model(ids)[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    assert scores["qv"]["token_logprobs"][1:] == pytest.approx(logp.tolist(), abs=1e-4)
    assert scores["qv"]["token_logprobs"] != scores["tiny"]["token_logprobs"]


# -- bad adapters at startup: one clear message, a non-zero exit ----------------------------------

def serve_error(capsys, tmp_path, model_dir, *adapter_flags):
    argv = ["serve", str(model_dir), "--port", "0", "--db", str(tmp_path / "chat.db"), "--embedding-model", "none"]
    for flag in adapter_flags:
        argv += ["--adapter", str(flag)]
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code != 0 and "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_bad_adapter_stops_serve_before_it_listens(capsys, tmp_path, base_dir, adapter_dirs):
    assert "NAME=PATH" in serve_error(capsys, tmp_path, base_dir, "no-equals-sign")  # before the model loads
    rank0 = tmp_path / "rank0"
    shutil.copytree(adapter_dirs["qv"], rank0)
    cfg = json.loads((rank0 / "adapter_config.json").read_text())
    (rank0 / "adapter_config.json").write_text(json.dumps({**cfg, "r": 0}))
    line = serve_error(capsys, tmp_path, base_dir, f"ok={adapter_dirs['all']}", f"bad={rank0}")
    assert f"adapter 'bad' ({rank0}) has rank r=0; a LoRA adapter needs r >= 1" in line


def test_bad_adapters_are_refused_with_one_clear_message(tmp_path, base_dir, adapter_dirs, tokenizer):
    from lmforge.model.checkpoint import load_hf_model, save_hf_model
    from lmforge.model.registry import resolve
    from lmforge.serve.adapters import install_adapters
    from lmforge.tune.peft import PeftOptions

    model, spec = load_hf_model(base_dir), resolve(str(base_dir))

    def refused(path) -> str:
        with pytest.raises(LmforgeError) as info:
            install_adapters(model, spec, [f"a={path}"])
        assert "\n" not in str(info.value) and f"adapter 'a' ({path})" in str(info.value)
        return str(info.value)

    with pytest.raises(LmforgeError, match="given twice"):
        install_adapters(model, spec, [f"a={adapter_dirs['qv']}", f"a={adapter_dirs['all']}"])
    assert "no such directory" in refused(tmp_path / "missing")

    no_weights = tmp_path / "no-weights"
    shutil.copytree(adapter_dirs["qv"], no_weights)
    (no_weights / "adapter_model.safetensors").unlink()
    assert "has no adapter_model.safetensors" in refused(no_weights)

    cfg = json.loads((adapter_dirs["qv"] / "adapter_config.json").read_text())
    dora = tmp_path / "dora"
    shutil.copytree(adapter_dirs["qv"], dora)
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    assert "uses DoRA" in refused(dora)

    ia3 = make_lora(base_dir, tmp_path / "ia3", PeftOptions(method="ia3"), 3)
    message = refused(ia3)
    assert "is a IA3 adapter" in message and "only LoRA and rsLoRA" in message

    named = make_lora(base_dir, tmp_path / "named", PeftOptions(method="lora", r=4), 4, base_name="org/other-model")
    assert "trained for org/other-model, but this server serves" in refused(named)

    wider = save_hf_model(random_llama(tokenizer, 5, n_embd=96), tmp_path / "wider-llama", tokenizer)
    other = make_lora(wider, tmp_path / "other-base", PeftOptions(method="lora", r=4), 5, base_name="")
    assert "A (4, 64)" in refused(other) and "another base model" in refused(other)
    assert getattr(model, "adapter_bank", None) is None  # nothing was installed


def test_adapter_names_checked_before_loading():
    from lmforge.serve.config import ServeRuntime

    with pytest.raises(LmforgeError, match="may not contain ':'"):
        ServeRuntime(adapters=["base:x=/tmp"])
    assert ServeRuntime(adapters=["x=/a", "y=/b"]).adapters == ["x=/a", "y=/b"]


# -- an adapter made by Hugging Face peft -----------------------------------------------------------

def test_peft_made_adapter_serves_like_transformers_and_peft(served, base_dir, tmp_path):
    peft = pytest.importorskip("peft")
    T = pytest.importorskip("transformers")
    from lmforge.infer.loaded import load
    from lmforge.serve.adapters import install_adapters

    hf = T.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    torch.manual_seed(7)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "gate_proj", "down_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "peft-lora")
    model.eval()

    lm = load(str(base_dir))
    bank = install_adapters(lm.model, lm.spec, [f"hf={tmp_path / 'peft-lora'}"])
    prompt = lm.tokenizer.encode(PROMPTS[2])
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             min_new_tokens=10, pad_token_id=0)
    theirs = out[0, len(prompt):].tolist()
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    ours = alone(lm, bank, prompt, 1, params).token_ids
    assert ours == theirs
    assert alone(lm, bank, prompt, 0, params).token_ids != theirs  # the adapter changes the answer
