"""The `lmforge` command: bad input gives one clear line and a non-zero exit; convert round-trips."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lmforge.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "no-such-model", "--prompt", "hi"], "unknown model 'no-such-model'"),
        (["generate", "/nonexistent/model.gguf", "--prompt", "hi"], "no such file or directory"),
        (["info", "/nonexistent/dir/"], "no such file or directory"),
        (["generate", "--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
        (["generate", "--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["generate", "--prompt", "hi", "--weights", "q4", "--prefill", "int8"], "is a CPU path for float weights"),
        (["generate", "--prompt", "hi", "--dtype", "bfloat16", "--prefill", "int8"], "beside float32 weights"),
    ],
)
def test_user_errors_are_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("lmforge: error: ")
    assert message in err
    assert "Traceback" not in err


def test_corrupt_gguf(capsys, tmp_path, default_lm):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(default_lm.spec.path.read_bytes()[: 1 << 20])  # a truncated download
    code, _, err = run_cli(capsys, "generate", str(bad), "--prompt", "hi")
    assert code == 1 and err.startswith("lmforge: error: ") and err.count("\n") == 1
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    code, _, err = run_cli(capsys, "info", str(junk))
    assert code == 1 and "GGUF" in err


def test_directory_without_config(capsys, tmp_path):
    code, _, err = run_cli(capsys, "info", str(tmp_path))
    assert code == 1 and "config.json" in err


def test_prompt_longer_than_context(capsys, tiny_hf_dirs, tmp_path):
    from lmforge.errors import LmforgeError
    from lmforge.infer import Generator, SamplingParams
    from lmforge.model.checkpoint import load_hf_model

    gen = Generator(load_hf_model(tiny_hf_dirs["llama"][0]))  # context: 128 positions
    with pytest.raises(LmforgeError, match="prompt has 200 tokens but the model's context holds 128"):
        gen.generate([list(range(3, 203))], SamplingParams(max_tokens=4))
    # A prompt that fits is cut short by the context, not by an error.
    done = gen.generate([list(range(3, 126))], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert done.completion_tokens == 5 and done.finish_reason == "length"


@pytest.mark.slow  # a subprocess that loads the default model and tokenizes 9,000 words (~10 s)
def test_cli_prompt_longer_than_context_exits_nonzero():
    out = subprocess.run(
        [sys.executable, "-m", "lmforge", "generate", "--prompt", "word " * 9000, "--max-tokens", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 1
    assert "context holds 8192" in out.stderr and "Traceback" not in out.stderr


def test_models_lists_default(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "smollm2-135m-instruct (default)" in out


def test_info_reports_parameters_and_memory(capsys):
    code, out, _ = run_cli(capsys, "info", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["parameters"] == 134_515_008
    assert info["weight_bytes"]["float32"] == 134_515_008 * 4
    # 2 (k, v) x 30 layers x 3 kv heads x 64 dims x 4 bytes
    assert info["kv_cache_bytes_per_token"]["float32"] == 2 * 30 * 3 * 64 * 4


def test_info_of_an_encoder_has_no_kv_cache(capsys, minilm_dir):
    code, out, _ = run_cli(capsys, "info", "all-minilm-l6-v2")
    assert code == 0
    # BertModel counts 22,713,216 with its pooler, which sentence embeddings do not use (nor load)
    assert "parameters: 22,565,376" in out and "KV cache: none" in out


@pytest.mark.slow
def test_convert_default_model_loads_in_transformers(capsys, tmp_path, default_lm, hf_default_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, out, err = run_cli(capsys, "convert", "smollm2-135m-instruct", str(tmp_path / "hf"))
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Converted checkpoints must give the same logits."
    ids = torch.tensor([default_lm.tokenizer.encode(text)])
    assert tok(text).input_ids == ids[0].tolist()
    with torch.no_grad():
        assert (model(ids).logits - hf_default_model(ids).logits).abs().max().item() <= 1e-4
    # Converting again onto an existing directory is refused, and leaves it intact.
    code, _, err = run_cli(capsys, "convert", "smollm2-135m-instruct", str(tmp_path / "hf"))
    assert code == 1 and "already exists" in err
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    # The converted directory is itself a model lmforge can load.
    code, out, _ = run_cli(capsys, "info", str(tmp_path / "hf"), "--json")
    assert code == 0 and json.loads(out)["parameters"] == 134_515_008


def test_building_the_parser_loads_no_heavy_module():
    # Flags are generated from configuration dataclasses; those live apart from the code
    # that uses them, so `lmforge --help` (and every command's start) stays fast.
    import subprocess
    import sys

    code = ("import sys; from lmforge.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'jinja2', 'fastapi', 'transformers') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"


@pytest.mark.slow  # loads the default model a second time (the CLI's own load)
def test_generate_with_beam_search(capsys, default_lm):
    from lmforge.cli.generate import beam_generate
    from lmforge.infer.beam import BeamParams, DecoderStepper, beam_search

    code, out, err = run_cli(capsys, "generate", "--prompt", "The capital of France is", "--num-beams", "3",
                             "--max-tokens", "6", "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["num_beams"] == 3 and got["completion_tokens"] == 6 and got["finish_reason"] == "length"
    # the same search run by hand on the session's model
    ids = default_lm.tokenizer.encode("The capital of France is")
    best = beam_search(DecoderStepper(default_lm.model, torch.tensor([ids]), 3, 6), 1, BeamParams(3, 6), [-1])[0]
    assert got["text"] == default_lm.tokenizer.decode(best.tokens)
    assert abs(got["score"] - best.score) < 1e-4
    assert beam_generate(default_lm, "The capital of France is", 1, 6, 1.0, False)["completion_tokens"] == 6
    for argv, message in ((["--num-beams", "0"], "--num-beams must be at least 1"),
                          (["--num-beams", "2", "--speculative", "ngram"], "drop --speculative")):
        code, _, err = run_cli(capsys, "generate", "--prompt", "hi", *argv)
        assert code == 1 and message in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:  # argparse's own usage error
        main(["generate", "--prompt", "hi", "--num-beams", "2", "--early-stopping", "sometimes"])
    assert exit_.value.code == 2 and "expected true, false or never" in capsys.readouterr().err
