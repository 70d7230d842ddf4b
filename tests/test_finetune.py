"""lmforge finetune: loss masking on the default model's real chat template, packing, the shared
training loop (exact resume, token-mean accumulation), generated datasets, the command end to end,
and the errors a user can cause."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.tune.sft_data import IGNORE_INDEX, encode_chat, messages_of, pack_rows, prompt_ids

LMFORGE = [sys.executable, "-m", "lmforge"]

CHAT = [
    {"role": "system", "content": "You answer with numbers only."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "And twice that, please?"},
    {"role": "assistant", "content": "Twice 42 is 84."},
]


@pytest.fixture(scope="module")
def tokenizer():
    from lmforge.model.loading import resolve_tokenizer

    return resolve_tokenizer(None)  # SmolLM2-135M-Instruct's tokenizer and ChatML template


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer random Llama with the default model's tokenizer and chat template, as an HF directory."""
    from lmforge.model.checkpoint import save_hf_model
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    config = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                         intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    return save_hf_model(Transformer(config), tmp_path_factory.mktemp("sft") / "tiny", tokenizer)


@pytest.fixture(scope="module")
def arithmetic_dir(tmp_path_factory) -> Path:
    from lmforge.tune.datasets import write_dataset

    out = tmp_path_factory.mktemp("sft-data") / "arithmetic"
    write_dataset("arithmetic", out, seed=0, sizes={"train": 120, "validation": 12, "test": 12})
    return out


# -- masking -----------------------------------------------------------------------------------------

def _assistant_positions_by_tokens(tokenizer, ids: list[int]) -> list[int]:
    """Independently of the renderer: after each '<|im_start|>assistant\\n' header, every token up
    to and including the next <|im_end|>."""
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end = tokenizer.eos_id
    positions, i = [], 0
    while i < len(ids):
        if ids[i:i + len(header)] == header:
            j = i + len(header)
            while ids[j] != end:
                positions.append(j)
                j += 1
            positions.append(j)
            i = j
        i += 1
    return positions


def test_loss_positions_on_the_default_template_are_the_assistant_turns(tokenizer):
    encoded = encode_chat(tokenizer, CHAT)
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=False)
    assert encoded.ids == tokenizer.encode(text, add_special_tokens=False)  # same tokens as the whole text
    assert encoded.whole_text_encoding
    loss_positions = [i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX]
    assert loss_positions == _assistant_positions_by_tokens(tokenizer, encoded.ids)
    assert all(encoded.labels[i] == encoded.ids[i] for i in loss_positions)
    # Each span decodes to the assistant's content plus the end-of-turn token, nothing else.
    spans = [tokenizer.decode(encoded.ids[a:b]) for a, b in encoded.spans]
    assert spans == ["42<|im_end|>", "Twice 42 is 84.<|im_end|>"]
    # The system and user text, the headers and the newline after <|im_end|> carry no loss.
    unmasked = tokenizer.decode([encoded.ids[i] for i in loss_positions])
    assert "numbers only" not in unmasked and "user" not in unmasked and "assistant" not in unmasked
    # The exact indices for this conversation (ChatML: "<|im_start|>assistant\n" is 3 tokens).
    # The first answer starts right after the prompt generation would be given: digits are
    # single tokens in SmolLM's tokenizer, so "42<|im_end|>" is 3 tokens.
    prompt = prompt_ids(tokenizer, CHAT[:3])
    assert encoded.ids[:len(prompt)] == prompt
    assert encoded.spans[0] == (len(prompt), len(prompt) + 3)
    second = prompt_ids(tokenizer, CHAT)
    assert encoded.spans[1][0] == len(second) and encoded.spans[1][1] == len(encoded.ids) - 1  # the final "\n"


def test_template_default_system_prompt_is_masked_too(tokenizer):
    # Without a system message the template writes its own; it must not carry loss.
    chat = CHAT[1:3]
    encoded = encode_chat(tokenizer, chat)
    text = tokenizer.decode(encoded.ids)
    assert text.startswith("<|im_start|>system\n")
    assert [tokenizer.decode(encoded.ids[a:b]) for a, b in encoded.spans] == ["42<|im_end|>"]
    assert encoded.loss_tokens == len(tokenizer.encode("42<|im_end|>", add_special_tokens=False))


def test_prompt_completion_records_equal_messages(tokenizer):
    record = {"prompt": "What is 12 + 30?", "completion": "42", "system": "You answer with numbers only."}
    assert messages_of(record) == CHAT[:3]
    sharegpt = {"messages": [{"from": "human", "content": "hi"}, {"from": "gpt", "content": "hello"}]}
    assert [m["role"] for m in messages_of(sharegpt)] == ["user", "assistant"]


