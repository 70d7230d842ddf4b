"""POST /v1/embeddings: OpenAI's embeddings API over lmforge's `Embedder`.

Request: ``input`` is a string, a list of strings, one text as a list of token ids, or
several as lists of ids (ids of the embedding model's own tokenizer, without the special
tokens it adds itself); ``encoding_format`` is ``float`` or ``base64`` (the raw
little-endian float32 bytes, what the official client asks for by default);
``dimensions``, when given, must equal the model's (lmforge does not shorten vectors).

Limits, answered with a 400 and OpenAI's error body: an empty input, more than
`ServeSettings.embedding_max_inputs` inputs, more than `embedding_max_tokens` tokens in
all, and any one input longer than the model reads (``Embedder.max_tokens``): OpenAI
refuses over-long inputs instead of cutting them, and so does lmforge, so a client never
gets a vector of text it did not know was dropped.

The model loads on the first request, in a worker thread, and every computation runs
there one at a time, so the event loop (and the chat routes) never wait on it.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.metadata
import threading
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from ..errors import LmforgeError
from ..model.registry import DEFAULT_EMBEDDING_MODEL, REGISTRY, resolve
from .config import ServeSettings
from .errors import APIError
from .protocol import EmbeddingRequest
from .state import ServerState, server_state

router = APIRouter()
State = Annotated[ServerState, Depends(server_state)]


class EmbeddingModel:
    """The server's embedding model by name, loaded on first use (thread-safe)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._embedder = None
        self._lock = threading.Lock()

    def run(self, work):
        """`work(embedder)` with the model loaded, one call at a time."""
        with self._lock:
            if self._embedder is None:
                from ..rag.embedder import load_embedder

                try:
                    self._embedder = load_embedder(self.name)
                except LmforgeError as exc:
                    raise APIError(503, f"the embedding model {self.name!r} could not be loaded: {exc}",
                                   "server_error") from None
            return work(self._embedder)


def embedding_model_from(settings: ServeSettings) -> EmbeddingModel | None:
    """The model `settings.embedding_model` names, checked now (a bad name fails at start)."""
    name = settings.embedding_model.strip()
    if name.lower() == "none":
        return None
    if name.lower() == "auto":
        try:
            importlib.metadata.distribution(REGISTRY[DEFAULT_EMBEDDING_MODEL].package)
        except importlib.metadata.PackageNotFoundError:
            return None
        name = DEFAULT_EMBEDDING_MODEL
    spec = resolve(name)
    if spec.format != "hf":
        raise LmforgeError(f"--embedding-model {name}: a {spec.format} file is no embedding model (give a "
                           "sentence-transformers or BERT directory, or a registered embedding model)")
    return EmbeddingModel(name)


def _inputs(body: EmbeddingRequest) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token-id lists), with `input`'s four shapes told apart."""
    value = body.input
    if isinstance(value, str):
        return [value], None
    if not value:
        raise APIError(400, "input must not be empty", param="input")
    if all(isinstance(v, str) for v in value):
        return list(value), None
    if all(isinstance(v, int) for v in value):
        return None, [list(value)]
    return None, [list(v) for v in value]


def _encode_base64(vector) -> str:
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, state: State):
    service = state.embeddings
    if service is None:
        raise APIError(404, "this server has no embedding model (start it with --embedding-model MODEL)",
                       "not_found_error", "model", "model_not_found")
    if body.model not in (None, "", service.name):
        raise APIError(404, f"model {body.model!r} does not exist; this server embeds with {service.name!r}",
                       "not_found_error", "model", "model_not_found")
    texts, token_lists = _inputs(body)
    settings = state.settings
    count = len(texts if texts is not None else token_lists)
    if count > settings.embedding_max_inputs:
        raise APIError(400, f"{count} inputs in one request; at most {settings.embedding_max_inputs}", param="input")

    def work(embedder) -> tuple[Any, int]:
        if body.dimensions is not None and body.dimensions != embedder.dim:
            raise APIError(400, f"{service.name} makes {embedder.dim}-dimensional vectors; dimensions must be "
                                f"{embedder.dim} or omitted", param="dimensions")
        vocab = embedder.model.config.vocab_size
        if token_lists is not None:
            ids = token_lists
            for i, seq in enumerate(ids):
                if not all(0 <= t < vocab for t in seq):
                    raise APIError(400, f"input[{i}] holds token ids outside the vocabulary (0..{vocab - 1})",
                                   param="input")
        else:
            try:
                ids = [embedder.tokenizer.encode(t, add_special_tokens=False) for t in texts]
            except LmforgeError as exc:
                raise APIError(400, str(exc), param="input") from None
        total = 0
        for i, seq in enumerate(ids):
            if not seq:
                raise APIError(400, f"input[{i}] is empty", param="input")
            if len(seq) > embedder.max_tokens:
                raise APIError(400, f"input[{i}] has {len(seq)} tokens; {service.name} reads at most "
                                    f"{embedder.max_tokens} (shorten or split it)", param="input")
            total += len(seq)
        if total > settings.embedding_max_tokens:
            raise APIError(400, f"{total} tokens in one request; at most {settings.embedding_max_tokens}",
                           param="input")
        return embedder.encode_ids(ids), total

    try:
        vectors, tokens = await asyncio.get_running_loop().run_in_executor(None, service.run, work)
    except LmforgeError as exc:  # the model's own checks, or a model that does not load
        raise APIError(400, str(exc), param="input") from None
    encode = _encode_base64 if body.encoding_format == "base64" else (lambda v: v.tolist())
    # A JSONResponse is serialized by json.dumps directly: FastAPI's encoder would walk
    # every float of every vector in Python first.
    return JSONResponse({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
        "model": service.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
