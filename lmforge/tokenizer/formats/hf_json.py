"""Hugging Face tokenizer files: ``tokenizer.json`` and the ``tokenizer_config.json`` beside it.

``tokenizer.json`` describes the pipeline (normalizer, pre-tokenizer, model, post-processor,
decoder, added tokens). ``tokenizer_config.json`` adds what transformers keeps outside it:
the chat template, which added tokens are BOS/EOS/PAD, and the ``add_bos_token`` flag.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.io.atomic import write_json_atomic
from lmforge.tokenizer.added_tokens import AddedToken
from lmforge.tokenizer.bpe import BPE
from lmforge.tokenizer.decoders import decoder_from_dict
from lmforge.tokenizer.normalizers import normalizer_from_dict
from lmforge.tokenizer.padding import Padding, Truncation
from lmforge.tokenizer.pretokenize import pre_tokenizer_from_dict
from lmforge.tokenizer.processors import post_processor_from_dict, template_processing
from lmforge.tokenizer.tokenizer import Tokenizer


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise LmforgeError(f"tokenizer file not found: {path}") from None
    except IsADirectoryError:
        raise LmforgeError(f"{path} is a directory; expected a tokenizer JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"{path} is not valid JSON: {exc}") from None


def _model_from_dict(spec: dict[str, Any]) -> BPE:
    kind = spec.get("type") or ("BPE" if "merges" in spec else None)
    if kind in ("WordPiece", "Unigram"):
        from lmforge.tokenizer.train.models import model_from_dict

        return model_from_dict(spec)  # type: ignore[return-value]
    if kind != "BPE":
        raise LmforgeError(
            f"unsupported tokenizer model type {kind!r}: lmforge reads BPE, WordPiece and Unigram tokenizers "
            "(GPT-2, Llama, Qwen, Mistral, SmolLM style)"
        )
    merges: list[tuple[str, str]] = []
    for rank, m in enumerate(spec.get("merges", [])):
        if isinstance(m, str):
            parts = m.split(" ")
            if len(parts) != 2:
                raise LmforgeError(f"merge #{rank + 1} {m!r} is not two space-separated tokens")
            merges.append((parts[0], parts[1]))
        else:
            merges.append((m[0], m[1]))
    return BPE(
        dict(spec.get("vocab", {})),
        merges,
        byte_fallback=bool(spec.get("byte_fallback", False)),
        unk_token=spec.get("unk_token"),
        fuse_unk=bool(spec.get("fuse_unk", False)),
        ignore_merges=bool(spec.get("ignore_merges", False)),
        continuing_subword_prefix=spec.get("continuing_subword_prefix"),
        end_of_word_suffix=spec.get("end_of_word_suffix"),
        dropout=spec.get("dropout"),
    )


def tokenizer_from_dict(data: dict[str, Any], **extra: Any) -> Tokenizer:
    """Build a Tokenizer from parsed tokenizer.json content (``extra``: constructor options)."""
    if not isinstance(data, dict) or "model" not in data:
        raise LmforgeError("tokenizer.json has no 'model' section; is this a Hugging Face tokenizer file?")
    try:
        model = _model_from_dict(data["model"])
        added = [AddedToken.from_dict(t) for t in data.get("added_tokens") or []]
        return Tokenizer(
            model,
            normalizer=normalizer_from_dict(data.get("normalizer")),
            pre_tokenizer=pre_tokenizer_from_dict(data.get("pre_tokenizer")),
            decoder=decoder_from_dict(data.get("decoder")),
            post_processor=post_processor_from_dict(data.get("post_processor")),
            added_tokens=added,
            truncation=Truncation.from_dict(data.get("truncation")),
            padding=Padding.from_dict(data.get("padding")),
            **extra,
        )
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise LmforgeError(f"malformed tokenizer.json: {type(exc).__name__}: {exc}") from None


def load_tokenizer_json(path: Path) -> Tokenizer:
    """``Tokenizer.from_file``."""
    return tokenizer_from_dict(_read_json(path))


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as serialized AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_from_dir(directory: Path, config: dict[str, Any]) -> str | None:
    """The default template: chat_template.jinja, chat_template.json or tokenizer_config."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template: Any = config.get("chat_template")
    json_file = directory / "chat_template.json"
    if template is None and json_file.is_file():
        template = _read_json(json_file).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def load_pretrained_dir(directory: Path) -> Tokenizer:
    """``Tokenizer.from_pretrained_dir``: tokenizer.json + tokenizer_config.json + friends."""
    if not directory.is_dir():
        raise LmforgeError(f"model directory not found: {directory}")
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise LmforgeError(f"{directory} has no tokenizer.json")
    data = _read_json(tokenizer_file)

    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later wins
        path = directory / name
        if path.is_file():
            loaded = _read_json(path)
            if isinstance(loaded, dict):
                config.update(loaded)

    extra_eos: list[int] = []
    generation_config = directory / "generation_config.json"
    if generation_config.is_file():
        eos = _read_json(generation_config).get("eos_token_id")
        extra_eos = [eos] if isinstance(eos, int) else [e for e in eos or [] if isinstance(e, int)]

    tok = tokenizer_from_dict(
        data,
        bos_token=_token_content(config.get("bos_token")),
        eos_token=_token_content(config.get("eos_token")),
        pad_token=_token_content(config.get("pad_token")),
        unk_token=_token_content(config.get("unk_token")) or data["model"].get("unk_token"),
        chat_template=_chat_template_from_dir(directory, config),
        extra_eos_ids=extra_eos,
        add_bos_token=config.get("add_bos_token"),
        add_eos_token=config.get("add_eos_token"),
    )
    # transformers replaces the post-processor when the config states add_bos/add_eos (or
    # when there is none), so AutoTokenizer and lmforge agree only if we do the same.
    if "add_bos_token" in config or "add_eos_token" in config or data.get("post_processor") is None:
        tok.post_processor = _bos_eos_processor(tok, bool(config.get("add_bos_token")),
                                                bool(config.get("add_eos_token")))
    return tok