def test_truncation_keeps_the_start_and_drops_conversations_left_without_loss(tokenizer):
    from lmforge.tune.sft_data import encode_dataset

    full = encode_chat(tokenizer, CHAT)
    cut = encode_chat(tokenizer, CHAT, max_len=full.spans[1][0] + 2)
    assert cut.truncated and cut.ids == full.ids[:len(cut.ids)] and cut.spans[-1][1] == len(cut.ids)
    long_question = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]
    kept, stats = encode_dataset(tokenizer, [{"messages": CHAT}, {"messages": long_question}], max_len=full.spans[0][1])
    assert (stats.kept, stats.dropped_truncated, stats.truncated) == (1, 1, 2) and kept[0].loss_tokens == 3
    with pytest.raises(LmforgeError, match="truncation"):
        encode_dataset(tokenizer, [{"messages": CHAT}], max_len=full.spans[0][0])


# -- packing -----------------------------------------------------------------------------------------

def test_packed_row_loss_equals_the_conversations_losses(tokenizer, tiny_model_dir):
    from lmforge.model.checkpoint import load_hf_model
    from lmforge.train.loop import Batch, SequenceObjective
    from lmforge.train.loss import causal_lm_loss

    model = load_hf_model(tiny_model_dir).train()
    chats = [CHAT, CHAT[1:3], [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]]
    encoded = [encode_chat(tokenizer, c) for c in chats]
    separate = sum(causal_lm_loss(model, torch.tensor([e.ids]), torch.tensor([e.labels]), reduction="sum")
                   for e in encoded)
    width = sum(len(e.ids) for e in encoded) + 7  # padding after the last conversation
    ids = torch.full((1, width), tokenizer.eos_id)
    labels = torch.full((1, width), IGNORE_INDEX)
    at = 0
    for e in encoded:
        ids[0, at:at + len(e.ids)] = torch.tensor(e.ids)
        labels[0, at:at + len(e.ids)] = torch.tensor(e.labels)
        at += len(e.ids)
    batch = Batch(ids, labels, [[len(e.ids) for e in encoded]], at)
    packed = SequenceObjective(model)(batch.input_ids, batch.labels, reduction="sum", lengths=batch.lengths)
    assert packed.item() == pytest.approx(separate.item(), rel=1e-5, abs=1e-5)
    assert batch.target_count() == sum(e.loss_tokens for e in encoded)
    # Without the boundaries the same row is one long sequence: a different loss.
    unbounded = causal_lm_loss(model, ids, labels, reduction="sum")
    assert abs(unbounded.item() - separate.item()) > 1e-3
    # Gradients flow through the packed path as through the separate ones.
    packed.backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([50, 30, 70, 20, 60, 10], 100)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum([50, 30, 70, 20, 60, 10][i] for i in r) <= 100 for r in rows)
    assert rows == [[2, 1], [4, 3, 5], [0]]
    with pytest.raises(LmforgeError, match="does not fit"):
        pack_rows([101], 100)


# -- the shared loop -----------------------------------------------------------------------------------

def _config(model_dir, data_dir, out, **extra):
    from lmforge.tune.sft import load_finetune_recipe

    options = {"model.init_from": str(model_dir), "data.train": str(data_dir / "train.jsonl"),
               "data.validation": str(data_dir / "validation.jsonl"), "train.out": str(out),
               "train.max_steps": 6, "train.eval_interval": 3, "train.save_interval": 3, "train.batch_size": 4,
               "eval.exact_match_examples": 4, "eval.max_new_tokens": 3, "eval.loss_examples": 8,
               "optim.lr": 1e-3, "schedule.warmup_steps": 1, "train.plots": False, **extra}
    return load_finetune_recipe(None, options)


