"""Images in the chat API: `lmforge serve --vlm CHECKPOINT`.

OpenAI's chat format carries an image as a content part of a user message:

    {"role": "user", "content": [{"type": "text", "text": "how many red shapes are there?"},
                                 {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}

A request that holds such a part, or that names the vision model as its ``model``, is
answered by the captioning or VQA checkpoint (lmforge/vlm/captioner.py): a captioning model
describes the image, a VQA model answers the message's text about it. Every other chat
request goes on to the language model's route unchanged.

Only ``data:`` URLs are accepted (base64 PNG, JPEG, GIF or WebP): the server fetches
nothing from the network on a client's behalf. Every way an image can be wrong (not a data
URL, another media type, bad base64, too many bytes or pixels, bytes PIL cannot read, no
image or several) is a 400 naming the problem, never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import threading
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request

from ..errors import LmforgeError
from .errors import APIError
from .protocol import ChatCompletionRequest
from .state import server_state

MEDIA_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/gif", "image/webp")
MAX_IMAGE_BYTES = 4 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096


def image_parts(body: ChatCompletionRequest) -> list[tuple[int, dict[str, Any]]]:
    """(message index, part) of every image part in the request."""
    return [(i, part) for i, m in enumerate(body.messages) if isinstance(m.content, list)
            for part in m.content if isinstance(part, dict) and part.get("type") in ("image_url", "input_image")]


def decode_data_url(part: dict[str, Any]):
    """The image of one ``image_url`` part as an RGB PIL image, or an APIError(400)."""
    from PIL import Image, UnidentifiedImageError

    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise APIError(400, "an image_url part needs {'url': 'data:image/png;base64,...'}", param="messages")
    if not url.startswith("data:"):
        raise APIError(400, "only data: URLs are accepted for images (base64 PNG or JPEG); this server fetches "
                            "nothing from the network", param="messages")
    header, comma, payload = url[5:].partition(",")
    fields = header.split(";")
    media = fields[0].strip().lower()
    if not comma or "base64" not in fields[1:]:
        raise APIError(400, "the image data URL must be base64: data:image/png;base64,<data>", param="messages")
    if media not in MEDIA_TYPES:
        raise APIError(400, f"image type {media or '(none)'!r} is not supported: use {', '.join(MEDIA_TYPES[:2])}",
                       param="messages")
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise APIError(400, f"the image is larger than {MAX_IMAGE_BYTES // 2**20} MiB", param="messages")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "the image data URL is not valid base64", param="messages") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise APIError(400, f"the image has {img.width}x{img.height} pixels; at most "
                                    f"{MAX_IMAGE_PIXELS} are accepted", param="messages")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise APIError(400, f"the image could not be read as {media}: {exc}", param="messages") from None


class VisionChat:
    """A loaded captioning or VQA checkpoint answering chat requests, one at a time."""

    def __init__(self, path: str, name: str | None = None) -> None:
        from pathlib import Path

        from ..vlm.captioner import load_vlm

        self.loaded = load_vlm(path)
        self.name = name or Path(path).resolve().name
        self.task = self.loaded.meta["task"]
        self.lock = threading.Lock()

    def reply(self, image, question: str, max_tokens: int | None) -> tuple[str, int, int]:
        """(text, prompt tokens, completion tokens) for one image and question."""
        import numpy as np

        from ..vlm.captioner import prompt_ids, to_tensor

        size = self.loaded.meta["image_size"]
        pixels = np.array(image.resize((size, size)), dtype=np.uint8)[None]
        images = to_tensor(pixels)
        new = max(1, min(max_tokens or 40, 40))
        with self.lock:
            if self.task == "caption":
                text = self.loaded.caption(images, max_new_tokens=new)[0]
                prompt = prompt_ids(self.loaded.tokenizer, self.loaded.ids, None)
            else:
                text = self.loaded.answer(images, [question], max_new_tokens=min(new, 8))[0]
                prompt = prompt_ids(self.loaded.tokenizer, self.loaded.ids, question.lower())
        completion = len(self.loaded.tokenizer.encode(text, add_special_tokens=False)) + 1
        return text, len(prompt) + self.loaded.model.prefix_length, completion


def vision_router(chat: VisionChat) -> APIRouter:
    """/v1/chat/completions in front of the language model's: image requests go to `chat`."""
    from . import routes

    router = APIRouter()

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        images = image_parts(body)
        if not images and body.model != chat.name:
            return await routes.chat_completions(body, request, server_state(request))
        if body.stream:
            raise APIError(400, "streaming is not supported for image requests: send stream=false", param="stream")
        if body.n != 1:
            raise APIError(400, "image requests return one choice: n must be 1", param="n")
        if not images:
            raise APIError(400, f"{chat.name} needs an image: add an image_url content part", param="messages")
        if len(images) > 1:
            raise APIError(400, f"{chat.name} reads one image per request, got {len(images)}", param="messages")
        index, part = images[0]
        message = body.messages[index]
        if message.role != "user":
            raise APIError(400, "images are read from user messages only", param="messages")
        question = " ".join(str(p.get("text", "")) for p in message.content
                            if isinstance(p, dict) and p.get("type") == "text").strip()
        if chat.task == "vqa" and not question:
            raise APIError(400, f"{chat.name} answers questions: add a text part with the question",
                           param="messages")
        image = decode_data_url(part)
        try:
            text, prompt_tokens, completion_tokens = await asyncio.to_thread(
                chat.reply, image, question, body.max_completion_tokens or body.max_tokens)
        except LmforgeError as exc:
            raise APIError(400, str(exc), param="messages") from None
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": chat.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    return router
