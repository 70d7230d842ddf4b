"""``lmforge merge``: base + adapter -> a Hugging Face directory that transformers and `lmforge generate` load."""

from __future__ import annotations

import shutil

import pytest
import torch

from lmforge.cli import main
from lmforge.model.checkpoint import load_hf_model
from lmforge.tune.peft import PeftOptions, apply_peft, save_adapter

peft = pytest.importorskip("peft")
T = pytest.importorskip("transformers")


def tiny_tokenizer(directory):
    """A byte-level BPE of under 320 tokens (the tiny models' vocabulary), trained on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the capital of france is paris", "low rank adapters merge into weights"] * 20, trainer)
    tok.save(str(directory / "tokenizer.json"))


@pytest.fixture(scope="module")
def base_dir(tiny_hf_dirs, tmp_path_factory):
    path = tmp_path_factory.mktemp("merge-base") / "llama"
    shutil.copytree(tiny_hf_dirs["llama"][0], path)
    tiny_tokenizer(path)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("maker", ["lmforge", "peft"])
def test_merge_writes_a_directory_transformers_and_generate_load(maker, base_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    if maker == "lmforge":
        model = apply_peft(load_hf_model(base_dir), PeftOptions(method="lora", r=4, target_modules=["all-linear"], seed=0))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.2)
        save_adapter(model, adapter, base_model_name_or_path=base_dir)
    else:
        torch.manual_seed(2)
        made = peft.get_peft_model(T.AutoModelForCausalLM.from_pretrained(base_dir),
                                   peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "down_proj"],
                                                   init_lora_weights=False))
        with torch.no_grad():
            for n, p in made.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
        made.save_pretrained(adapter)
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()(
            input_ids=ids).logits
        base = T.AutoModelForCausalLM.from_pretrained(base_dir).eval()(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-2

    out = tmp_path / "merged"
    code, stdout, err = run(capsys, "merge", "--model", base_dir, "--adapter", adapter, "--out", out)
    assert code == 0, err
    assert "merged the lora adapter" in stdout and (out / "tokenizer.json").is_file()
    with torch.no_grad():
        merged = T.AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        ours = load_hf_model(out)(ids)
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    code, stdout, err = run(capsys, "generate", out, "--prompt", "the capital", "--max-tokens", "4",
                            "--temperature", "0", "--json")
    assert code == 0, err
    assert '"text"' in stdout

    code, _, err = run(capsys, "merge", "--model", base_dir, "--adapter", adapter, "--out", out)
    assert code == 1 and "already exists" in err


def test_merge_errors_are_one_line(base_dir, tiny_hf_dirs, tmp_path, capsys):
    adapter = tmp_path / "prefix"
    save_adapter(apply_peft(load_hf_model(base_dir), PeftOptions(method="prefix", num_virtual_tokens=2)), adapter)
    code, _, err = run(capsys, "merge", "--model", base_dir, "--adapter", adapter, "--out", tmp_path / "o")
    assert code == 1 and err.count("\n") == 1 and "cannot be merged" in err
    lora = tmp_path / "lora"
    save_adapter(apply_peft(load_hf_model(base_dir), PeftOptions(method="lora")), lora, base_model_name_or_path="org/a")
    code, _, err = run(capsys, "merge", "--model", base_dir, "--adapter", lora, "--out", tmp_path / "o")
    assert code == 1 and "is an adapter for org/a" in err
    code, _, err = run(capsys, "merge", "--model", tiny_hf_dirs["gpt2"][0], "--adapter", lora, "--out", tmp_path / "o",
                       "--ignore-base-name")
    assert code == 1 and "another base model" in err and err.count("\n") == 1
    code, _, err = run(capsys, "merge", "--model", base_dir, "--adapter", tmp_path / "none", "--out", tmp_path / "o")
    assert code == 1 and "no adapter_config.json" in err
    assert not (tmp_path / "o").exists()


def test_peft_options_are_flags():
    import argparse

    from lmforge.cli.common import add_config_flags, config_from_args

    parser = argparse.ArgumentParser()
    add_config_flags(parser, PeftOptions)
    args = parser.parse_args(["--peft", "qlora", "--lora-r", "16", "--lora-alpha", "32", "--rslora",
                              "--target-modules", "q_proj,k_proj", "v_proj", "--no-double-quant"])
    options = config_from_args(PeftOptions, args)
    assert (options.method, options.r, options.alpha, options.rslora) == ("qlora", 16, 32.0, True)
    assert options.target_modules == ["q_proj", "k_proj", "v_proj"] and options.double_quant is False
    assert config_from_args(PeftOptions, parser.parse_args([])) == PeftOptions()
    with pytest.raises(SystemExit):
        parser.parse_args(["--peft", "dora"])