def _losses(out: Path, key="loss", kind="train") -> dict[int, float]:
    records = [json.loads(x) for x in (out / "logs" / "train.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if r["kind"] == kind}


@pytest.mark.slow
def test_finetune_resumes_exactly_and_accumulation_equals_one_batch(tiny_model_dir, arithmetic_dir, tmp_path):
    from lmforge.tune.sft import finetune

    quiet = {"progress": False, "log": lambda _m: None}
    finetune(_config(tiny_model_dir, arithmetic_dir, tmp_path / "ref"), **quiet)
    reference = _losses(tmp_path / "ref")
    assert sorted(reference) == list(range(1, 7)) and reference[6] < reference[1]
    # Stop after step 3 (checkpointed), then resume: the same losses, bit for bit.
    finetune(_config(tiny_model_dir, arithmetic_dir, tmp_path / "cut", **{"train.stop_at_step": 3}), **quiet)
    assert sorted(_losses(tmp_path / "cut")) == [1, 2, 3]
    finetune(_config(tiny_model_dir, arithmetic_dir, tmp_path / "cut"), resume=True, **quiet)
    assert _losses(tmp_path / "cut") == reference
    assert _losses(tmp_path / "cut", "val_loss", "eval") == _losses(tmp_path / "ref", "val_loss", "eval")
    # Two micro-batches of 2 rows = one of 4: the loss is the mean over the step's answer tokens.
    finetune(_config(tiny_model_dir, arithmetic_dir, tmp_path / "acc",
                     **{"train.batch_size": 2, "train.grad_accum": 2}), **quiet)
    for step, value in _losses(tmp_path / "acc").items():
        assert value == pytest.approx(reference[step], rel=1e-5), step


@pytest.mark.slow
def test_unpacked_rows_are_length_bucketed(tiny_model_dir, arithmetic_dir, tmp_path):
    from lmforge.train.loop import Trainer
    from lmforge.tune.sft import SftTask

    config = _config(tiny_model_dir, arithmetic_dir, tmp_path / "nopack", **{"data.pack": False})
    task = SftTask(config)
    Trainer(config, progress=False, log=lambda _m: None, task=task)
    batch = task.batch(0, 4)
    assert batch.lengths is None and batch.input_ids.shape[0] == 4
    real = (batch.labels != IGNORE_INDEX).sum().item()
    assert real == batch.target_count()  # position 0 (the template's first token) never carries loss
    widths = [len(task.train[r[0]].ids) for r in (task.rows[int(task._order(0)[k])] for k in range(4))]
    assert max(widths) - min(widths) <= 2 and batch.input_ids.shape[1] == max(widths)
    # Deterministic from the position: the same call gives the same rows.
    assert torch.equal(task.batch(4, 4).input_ids, task.batch(4, 4).input_ids)


# -- datasets -----------------------------------------------------------------------------------------

def test_generated_splits_are_disjoint_deterministic_and_correct():
    from lmforge.tune.datasets import GENERATORS, make_dataset

    for name in [*GENERATORS, "mixed"]:
        splits = make_dataset(name, seed=3, sizes={"train": 150, "validation": 20, "test": 20})
        prompts = {s: {r["messages"][0]["content"] for r in rows} for s, rows in splits.items()}
        assert [len(prompts[s]) for s in ("train", "validation", "test")] == [150, 20, 20], name
        assert not (prompts["train"] & prompts["validation"]) and not (prompts["train"] & prompts["test"])
        assert not (prompts["validation"] & prompts["test"])
        assert splits == make_dataset(name, seed=3, sizes={"train": 150, "validation": 20, "test": 20})
    # Held-out items do not depend on how much training data is asked for.
    assert make_dataset("arithmetic", 0, {"train": 10})["test"] == make_dataset("arithmetic", 0, {"train": 500})["test"]
    for r in make_dataset("arithmetic", 1, {"train": 200})["train"]:
        expression = r["messages"][0]["content"].removeprefix("What is ").removesuffix("?")
        assert str(eval(expression, {})) == r["answer"]  # noqa: S307 - digits and one operator
    for r in make_dataset("json-extraction", 1, {"train": 50})["train"]:
        fields = json.loads(r["answer"])
        assert fields["name"] in r["messages"][0]["content"] and str(fields["age"]) in r["messages"][0]["content"]


def test_sentiment_set_is_stratified_and_bible_is_refused_clearly():
    from lmforge.tune.datasets import describe, make_dataset

    splits = make_dataset("sentiment")
    info = describe(splits)
    assert info["counts"] == {"train": 140, "validation": 20, "test": 40}
    assert info["class_balance"]["test"] == {"negative": 20, "positive": 20}
    texts = [{r["messages"][0]["content"] for r in rows} for rows in splits.values()]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2])
    import shutil

    if shutil.which("diatheke") is None:
        with pytest.raises(LmforgeError, match="sword-text"):
            make_dataset("bible-en-es")


# -- the command --------------------------------------------------------------------------------------

