"""Readers and writers for the files tokenizers come in (tokenizer.json, GGUF metadata)."""
