"""An encoder-decoder translator in the OpenAI API (`lmforge serve --translator`), driven by the
official openai client beside the default language model."""

from __future__ import annotations

import openai
import pytest

from lmforge.infer.scheduler import Scheduler
from lmforge.serve.app import ServeSettings, create_app
from tests.conftest import live_server, make_tiny_translator

SENTENCES = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light.",
             "And the evening and the morning were the first day."]


@pytest.fixture(scope="module")
def translator_dir(tmp_path_factory):
    return make_tiny_translator(tmp_path_factory.mktemp("translator") / "bible-en-es", SENTENCES)[0]


@pytest.fixture(scope="module")
def served(default_lm, translator_dir):
    from lmforge.serve.translation import Translator, translator_router

    translator = Translator(str(translator_dir), num_beams=2)
    scheduler = Scheduler(default_lm.model, default_lm.tokenizer, max_seq_len=256, max_batch=2).start()
    app = create_app(scheduler, default_lm.tokenizer, "smollm2-135m-instruct", ServeSettings(),
                     routers=[translator_router(translator)])
    with live_server(app, scheduler) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0), translator


def test_translations_through_the_openai_client_equal_lmforge_translate(served):
    from lmforge.tune.translation import translate_texts

    client, translator = served
    want = translate_texts(translator.model, translator.tokenizer, SENTENCES[:2], num_beams=2, max_new_tokens=12)
    assert all(want)  # the random model writes something (a non-empty text to compare)
    chat = client.chat.completions.create(model="bible-en-es", max_tokens=12,
                                          messages=[{"role": "system", "content": "ignored"},
                                                    {"role": "user", "content": SENTENCES[0]}])
    assert chat.model == "bible-en-es" and chat.choices[0].message.content == want[0]
    assert chat.usage.prompt_tokens > 0 and chat.choices[0].finish_reason in ("stop", "length")
    done = client.completions.create(model="bible-en-es", prompt=SENTENCES[1], max_tokens=12)
    assert done.choices[0].text == want[1]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="bible-en-es", max_tokens=12, stream=True, messages=[{"role": "user", "content": SENTENCES[0]}]))
    assert streamed == want[0]


def test_other_models_still_reach_the_language_model(served):
    client, _ = served
    reply = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "Say hi"}])
    assert reply.model == "smollm2-135m-instruct" and reply.choices[0].message.content


@pytest.mark.parametrize("kwargs, message", [
    (dict(messages=[{"role": "system", "content": "only a system turn"}]), "needs a user message"),
    (dict(messages=[{"role": "user", "content": "   "}]), "empty"),
    (dict(messages=[{"role": "user", "content": "hi"}], n=2), "one choice"),
])
def test_bad_translation_requests_are_400(served, kwargs, message):
    client, _ = served
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model="bible-en-es", **kwargs)
    with pytest.raises(openai.BadRequestError, match="echo and logprobs"):
        client.completions.create(model="bible-en-es", prompt="hi", logprobs=2)


def test_a_directory_without_a_tokenizer_is_one_error(tmp_path, translator_dir):
    import shutil

    from lmforge.errors import LmforgeError
    from lmforge.serve.translation import Translator

    bare = tmp_path / "bare"
    shutil.copytree(translator_dir, bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(LmforgeError, match="no tokenizer.json"):
        Translator(str(bare))
    with pytest.raises(LmforgeError, match="at least 1"):
        Translator(str(translator_dir), num_beams=0)


def test_a_run_folder_names_its_model(tmp_path, translator_dir):
    import shutil

    from lmforge.serve.translation import Translator

    run = tmp_path / "translate-en-es"
    shutil.copytree(translator_dir, run / "model")
    assert Translator(str(run / "model")).name == "translate-en-es"
    assert Translator(str(translator_dir)).name == "bible-en-es"
