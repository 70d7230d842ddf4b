"""JSON-Schema constrained decoding: only documents the schema allows can come out."""

from __future__ import annotations

import json
import random

import pytest

from lmforge.errors import LmforgeError
from lmforge.infer.json_schema import SchemaPrefix, check_schema

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "mood": {"enum": ["happy", "sad", "tired"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2},
        "score": {"type": ["number", "null"]},
        "ok": {"type": "boolean"},
        "pet": {"$ref": "#/$defs/pet"},
        "level": {"enum": [1, 2, 10]},
    },
    "required": ["name", "age"],
    "$defs": {"pet": {"type": "object", "properties": {"kind": {"const": "cat"}, "legs": {"type": "integer"}},
                      "required": ["kind"]}},
}


def conforms(value, schema=SCHEMA, root=SCHEMA) -> bool:
    """A small reference validator for the subset (independent of SchemaPrefix)."""
    if "$ref" in schema:
        return conforms(value, root["$defs"][schema["$ref"].split("/")[-1]], root)
    if "const" in schema:
        return value == schema["const"]
    if "enum" in schema:
        return value in schema["enum"] and type(value) in {type(e) for e in schema["enum"]}
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    checks = {
        "object": lambda v: isinstance(v, dict) and set(schema.get("required", [])) <= set(v) <= set(schema["properties"])
        and all(conforms(v[k], schema["properties"][k], root) for k in v),
        "array": lambda v: isinstance(v, list) and schema.get("minItems", 0) <= len(v) <= schema.get("maxItems", 10**9)
        and all(conforms(x, schema["items"], root) for x in v),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    return any(checks[t](value) for t in types)


def feed_bytewise(text: str, schema=SCHEMA) -> tuple[bool, bool]:
    state = SchemaPrefix(schema)
    for byte in text.encode():
        if not state.feed(bytes([byte])):
            return False, state.done
    return True, state.done


@pytest.mark.parametrize("text", [
    '{"name": "Bo", "age": 3}',
    '{"age":30,"name":"Ünïcødé ✓","mood":"sad","tags":["a","b"],"score":null,"ok":true,"level":10}',
    '{"name": "x\\"y", "age": -0, "score": 2.5e-3, "pet": {"kind": "cat", "legs": 4}}',
    '{ "name" : "a" , "age" : 1 , "tags" : [ "t" ] }',
])
def test_valid_documents_are_accepted_byte_by_byte(text):
    assert feed_bytewise(text) == (True, True)
    assert conforms(json.loads(text))


@pytest.mark.parametrize("text, why", [
    ('{"name": "Bo"}', "a required property is missing when the object closes"),
    ('{"nickname": "Bo"', "an undeclared property"),
    ('{"name": "Bo", "age": 3.5}', "a fraction where an integer is asked for"),
    ('{"name": 1', "a number where a string is asked for"),
    ('{"name": "a", "age": 1, "mood": "angry"', "not an enum member"),
    ('{"name": "a", "age": 1, "tags": []', "fewer items than minItems"),
    ('{"name": "a", "age": 1, "tags": ["a", "b", "c"]', "more items than maxItems"),
    ('{"name": "a", "age": 1, "pet": {"kind": "dog"', "not the const"),
    ('{"name": "a", "age": 1, "level": 12', "12 is not one of 1, 2, 10"),
    ('{"name": "a", "name": "b"', "a repeated key"),
    ('{"name": "a", "age": 1} {', "text after the document"),
    ('{"na\\u006de": "a"', "an escape where none is needed (keys are spelled plainly)"),
    ('{"name": "a", "age": 12345678901234567890123456', "a runaway number"),
    ('["name"]', "not an object"),
])
def test_violations_are_rejected_as_soon_as_they_appear(text, why):
    ok, _ = feed_bytewise(text)
    assert not ok, why


def test_every_prefix_of_a_valid_document_stays_open():
    text = '{"name": "Zoë", "age": 7, "level": 1, "pet": {"kind": "cat"}}'
    data = text.encode()
    state = SchemaPrefix(SCHEMA)
    for i in range(len(data) - 1):
        assert state.feed(data[i:i + 1]) and not state.done, data[: i + 1]
    assert state.feed(data[-1:]) and state.done


def test_random_documents_of_the_schema_are_accepted_and_random_corruptions_mostly_rejected():
    rng = random.Random(0)

    def sample():
        doc = {"name": rng.choice(["a", "Bo b", "ç\"x"]), "age": rng.randint(-50, 200)}
        if rng.random() < 0.5:
            doc["mood"] = rng.choice(["happy", "sad", "tired"])
        if rng.random() < 0.5:
            doc["tags"] = [rng.choice("xyz") for _ in range(rng.randint(1, 2))]
        if rng.random() < 0.5:
            doc["score"] = rng.choice([None, rng.uniform(-5, 5)])
        if rng.random() < 0.5:
            doc["level"] = rng.choice([1, 2, 10])
        keys = list(doc)
        rng.shuffle(keys)
        return {k: doc[k] for k in keys}

    corrupted_accepted = 0
    for _ in range(100):
        text = json.dumps(sample(), ensure_ascii=rng.random() < 0.5)
        assert feed_bytewise(text) == (True, True), text
        bad = text.replace('"age"', '"agе"')  # a Cyrillic e: an undeclared key
        assert not feed_bytewise(bad)[0]
        cut = rng.randrange(1, len(text))
        mutated = text[:cut] + rng.choice(['"', "}", "x", "1", ",", "]"]) + text[cut:]
        ok, done = feed_bytewise(mutated)
        if ok and done:
            corrupted_accepted += 1
            assert conforms(json.loads(mutated))  # whatever is accepted must still conform
    assert corrupted_accepted < 20


@pytest.mark.parametrize("schema, message", [
    ({"type": "string", "pattern": "^a"}, "unsupported JSON Schema keyword"),
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "unknown type"),
    ({"type": "object", "properties": {}, "required": ["a"]}, "required must list declared properties"),
    ({"$ref": "#/$defs/missing", "$defs": {}}, "points nowhere"),
    ({"$ref": "https://example.com/s.json"}, r"only \$ref to"),
    ({"type": "object", "additionalProperties": {"type": "string"}}, "additionalProperties"),
    ({"enum": []}, "enum must be a non-empty list"),
])
def test_unsupported_or_malformed_schemas_are_refused_up_front(schema, message):
    with pytest.raises(LmforgeError, match=message):
        check_schema(schema)
    from lmforge.infer import SamplingParams

    with pytest.raises(LmforgeError, match=message):
        SamplingParams(json_schema=schema)


@pytest.mark.slow
def test_default_model_output_always_conforms(default_lm):
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"}, "country": {"type": "string"}, "population_millions": {"type": "number"},
            "is_capital": {"type": "boolean"}, "continent": {"enum": ["Europe", "Asia", "Africa", "Americas", "Oceania"]},
        },
        "required": ["city", "country", "population_millions", "is_capital", "continent"],
    }
    for seed in range(3):
        out = default_lm.chat("Describe Paris as JSON.", json_schema=schema, temperature=0.9, seed=seed, max_tokens=160)
        doc = json.loads(out)
        assert set(doc) == set(schema["required"])
        assert isinstance(doc["is_capital"], bool) and doc["continent"] in schema["properties"]["continent"]["enum"]
        assert isinstance(doc["population_millions"], (int, float)) and isinstance(doc["city"], str)