def _run(args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(LMFORGE + args, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_finetune_command_end_to_end(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    made = _run(["finetune", "data", "word-problems", "--out", str(data), "--train-size", "60",
                 "--validation-size", "6", "--test-size", "6"])
    assert made.returncode == 0, made.stderr
    out = tmp_path / "run"
    result = _run(["finetune", "sft-arithmetic", "--out", str(out), "--quiet", "--json",
                   "--model.init-from", str(tiny_model_dir), "--data.train", str(data / "train.jsonl"),
                   "--data.validation", str(data / "validation.jsonl"), "--train.max-steps", "4",
                   "--train.eval-interval", "2", "--train.save-interval", "2", "--schedule.warmup-steps", "1",
                   "--eval.exact-match-examples", "3", "--eval.max-new-tokens", "3", "--no-pack"])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["steps"] == 4 and report["data"]["kept"] == 60 and not report["data"]["packed"]
    assert [e["step"] for e in report["validation"]] == [2, 4]
    assert 0.0 <= report["validation"][-1]["exact_match"] <= 1.0
    model = Path(report["output"])
    assert (model / "model.safetensors").is_file() and "chat_template" in (model / "tokenizer_config.json").read_text()
    assert (out / "report.md").read_text().startswith("# Fine-tuning run")
    generated = _run(["generate", str(model), "--prompt", "What is 2 + 2?", "--max-tokens", "3", "--temperature",
                      "0", "--json"], timeout=120)
    assert generated.returncode == 0, generated.stderr
    scored = _run(["finetune", "eval", str(model), "--data", str(data / "test.jsonl"), "--max-new-tokens", "3",
                   "--json"], timeout=120)
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["examples"] == 6


# -- errors -------------------------------------------------------------------------------------------

def test_bad_input_errors(tokenizer, tmp_path, tiny_model_dir):
    from lmforge.tune.sft_data import encode_dataset, read_jsonl

    no_answer = [{"messages": [{"role": "user", "content": "hello?"}]}]
    with pytest.raises(LmforgeError, match="no record has an assistant turn"):
        encode_dataset(tokenizer, no_answer, max_len=64)
    with pytest.raises(LmforgeError, match="empty"):
        encode_dataset(tokenizer, [], max_len=64)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(LmforgeError, match="holds no records"):
        read_jsonl(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "completion": "b"}\n{not json\n')
    with pytest.raises(LmforgeError, match=r"broken.jsonl:2: not valid JSON"):
        read_jsonl(broken)
    with pytest.raises(LmforgeError, match="expected 'messages' or 'prompt'/'completion'"):
        messages_of({"text": "x"})
    with pytest.raises(LmforgeError, match="unknown role"):
        messages_of({"messages": [{"role": "narrator", "content": "x"}]})
    saved = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        with pytest.raises(LmforgeError, match="no chat template"):
            encode_dataset(tokenizer, [{"messages": CHAT}], max_len=64)
    finally:
        tokenizer.chat_template = saved
    unstable = "{% for m in messages|reverse %}{{ m['content'] }}|{% endfor %}"
    with pytest.raises(LmforgeError, match="prefix by prefix"):
        encode_chat(tokenizer, CHAT, chat_template=unstable)


@pytest.mark.slow
def test_bad_input_errors_on_the_command_line(tmp_path, tiny_model_dir):
    # One clear line and exit status 1, no traceback.
    result = _run(["finetune", "--data.train", str(tmp_path / "missing.jsonl"), "--data.generate", "null",
                   "--model.init-from", str(tiny_model_dir), "--out", str(tmp_path / "r")], timeout=120)
    assert result.returncode == 1 and "data file" in result.stderr and "does not exist" in result.stderr and "Traceback" not in result.stderr
    result = _run(["finetune", "--data.max-len", "500", "--data.seq-len", "128"], timeout=60)
    assert result.returncode == 1 and "must fit a packed row" in result.stderr
    result = _run(["finetune", "data", "no-such-set", "--out", str(tmp_path / "d")], timeout=60)
    assert result.returncode == 1 and "unknown dataset" in result.stderr


def test_peft_section_trains_an_adapter_and_checkpoints_the_merged_model(tiny_model_dir, arithmetic_dir, tmp_path):
    from lmforge.model.checkpoint import load_hf_model
    from lmforge.tune.peft import load_adapter
    from lmforge.tune.sft import finetune

    out = tmp_path / "lora"
    config = _config(tiny_model_dir, arithmetic_dir, out, **{
        "train.max_steps": 2, "train.eval_interval": 2, "train.save_interval": 2, "optim.lr": 1e-2,
        "eval.exact_match_examples": 0, "peft.method": "lora", "peft.target_modules": ["q_proj", "v_proj"]})
    report = finetune(config, progress=False, log=lambda _m: None)
    assert Path(report["output"]) == out / "adapter" and report["peft"] == "lora"
    adapted = load_adapter(load_hf_model(tiny_model_dir), out / "adapter")
    merged = load_hf_model(out / "checkpoints" / "step-0000002")  # a complete model, loadable as is
    base = load_hf_model(tiny_model_dir)
    ids = torch.tensor([[1, 20, 300, 4000, 5]])
    with torch.no_grad():
        assert torch.allclose(merged(ids), adapted(ids), atol=1e-5)
        assert (base(ids) - adapted(ids)).abs().max() > 1e-4  # the adapter learned something
    with pytest.raises(LmforgeError, match="not supported for adapter"):
        finetune(config, resume=True, progress=False, log=lambda _m: None)


@pytest.mark.slow
def test_ddp_two_processes_equal_one(tiny_model_dir, arithmetic_dir, tmp_path):
    """2 processes x 2 rows = 1 process x 4 rows: the token-mean loss divides by the answer tokens of
    the whole step on both processes, so the losses agree to float rounding."""
    from lmforge.tune.sft import finetune

    finetune(_config(tiny_model_dir, arithmetic_dir, tmp_path / "one", **{"train.max_steps": 3,
                                                                          "eval.exact_match_examples": 0}),
             progress=False, log=lambda _m: None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmforge"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(torchrun + [
        "finetune", "--quiet", "--out", str(tmp_path / "two"), "--model.init-from", str(tiny_model_dir),
        "--data.train", str(arithmetic_dir / "train.jsonl"), "--data.validation", str(arithmetic_dir / "validation.jsonl"),
        "--train.max-steps", "3", "--train.eval-interval", "3", "--train.save-interval", "3", "--train.batch-size", "2",
        "--train.distributed", "ddp", "--eval.exact-match-examples", "0", "--eval.loss-examples", "8",
        "--optim.lr", "1e-3", "--schedule.warmup-steps", "1", "--train.plots", "false"],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    assert _losses(tmp_path / "two", "val_loss", "eval")[3] == pytest.approx(_losses(tmp_path / "one", "val_loss", "eval")[3],
                                                                               rel=1e-5)


def test_shipped_sft_recipes_load_and_every_field_is_a_flag():
    from lmforge.cli.common import SHIPPED_RECIPES
    from lmforge.tune.sft import load_finetune_recipe, option_names

    recipes = sorted(SHIPPED_RECIPES.glob("sft-*.yaml"))
    assert len(recipes) >= 2
    for recipe in recipes:
        config = load_finetune_recipe(recipe)
        assert config.data.generate and config.train.out.startswith("runs/")
    assert {"data.pack", "data.chat_template", "eval.exact_match_examples", "peft.method", "train.max_steps"} \
        <= set(option_names())
    config = load_finetune_recipe(recipes[0], {"data.pack": False, "peft.method": "lora", "optim.lr": "2e-4"})
    assert not config.data.pack and config.peft_method == "lora" and config.optim.lr == pytest.approx(2e-4)
    with pytest.raises(LmforgeError, match="unknown field data.bogus"):
        load_finetune_recipe(None, {"data.bogus": 1})
    with pytest.raises(LmforgeError, match="unknown option --nosection"):
        load_finetune_recipe(None, {"nosection": 1})


def test_translation_records_are_scored_by_bleu_and_chrf(tokenizer, tiny_model_dir):
    import sacrebleu

    from lmforge.model.checkpoint import load_hf_model
    from lmforge.tune.sft import exact_match

    model = load_hf_model(tiny_model_dir)
    pairs = [("In the beginning was the Word.", "En el principio era el Verbo."),
             ("Jesus wept.", "Y lloró Jesús."), ("God is love.", "Dios es amor."), ("Pray always.", "Orad siempre.")]
    records = [{"messages": [{"role": "user", "content": f"Translate this verse into Spanish: {en}"},
                             {"role": "assistant", "content": es}], "answer": es, "task": "bible-en-es"}
               for en, es in pairs]
    scores = exact_match(model, tokenizer, records, max_new_tokens=6)
    outputs = [s["output"].strip() for s in scores["samples"]]
    references = [es for _, es in pairs]
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(outputs, [references]).score)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outputs, [references]).score)
    arithmetic = [{**r, "task": "arithmetic"} for r in records]
    assert "chrf" not in exact_match(model, tokenizer, arithmetic, max_new_tokens=2)
