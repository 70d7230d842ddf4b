"""What `lmforge serve` is configured by: its service policy and how it runs.

Both dataclasses are the one description of the server's settings: `create_app` takes a
`ServeSettings`, and `lmforge serve` generates a flag from every field of both. This
module imports nothing heavy, so building the command line stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.options import option

# AnswerOptions.mode's choices (lmforge/rag/config.py), repeated here so that building the
# command line does not import the retrieval stack; a test keeps the two equal.
RAG_ANSWER_MODES = ("auto", "generate", "extractive")
# lmforge/infer/speculative.py's METHODS and "none", for the same reason (tests/test_speculative.py checks).
SPECULATIVE_METHODS = ("none", "ngram", "draft", "layers")


def parse_adapter_flag(text: str) -> tuple[str, str]:
    """``NAME=PATH`` of --adapter -> (NAME, PATH); NAME is what clients send as the model."""
    from lmforge.errors import LmforgeError

    name, sep, path = text.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise LmforgeError(f"--adapter takes NAME=PATH, got {text!r}")
    if ":" in name or any(c.isspace() for c in name):
        raise LmforgeError(f"adapter name {name!r} may not contain ':' or spaces (clients send NAME or BASE:NAME)")
    return name, path


@dataclass
class ServeSettings:
    """Service policy: who may call, how much, and what is logged."""

    api_keys: list[str] = option(default_factory=list, flag="--api-key", repeat=True, metavar="KEY",
                                 help="accepted API key (repeatable; also LMFORGE_API_KEYS, comma-separated); "
                                      "required when binding to a non-loopback address; none: no authentication")
    rate_limit_per_minute: int = option(0, flag="--rate-limit", help="requests per minute per API key (0 = unlimited)")
    max_request_bytes: int = option(1 << 20, help="largest request body accepted")
    max_tokens_limit: int = option(4096, help="largest max_tokens a client may ask for")
    log_prompts: bool = option(False, help="include prompt text in request logs (never logged otherwise)")
    # The address the server is bound to: a name or address given there is a valid Host
    # header, besides the loopback names.
    host: str = option("127.0.0.1", help="address to bind; a loopback address serves this machine only")
    # Checked against the Host header while no API key is set, so a web page cannot reach
    # a loopback server through DNS rebinding; "*" accepts any.
    allowed_hosts: list[str] = option(default_factory=list, flag="--allow-host", repeat=True, metavar="NAME",
                                      help="another host name clients reach this server by, accepted in the Host "
                                           "header of unauthenticated requests (repeatable; * = any)")
    # POST /v1/embeddings. The model is loaded on the first embeddings request (not at
    # start), so a server that never embeds never holds it; the name is checked at start.
    embedding_model: str = option("auto", metavar="MODEL",
                                  help="model for /v1/embeddings: a registered name or a sentence-transformers/BERT "
                                       "directory; auto: all-minilm-l6-v2 when its package is installed; none: no "
                                       "embeddings")
    embedding_max_inputs: int = option(2048, help="most inputs in one embeddings request (OpenAI's limit)")
    embedding_max_tokens: int = option(65536, help="most tokens in one embeddings request, all inputs together")
    # Retrieval-augmented chat: /v1/chat/completions answers the last user message from this
    # index, with numbered sources (see rag.py). Opened, and checked, when the server starts.
    rag: str | None = option(None, metavar="INDEX",
                             help="answer chat requests from a knowledge base: an index made by `lmforge rag index` "
                                  "(a .sqlite file or a postgresql:// URL), or handbook for lmforge's own handbook "
                                  "(indexed on first use); a request sends \"rag\": false to talk to the bare model")
    rag_answer: str = option("auto", choices=RAG_ANSWER_MODES,
                             help="how --rag answers are made: auto and generate let the served model write and keep "
                                  "the sentences the sources support (else quote the sources); extractive quotes the "
                                  "sources' own sentences")

    def __post_init__(self) -> None:
        from lmforge.errors import LmforgeError

        if self.embedding_max_inputs < 1 or self.embedding_max_tokens < 1:
            raise LmforgeError("--embedding-max-inputs and --embedding-max-tokens must be >= 1")
        if self.rag_answer not in RAG_ANSWER_MODES:
            raise LmforgeError(f"--rag-answer must be one of {', '.join(RAG_ANSWER_MODES)}, got {self.rag_answer!r}")
        if self.rag is not None and not self.rag.strip():
            raise LmforgeError("--rag needs an index: a file, a postgresql:// URL or handbook")


@dataclass
class SpeculativeOptions:
    """Speculative decoding (lmforge/infer/speculative.py) for `lmforge generate` and `lmforge serve`.

    A step with a single running request lets a drafter guess the next tokens and checks
    them with one forward of the model; the output is what plain decoding gives (greedy:
    the same tokens; sampling: the same distribution).
    """

    speculative: str = option("none", choices=SPECULATIVE_METHODS,
                              help="ngram: guess by looking the last tokens up in the prompt and answer so far; "
                                   "draft: a small model sharing the tokenizer (--draft-model); layers: the model's "
                                   "own first layers (--draft-layers); none: plain decoding")
    draft_model: str | None = option(None, metavar="PATH", help="the draft model of --speculative draft: a name or "
                                                                "directory (e.g. a student made by lmforge distill)")
    num_draft_tokens: int = option(4, help="tokens guessed per step")
    draft_layers: int = option(0, help="layers in the --speculative layers draft (0 = a quarter of the model's)")

    def __post_init__(self) -> None:
        from lmforge.errors import LmforgeError

        if self.speculative not in SPECULATIVE_METHODS:
            raise LmforgeError(f"--speculative must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.speculative!r}")
        if self.num_draft_tokens < 1 or self.draft_layers < 0:
            raise LmforgeError("--num-draft-tokens must be >= 1 and --draft-layers >= 0")
        if (self.speculative == "draft") != bool(self.draft_model):
            raise LmforgeError("--speculative draft needs --draft-model PATH, and --draft-model needs "
                               "--speculative draft")


@dataclass
class ServeRuntime:
    """How the server runs: its port, the decode batch, the caches and the chat database."""

    port: int = option(8000, help="TCP port")
    max_batch: int = option(16, help="requests decoded together (KV-cache rows)")
    max_waiting: int = option(64, help="requests queued beyond the batch before answering 429")
    max_seq_len: int | None = option(None, help="tokens per request, prompt included (default: the model's "
                                                "context, at most 4096)")
    prefix_cache_mb: float = option(128.0, help="memory for keys/values of prompt prefixes seen before, reused by "
                                                "later requests that start the same way (0 = off); with "
                                                "--kv-cache paged any positive value turns it on and the "
                                                "prefixes share the KV blocks, whose unused ones are given back "
                                                "when requests need them")
    prefill_chunk: int = option(256, metavar="TOKENS",
                                help="prefill prompts longer than this in chunks of at most this many tokens (while "
                                     "others stream, about one decode step's worth), between the decode steps of "
                                     "running requests, so their streams keep their pace (0 = off)")
    kv_cache: str = option("contiguous", choices=("contiguous", "paged"),
                           help="contiguous: every request reserves --max-seq-len positions of KV cache; paged: "
                                "blocks of --kv-block-size positions claimed as a request grows, so the same "
                                "memory holds more requests (the newest is preempted and recomputed later if "
                                "blocks run out)")
    kv_block_size: int = option(16, metavar="TOKENS", help="positions per block of the paged KV cache")
    kv_memory_mb: float = option(0.0, metavar="MB",
                                 help="memory for the KV cache (0 = --max-batch rows of --max-seq-len): a "
                                      "contiguous cache gets the rows that fit (at most --max-batch), a paged one "
                                      "the blocks that fit, shared by up to --max-batch requests")
    # LoRA adapters served beside the base model, each picked by a request's model name
    # (NAME or BASE:NAME); rows of different adapters share every batch step.
    adapters: list[str] = option(default_factory=list, flag="--adapter", repeat=True, metavar="NAME=PATH",
                                 help="serve a LoRA adapter (a PEFT directory: adapter_config.json + "
                                      "adapter_model.safetensors) as model NAME beside the base (repeatable)")
    db: str = option("lmforge-serve.db", metavar="PATH",
                     help="SQLite file keeping the web chat's conversations and feedback, created if missing")
    vlm: str | None = option(None, metavar="CHECKPOINT",
                             help="also answer chat requests that carry an image (a data: URL image_url part) with "
                                  "this captioning or VQA checkpoint (lmforge vlm train --task caption|vqa)")
    translator: str | None = option(None, metavar="MODEL_DIR",
                                    help="also serve this encoder-decoder model (T5, Marian or BART directory with "
                                         "tokenizer.json, e.g. OUT/model of lmforge translate train): requests naming "
                                         "it (the folder's name, or OUT's for OUT/model) as their model get the "
                                         "translation of their text")
    translator_beams: int = option(4, metavar="N", help="beam width of --translator (1 = greedy; default 4)")

    def __post_init__(self) -> None:
        from lmforge.errors import LmforgeError

        if self.max_batch < 1 or self.max_waiting < 0 or self.prefix_cache_mb < 0 or self.prefill_chunk < 0:
            raise LmforgeError("--max-batch must be >= 1, --max-waiting, --prefix-cache-mb and --prefill-chunk >= 0")
        if self.kv_cache not in ("contiguous", "paged"):
            raise LmforgeError(f"--kv-cache must be contiguous or paged, got {self.kv_cache!r}")
        if self.kv_block_size < 1 or self.kv_memory_mb < 0:
            raise LmforgeError("--kv-block-size must be >= 1 and --kv-memory-mb >= 0")
        if not 0 <= self.port <= 65535:
            raise LmforgeError(f"--port must be in 0..65535, got {self.port}")
        names = [parse_adapter_flag(a)[0] for a in self.adapters]  # malformed flags fail before the model loads
        for name in names:
            if names.count(name) > 1:
                raise LmforgeError(f"--adapter name {name!r} given twice")