def _bos_eos_processor(tok: Tokenizer, add_bos: bool, add_eos: bool):  # type: ignore[no-untyped-def]
    bos = (tok.bos_token, tok.bos_id) if add_bos and tok.bos_id is not None else None
    eos = (tok.eos_token, tok.eos_id) if add_eos and tok.eos_id is not None else None
    return template_processing(bos, eos)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- saving
def tokenizer_to_dict(tok: Tokenizer) -> dict[str, Any]:
    """The tokenizer.json content for ``tok``."""
    return {
        "version": "1.0",
        "truncation": tok.truncation.to_dict() if tok.truncation else None,
        "padding": tok.padding.to_dict() if tok.padding else None,
        "added_tokens": [t.to_dict() for t in tok.added_tokens],
        "normalizer": tok.normalizer.to_dict() if tok.normalizer else None,
        "pre_tokenizer": tok.pre_tokenizer.to_dict() if tok.pre_tokenizer else None,
        "post_processor": tok.post_processor.spec,
        "decoder": tok.decoder.to_dict() if tok.decoder else None,
        "model": tok.model.to_dict(),
    }


def tokenizer_config(tok: Tokenizer) -> dict[str, Any]:
    """The tokenizer_config.json content transformers' PreTrainedTokenizerFast reads."""
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tok, key)
        if value is not None:
            config[key] = value
    for key in ("add_bos_token", "add_eos_token"):
        value = getattr(tok, key)
        if value is not None:
            config[key] = value
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    return config


def save_pretrained_dir(tok: Tokenizer, directory: Path) -> None:
    """``Tokenizer.save``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LmforgeError(f"cannot create {directory}: {exc.strerror}") from None
    config = tokenizer_config(tok)
    special_map = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in config}
    try:
        write_json_atomic(directory / "tokenizer.json", tokenizer_to_dict(tok))
        write_json_atomic(directory / "tokenizer_config.json", config)
        write_json_atomic(directory / "special_tokens_map.json", special_map)
    except OSError as exc:
        raise LmforgeError(f"cannot save the tokenizer to {directory}: {exc.strerror or exc}") from None
