"""An encoder-decoder translator in the OpenAI API: `lmforge serve --translator MODEL_DIR`.

The server's scheduler decodes decoder-only models; an encoder-decoder model (T5, Marian,
BART, or the Bible translator `lmforge translate train` writes) is served beside it. A chat
or completions request whose ``model`` names the translator is answered by it: a chat
request translates its last user message, a completions request its prompt (one string);
greedy decoding, or beam search with the server's ``--translator-beams``. Every other
request goes on to the language model's routes unchanged.

Requests are translated one at a time (a lock around the model; the model is small and a
request takes tens of milliseconds). ``stream: true`` is answered in the streaming format
with the whole translation in one delta, as the text exists only when the search ends.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..errors import LmforgeError
from .errors import APIError
from .protocol import ChatCompletionRequest, CompletionRequest
from .state import server_state


class Translator:
    """A loaded encoder-decoder model and its tokenizer, translating one request at a time."""

    def __init__(self, path: str, name: str | None = None, num_beams: int = 4) -> None:
        from ..model.seq2seq_io import load_seq2seq
        from ..tokenizer import Tokenizer

        directory = Path(path)
        if num_beams < 1:
            raise LmforgeError("--translator-beams must be at least 1")
        self.model = load_seq2seq(directory)
        if not (directory / "tokenizer.json").is_file():
            raise LmforgeError(f"{directory} has no tokenizer.json: the translator needs its tokenizer")
        self.tokenizer = Tokenizer.from_pretrained_dir(directory)
        resolved = directory.resolve()
        # `lmforge translate train` writes OUT/model: the run's folder names it better than "model"
        self.name = name or (resolved.parent.name if resolved.name == "model" else resolved.name)
        self.num_beams = num_beams
        self.lock = threading.Lock()

    def translate(self, text: str, max_tokens: int | None) -> tuple[str, int, int, str]:
        """(translation, source tokens, output tokens, finish reason) of one text."""
        from ..tune.translation import encode_side, translate_texts

        limit = max(1, min(max_tokens or 128, 512))
        with self.lock:
            source = encode_side(self.tokenizer, [text], self.model.config.max_position_embeddings,
                                 self.model.config.eos_token_id)[0]
            out = translate_texts(self.model, self.tokenizer, [text], num_beams=self.num_beams,
                                  max_new_tokens=limit)[0]
        produced = len(self.tokenizer.encode(out, add_special_tokens=False))
        return out, len(source), produced, "length" if produced >= limit else "stop"


def _chat_text(body: ChatCompletionRequest) -> str:
    users = [m for m in body.messages if m.role == "user"]
    if not users:
        raise APIError(400, "a translation request needs a user message holding the text", param="messages")
    content = users[-1].content
    if isinstance(content, list):
        if any(isinstance(p, dict) and p.get("type") != "text" for p in content):
            raise APIError(400, "the translator reads text parts only", param="messages")
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    if not isinstance(content, str) or not content.strip():
        raise APIError(400, "the user message to translate is empty", param="messages")
    return content


def _stream(chunks: list[dict]) -> StreamingResponse:
    async def events():
        for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def translator_router(translator: Translator) -> APIRouter:
    """/v1/chat/completions and /v1/completions in front of the language model's: requests that
    name the translator as their model go to it."""
    from . import routes

    router = APIRouter()

    async def run(text: str, max_tokens: int | None) -> tuple[str, int, int, str]:
        try:
            return await asyncio.to_thread(translator.translate, text, max_tokens)
        except LmforgeError as exc:
            raise APIError(400, str(exc)) from None

    def check(body) -> None:
        if body.n != 1:
            raise APIError(400, "the translator returns one choice: n must be 1", param="n")

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.model != translator.name:
            return await routes.chat_completions(body, request, server_state(request))
        check(body)
        text, prompt_tokens, completion_tokens, finish = await run(
            _chat_text(body), body.max_completion_tokens or body.max_tokens)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if body.stream:
            base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": translator.name}
            return _stream([
                {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
                {**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]},
                {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
            ])
        return {"id": ident, "object": "chat.completion", "created": created, "model": translator.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish}], "usage": usage}

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.model != translator.name:
            return await routes.completions(body, request, server_state(request))
        check(body)
        if not isinstance(body.prompt, str) or not body.prompt.strip():
            raise APIError(400, "the translator takes one prompt string to translate", param="prompt")
        if body.echo or body.logprobs is not None:
            raise APIError(400, "the translator returns text only: echo and logprobs are not supported",
                           param="logprobs" if body.logprobs is not None else "echo")
        text, prompt_tokens, completion_tokens, finish = await run(body.prompt, body.max_tokens)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            base = {"id": ident, "object": "text_completion", "created": created, "model": translator.name}
            return _stream([{**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]},
                            {**base, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": finish}]}])
        return {"id": ident, "object": "text_completion", "created": created, "model": translator.name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    return router
