"""Images in the chat API (`lmforge serve --vlm`), driven by the official openai client."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
import torch

from lmforge.infer.scheduler import Scheduler
from lmforge.serve.app import ServeSettings, create_app
from lmforge.vlm import scenes as sc
from tests.conftest import live_server


@pytest.fixture(scope="module")
def vqa_checkpoint(tmp_path_factory):
    from lmforge.vlm.captioner import train_vlm
    from lmforge.vlm.config import CaptionTrainConfig

    out = tmp_path_factory.mktemp("vlm") / "vqa"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_vlm(CaptionTrainConfig(task="vqa", out=str(out), steps=4, batch_size=8, train_scenes=20, val_scenes=8,
                                     test_scenes=2, vit_width=32, vit_depth=1, lm_width=32, lm_layers=1, lm_heads=2),
                  progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def served(default_lm, vqa_checkpoint):
    from lmforge.serve.vision import VisionChat, vision_router

    chat = VisionChat(str(vqa_checkpoint), name="scenes-vqa")
    scheduler = Scheduler(default_lm.model, default_lm.tokenizer, max_seq_len=512, max_batch=2).start()
    app = create_app(scheduler, default_lm.tokenizer, "smollm2-135m-instruct", ServeSettings(),
                     routers=[vision_router(chat)])
    with live_server(app, scheduler) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0), chat


def png_url(array: np.ndarray, fmt: str = "PNG") -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    media = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{media};base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(question: str, *urls: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question}]
             + [{"type": "image_url", "image_url": {"url": u}} for u in urls]}]


def test_an_image_question_is_answered_by_the_vision_model(served):
    from lmforge.vlm.captioner import to_tensor

    client, chat = served
    scene = sc.render(sc.make_scene("test", 5))
    for fmt in ("PNG", "JPEG"):
        reply = client.chat.completions.create(model="anything", messages=ask("how many shapes are there?",
                                                                              png_url(scene, fmt)))
        assert reply.model == "scenes-vqa" and reply.choices[0].finish_reason == "stop"
        assert reply.usage.prompt_tokens > chat.loaded.model.prefix_length
        if fmt == "PNG":  # lossless: the same pixels give the same answer as the model called directly
            direct = chat.loaded.answer(to_tensor(scene[None]), ["how many shapes are there?"])[0]
            assert reply.choices[0].message.content == direct


def test_text_requests_still_reach_the_language_model(served):
    client, _ = served
    reply = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=2,
                                           messages=[{"role": "user", "content": "Hi"}])
    assert reply.model == "smollm2-135m-instruct" and reply.usage.completion_tokens <= 2


@pytest.mark.parametrize("messages, kwargs, message", [
    (ask("what?", "https://example.com/a.png"), {}, "only data: URLs"),
    (ask("what?", "data:image/png;base64,@@@"), {}, "not valid base64"),
    (ask("what?", "data:text/plain;base64,aGk="), {}, "not supported"),
    (ask("what?", "data:image/png," + "x" * 10), {}, "must be base64"),
    (ask("what?", "data:image/png;base64," + base64.b64encode(b"not a png").decode()), {}, "could not be read"),
    (ask("what?", "PNG", "PNG"), {}, "one image per request"),
    (ask("", "PNG"), {}, "answers questions"),
    (ask("what?", "PNG"), {"stream": True}, "streaming"),
    ([{"role": "user", "content": "no image here"}], {"model": "scenes-vqa"}, "needs an image"),
])
def test_bad_image_requests_are_400s(served, messages, kwargs, message):
    client, _ = served
    good = png_url(sc.render(sc.make_scene("test", 1)))
    for m in messages:
        if isinstance(m["content"], list):
            for part in m["content"]:
                if part.get("type") == "image_url" and part["image_url"]["url"] == "PNG":
                    part["image_url"]["url"] = good
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=kwargs.pop("model", "x"), messages=messages, **kwargs)
    assert message in str(info.value)
