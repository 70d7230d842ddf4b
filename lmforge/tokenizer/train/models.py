"""Build the WordPiece and Unigram models from their tokenizer.json ``model`` sections."""

from __future__ import annotations

from typing import Any

from lmforge.errors import LmforgeError


def model_from_dict(spec: dict[str, Any]) -> Any:
    kind = spec.get("type")
    if kind == "WordPiece":
        from lmforge.tokenizer.train.wordpiece import WordPieceModel

        vocab = spec.get("vocab")
        if not isinstance(vocab, dict):
            raise LmforgeError("malformed tokenizer.json: a WordPiece model needs a vocab object")
        return WordPieceModel(dict(vocab), spec.get("unk_token", "[UNK]"), spec.get("continuing_subword_prefix", "##"),
                              int(spec.get("max_input_chars_per_word", 100)))
    if kind == "Unigram":
        from lmforge.tokenizer.train.unigram import UnigramModel

        vocab = spec.get("vocab")
        if not isinstance(vocab, list) or not all(isinstance(v, list) and len(v) == 2 for v in vocab):
            raise LmforgeError("malformed tokenizer.json: a Unigram model needs a vocab list of [piece, score]")
        unk_id = spec.get("unk_id")
        if unk_id is not None and not 0 <= int(unk_id) < len(vocab):
            raise LmforgeError(f"malformed tokenizer.json: unk_id {unk_id} is outside the vocabulary")
        return UnigramModel([(p, float(s)) for p, s in vocab], None if unk_id is None else int(unk_id),
                            bool(spec.get("byte_fallback", False)))
    raise LmforgeError(f"unsupported tokenizer model type {kind!r}")
