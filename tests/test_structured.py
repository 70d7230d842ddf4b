"""JSON-object constrained decoding."""

from __future__ import annotations

import json

import pytest

from lmforge.infer.structured import JsonPrefix


@pytest.mark.parametrize("text", ['{}', '{"a": 1}', '{"a": [1, 2.5, -3e-2, true, null], "b": {"c": "x\\"y\\u00e9"}}',
                                  '{ "k" : "ünïcode ✓" }', '{"n": 0}'])
def test_valid_objects_are_accepted_and_complete(text):
    state = JsonPrefix()
    assert state.feed(text.encode()) and state.done
    json.loads(text)


@pytest.mark.parametrize("text", ['[1]', '"x"', '{a: 1}', '{"a" 1}', '{"a": 01}', '{"a": tru}', '{"a": 1,}',
                                  '{"a": "\x01"}', '{"a": 1}}', '{"a": [1}', '{"a": 1.}', '{"a": -}'])
def test_invalid_text_is_rejected(text):
    state = JsonPrefix()
    assert not (state.feed(text.encode()) and state.done and json.loads(text) is not None)


def test_prefixes_of_valid_objects_stay_open():
    text = b'{"key": [1, {"x": "y"}], "z": false}'
    state = JsonPrefix()
    for i in range(len(text) - 1):
        assert state.feed(text[i:i + 1]) and not state.done
    assert state.feed(text[-1:]) and state.done


@pytest.mark.slow
def test_default_model_json_mode_always_parses(default_lm):
    from lmforge.infer import SamplingParams

    prompts = [default_lm.chat_prompt(q) for q in ["Describe a cat.", "Give me three colours.", "Who are you?"]]
    for seed in range(2):
        params = SamplingParams(max_tokens=80, temperature=0.9, seed=seed, json_object=True)
        for done in default_lm.generator.generate(prompts, params):
            if done.finish_reason == "stop":
                assert isinstance(json.loads(done.text), dict), done.text
            else:  # cut by the budget: still a valid prefix of an object
                assert done.text.lstrip().startswith("{")
